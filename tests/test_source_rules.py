"""Compute code never calls NumPy directly: it takes ``xp`` from its inputs (STYLE.md, habit 4)."""
import ast
import pathlib

import pytest

import minifpn

PACKAGE = pathlib.Path(minifpn.__file__).parent
COMPUTE_DIRS = ["functional", "nn"]


def compute_files():
    return sorted(p for d in COMPUTE_DIRS for p in (PACKAGE / d).rglob("*.py"))


def numpy_uses(source: str) -> list[str]:
    """Lines that import numpy or use a name bound to it."""
    tree = ast.parse(source)
    found, names = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "numpy":
                    found.append(f"line {node.lineno}: import {alias.name}")
                    names.add(alias.asname or alias.name)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "numpy":
            found.append(f"line {node.lineno}: from {node.module} import ...")
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in names | {"np", "numpy"}:
            found.append(f"line {node.lineno}: uses {node.id}")
    return found


def test_the_check_finds_numpy_uses():
    assert numpy_uses("import numpy as np\nx = np.zeros(3)\n") == [
        "line 1: import numpy", "line 2: uses np"]
    assert numpy_uses("from numpy import zeros\n") == ["line 1: from numpy import ..."]
    assert numpy_uses("xp = get_array_module(x)\ny = xp.zeros(3)\n") == []


@pytest.mark.parametrize("path", compute_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_compute_code_does_not_call_numpy(path):
    assert len(compute_files()) >= 8
    assert numpy_uses(path.read_text()) == [], f"{path} calls NumPy directly; use xp"
