"""minifpn.table1: the six settings, the paper's numbers, the table writer and the runner."""
import json
import subprocess
import sys

import pytest

from minifpn import table1
from minifpn.models.detector import DetectorConfig
from minifpn.table1 import (
    LETTERS,
    PAPER_AR1K,
    PAPER_AR100,
    PAPER_RPN,
    SETTINGS,
    markdown_table,
    resolve,
    run_ablation,
)
from minifpn.train import TrainConfig

ORDER = ["c4", "c5", "fpn", "bottom_up", "no_lateral", "p2_only"]  # the paper's rows (a)..(f)


def test_settings_are_the_papers_rows_in_order():
    assert list(SETTINGS) == ORDER
    assert [s.letter for s in SETTINGS.values()] == list("abcdef")
    assert all(name == s.name for name, s in SETTINGS.items())
    assert LETTERS == dict(zip("abcdef", ORDER))
    assert SETTINGS["fpn"].label == "(c) FPN: P2..P6, one anchor size per level"
    assert SETTINGS["c5"].label.startswith("(b) single-scale: head on C5")


@pytest.mark.parametrize("given, name", [("a", "c4"), ("b", "c5"), ("c", "fpn"), ("d", "bottom_up"),
                                         ("e", "no_lateral"), ("f", "p2_only"), ("fpn", "fpn"),
                                         ("p2_only", "p2_only"), (" c ", "fpn")])
def test_resolve_takes_a_name_or_a_letter(given, name):
    assert resolve(given) == name


@pytest.mark.parametrize("bad", ["g", "FPN", "", "a,b", 3])
def test_resolve_refuses_anything_else_and_lists_what_it_takes(bad):
    with pytest.raises(ValueError) as info:
        resolve(bad)
    assert str(info.value) == ("setting must be one of c4, c5, fpn, bottom_up, no_lateral, p2_only or "
                               f"a Table 1 letter a-f, got {bad!r}")


def test_detector_config_resolves_through_table1():
    assert DetectorConfig(setting="e").setting == "no_lateral"
    with pytest.raises(ValueError, match="or a Table 1 letter a-f, got 'z'"):
        DetectorConfig(setting="z")


def test_paper_numbers_have_one_row_per_setting():
    assert list(PAPER_AR1K) == ORDER and list(PAPER_AR100) == ORDER
    assert all(len(row) == 4 for row in PAPER_AR1K.values())  # AR^1k, AR^1k_s, AR^1k_m, AR^1k_l
    assert PAPER_AR1K["fpn"] == (56.3, 44.9, 63.4, 66.2) and PAPER_AR100["fpn"] == 44.0
    # the paper's text: FPN "improves AR^1k to 56.3, which is 8.0 points increase over the
    # single-scale RPN baseline" (a), and small objects "by a large margin of 12.9 points"
    assert PAPER_AR1K["fpn"][0] - PAPER_AR1K["c4"][0] == pytest.approx(8.0)
    assert PAPER_AR1K["fpn"][1] - PAPER_AR1K["c4"][1] == pytest.approx(12.9)
    # FPN has the best AR^1k, AR^1k_s and AR^100 of the six, but not the best AR^1k_l
    assert max(PAPER_AR1K, key=lambda s: PAPER_AR1K[s][0]) == "fpn"
    assert max(PAPER_AR1K, key=lambda s: PAPER_AR1K[s][1]) == "fpn"
    assert max(PAPER_AR100, key=PAPER_AR100.get) == "fpn"
    assert max(PAPER_AR1K, key=lambda s: PAPER_AR1K[s][3]) == "bottom_up"


def test_paper_rpn_fields_are_detector_config_fields():
    config = DetectorConfig(**PAPER_RPN)
    assert (config.num_classes, config.positive_iou, config.negative_iou, config.anchors_per_image) == (
        1, 0.7, 0.3, 256)


def fake_summary(setting, **metrics):
    values = {"AR@100": 0.5, "AR_small": 0.25, "AR_medium": 0.125, "AR_large": 1.0, "AP": 0.0, "AP50": 0.75}
    return {"setting": setting, "metrics": {**values, **metrics}}


def test_markdown_table_sets_ours_beside_the_papers():
    table = markdown_table([fake_summary("c5"), fake_summary("p2_only", AP=0.3456)])
    lines = table.splitlines()
    assert lines[0] == ("| setting | AR@100 | AR_s | AR_m | AR_l | AP | AP50 | paper AR^100 | paper AR^1k | "
                        "paper AR^1k_s | paper AR^1k_m | paper AR^1k_l |")
    assert lines[1] == "|" + "---|" * 12
    assert lines[2] == (f"| {SETTINGS['c5'].label} | 50.0 | 25.0 | 12.5 | 100.0 | 0.0 | 75.0 "
                        "| 36.3 | 44.9 | 25.3 | 55.5 | 64.2 |")
    assert lines[3] == (f"| {SETTINGS['p2_only'].label} | 50.0 | 25.0 | 12.5 | 100.0 | 34.6 | 75.0 "
                        "| 38.4 | 51.3 | 35.1 | 59.7 | 67.6 |")
    assert len(lines) == 4


def test_run_ablation_trains_each_setting_and_writes_the_table(tmp_path):
    detector_config = DetectorConfig(widths=(4, 4, 4, 4), channels=4, **PAPER_RPN)
    train_config = TrainConfig(iterations=2, batch_size=1, checkpoint_every=2)
    logged, reported = [], []
    summaries = run_ablation(["b", "fpn"], detector_config, train_config, str(tmp_path), eval_scenes=2,
                             progress=False, log=logged.append, report=reported.append)
    assert [s["setting"] for s in summaries] == ["c5", "fpn"]
    assert reported == summaries
    for s in summaries:
        assert s["iterations"] == 2 and s["test_scenes"] == 2 and s["stopped_by_time_limit"] is False
        config = s["detector_config"]
        assert (tuple(config["widths"]), config["channels"], config["num_classes"]) == ((4, 4, 4, 4), 4, 1)
        assert set(s["metrics"]) >= set(table1.OUR_COLUMNS)  # every column the table prints
        # overall values are fractions; a size bucket with no digit in 2 scenes reads -1
        assert all(0 <= s["metrics"][key] <= 1 for key in ("AR@100", "AP", "AP50")), s["metrics"]
        assert (tmp_path / s["setting"] / "checkpoint.npz").stat().st_size > 0
        assert json.loads((tmp_path / s["setting"] / "metrics.json").read_text()) == json.loads(json.dumps(s))
    assert json.loads((tmp_path / "table1.json").read_text()) == json.loads(json.dumps(summaries))
    text = (tmp_path / "table1.md").read_text()
    assert text.startswith("Table 1 at this scale: 2 iterations of batch 1 each, test split (2 scenes).")
    assert text.endswith(markdown_table(summaries) + "\n")
    assert "| 44.0 | 56.3 | 44.9 | 63.4 | 66.2 |" in text  # the paper's FPN row
    assert logged[0] == f"\n=== {SETTINGS['c5'].label} ==="
    assert logged[-1].endswith(f"wrote {tmp_path}/table1.md")


def test_run_ablation_refuses_a_bad_setting_before_any_training(tmp_path):
    with pytest.raises(ValueError, match="got 'z'"):
        run_ablation(["c", "z"], DetectorConfig(), TrainConfig(), str(tmp_path), eval_scenes=2)
    assert list(tmp_path.iterdir()) == []


def test_importing_table1_loads_no_model_code():
    # models/detector.py imports table1 at its top, so table1 must not import models/ at its own
    code = "import sys, minifpn.table1; print(sorted(m for m in sys.modules if m.startswith('minifpn.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "minifpn.table1" in out and "minifpn.models" not in out and "minifpn.train" not in out
    assert table1.__name__ == "minifpn.table1"
