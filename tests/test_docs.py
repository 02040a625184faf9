"""The docs and notebooks name the code by symbol, and refer to nothing outside the repository.

docs/*.md name the code by its full Python name in backticks (`minifpn.models.fpn.FPN.forward`)
and tests by their pytest node id (`tests/test_fpn_structure.py::test_bad_options`), never by
line number (docs/fpn.md explains the convention). These tests resolve every such name, so a
renamed or moved function fails here instead of leaving a page stale.
"""
from __future__ import annotations

import ast
import importlib
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

SPAN = re.compile(r"`([^`\n]+)`")  # one inline code span
SYMBOL = re.compile(r"(minifpn(?:\.\w+)+)(?:\(.*\))?")  # minifpn.x.y, perhaps called: f(...)
NODE = re.compile(r"((?:tests|benchmarks)/[\w/]+\.py)(?:::(\w+))?")  # tests/test_x.py::test_y
PATH = re.compile(r"[\w.-]+(?:/[\w.-]+)*\.(?:py|md|ipynb|json|toml|csv|txt)")  # a file in a span
LINE_REF = re.compile(r"\w+\.py:\d+")  # fpn.py:81, the form that pinned an old layout
RELATIVE_LINK = re.compile(r"\]\(([^)\s]+)\)")  # markdown [text](target)
UP = re.compile(r"(?:\.\./)+[\w./-]*")  # ../docs/results.md
ABSOLUTE = re.compile(r"(?<![\w.:/-])(?:~/|file://|/(?:work|tmp|home|root|usr|opt|mnt|var|srv|Users|private)/)")
OUTSIDE_WORDS = re.compile(r"\bshared/|DESIGN\.md|STYLE\.md", re.IGNORECASE)


def notebook_text(path: Path) -> str:
    """Every cell's source and every text output of a notebook, joined."""
    parts = []
    for cell in json.loads(path.read_text())["cells"]:
        parts.append("".join(cell["source"]))
        for output in cell.get("outputs", []):
            parts.append("".join(output.get("text", "")))
            parts.extend("".join(v) for k, v in output.get("data", {}).items() if k.startswith("text/"))
            parts.extend(output.get("traceback", []))
    return "\n".join(parts)


def texts():
    """(relative path, text) of every doc page and notebook."""
    for path in DOCS:
        yield path, path.read_text()
    for path in NOTEBOOKS:
        yield path, notebook_text(path)


def prose(path: Path) -> str:
    """The markdown of a page or of a notebook's markdown cells, without code (where links live)."""
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text())["cells"]
        text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    else:
        text = path.read_text()
    return SPAN.sub("", re.sub(r"```.*?```", "", text, flags=re.DOTALL))


def spans(pattern):
    """(page, matched span) for every code span of docs/*.md that ``pattern`` matches whole."""
    return [(path.relative_to(ROOT).as_posix(), m) for path in DOCS
            for span in SPAN.findall(path.read_text()) if (m := pattern.fullmatch(span))]


def resolve(dotted: str):
    """Import the longest importable prefix of ``dotted``, then getattr the rest, one by one."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(dotted)


def top_level_names(path: Path) -> set[str]:
    """Functions, classes and assigned names at the top level of a Python file, by its AST."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def test_docs_name_code_by_symbol():
    found = spans(SYMBOL)
    assert len(found) >= 100, f"expected docs/fpn.md's symbol references, found {len(found)}"
    broken = []
    for page, m in found:
        try:
            resolve(m[1])
        except (ImportError, AttributeError) as error:
            broken.append(f"{page}: `{m[1]}` ({type(error).__name__}: {error})")
    assert not broken, "names in the docs that the code does not have:\n" + "\n".join(broken)


def test_docs_name_tests_by_node_id():
    found = spans(NODE)
    assert len(found) >= 30, f"expected docs/fpn.md's test references, found {len(found)}"
    broken = []
    for page, m in found:
        path = ROOT / m[1]
        if not path.is_file():
            broken.append(f"{page}: `{m[0]}`: no file {m[1]}")
        elif m[2] and m[2] not in top_level_names(path):
            broken.append(f"{page}: `{m[0]}`: {m[1]} has no top-level {m[2]}")
    assert not broken, "tests named in the docs that do not exist:\n" + "\n".join(broken)


def test_file_paths_in_docs_exist():
    broken = [f"{page}: `{m[0]}`" for page, m in spans(PATH)
              if "/" in m[0] and not (ROOT / m[0]).exists()]
    assert not broken, "files named in the docs that the repository does not have:\n" + "\n".join(broken)


def test_no_line_number_references():
    found = [f"{path.relative_to(ROOT)}: {ref}" for path, text in texts() for ref in LINE_REF.findall(text)]
    assert not found, "line-number references (name the symbol instead):\n" + "\n".join(found)


def test_docs_and_notebooks_refer_to_nothing_outside_the_repository():
    outside = []
    for path, text in texts():
        where = path.relative_to(ROOT)
        outside += [f"{where}: absolute path {m!r}" for m in ABSOLUTE.findall(text)]
        outside += [f"{where}: {m!r}" for m in OUTSIDE_WORDS.findall(text)]
        for up in UP.findall(text):  # a relative path may climb, but must land inside the repository
            target = (path.parent / up).resolve()
            if not target.is_relative_to(ROOT):
                outside.append(f"{where}: {up!r} leaves the repository")
        for link in RELATIVE_LINK.findall(prose(path)):
            if re.match(r"[a-z]+:|#", link):  # https://, mailto: and in-page anchors
                continue
            target = (path.parent / link.split("#")[0]).resolve()
            if not (target.is_relative_to(ROOT) and target.exists()):
                outside.append(f"{where}: link {link!r} is not a file of the repository")
    assert not outside, "references outside the repository:\n" + "\n".join(outside)


@pytest.mark.parametrize("text, expected", [
    ("see /work/main/x", "absolute path"), ("see [x](../../shared/a.md)", "leaves the repository"),
    ("per DESIGN.md", "DESIGN.md"), ("[r](results.md)", None)])
def test_outside_checks_catch_what_they_should(text, expected):
    """The checks above are not vacuous: each pattern catches its case, and a local link passes."""
    page = ROOT / "docs" / "x.md"
    hits = ([f"absolute path {m}" for m in ABSOLUTE.findall(text)] + OUTSIDE_WORDS.findall(text)
            + [f"{u} leaves the repository" for u in UP.findall(text)
               if not (page.parent / u).resolve().is_relative_to(ROOT)])
    if expected is None:
        assert hits == [] and (ROOT / "docs" / "results.md").exists()
    else:
        assert any(expected in hit for hit in hits), hits


def test_resolve_fails_on_a_broken_symbol():
    assert resolve("minifpn.models.fpn.FPN.forward").__name__ == "forward"
    with pytest.raises(AttributeError):
        resolve("minifpn.models.fpn.FPN.no_such_method")
    with pytest.raises(ModuleNotFoundError):
        resolve("minifpn_missing.fpn")
