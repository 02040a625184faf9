import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from minifpn.cli import main
from minifpn.detection.metrics import evaluate, without_labels
from minifpn.train import detector_from_checkpoint, evaluate_detector


def test_gradcheck_prints_a_table_with_every_check_passing(capsys):
    assert main(["gradcheck"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.endswith("pass")]
    assert len(lines) >= 20
    assert "FAIL" not in out
    assert "op" in out and "max rel. error" in out
    for op in ("conv2d", "max_pool2d", "upsample_nearest", "batch_norm", "relu", "add"):
        assert any(line.startswith(op) for line in lines), op


def test_gradcheck_exits_nonzero_when_a_check_fails(monkeypatch, capsys):
    import minifpn.gradcheck as gc
    real = gc.standard_checks

    def one_broken(**kwargs):
        results = real(**kwargs)
        results[0].errors["x"] = 0.5  # pretend a backward were wrong
        return results

    monkeypatch.setattr(gc, "standard_checks", one_broken)
    assert main(["gradcheck"]) == 1
    assert "FAIL" in capsys.readouterr().out


SCRIPT = shutil.which("minifpn", path=str(pathlib.Path(sys.executable).parent))


@pytest.mark.skipif(SCRIPT is None, reason="the console script is not installed beside python")
def test_console_script_help():
    out = subprocess.run([SCRIPT, "gradcheck", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "central-difference" in out


def test_module_entry_point_refuses_unknown_job():
    res = subprocess.run([sys.executable, "-m", "minifpn.cli", "fly"], capture_output=True,
                         text=True)
    assert res.returncode == 2 and "invalid choice" in res.stderr


TINY = ["--widths", "4,8,8,16", "--channels", "8", "--iterations", "2", "--batch-size", "2",
        "--eval-scenes", "4", "--quiet", "--checkpoint-every", "2"]


def test_train_then_evaluate_a_checkpoint(tmp_path, capsys):
    assert main(["train", *TINY, "--runs", str(tmp_path), "--name", "t"]) == 0
    out = capsys.readouterr().out
    assert "fpn: 2 iterations (4 images)" in out and "AP@[.5:.95]" in out
    run = tmp_path / "t"
    for name in ("metrics.json", "checkpoint.npz", "loss_curve.png", "detections.png", "pyramid.png"):
        assert (run / name).stat().st_size > 0, name
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["iterations"] == 2 and 0 <= summary["metrics"]["AP50"] <= 1
    assert main(["evaluate", str(run / "checkpoint.npz"), "--scenes", "4", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == summary["metrics"]  # the same detector on the same 4 test scenes
    assert main(["evaluate", str(run / "checkpoint.npz"), "--scenes", "4", "--json",
                 "--class-agnostic"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].endswith("test split, 4 scenes, class-agnostic:")
    detector, _ = detector_from_checkpoint(str(run / "checkpoint.npz"))
    _, detections, truths = evaluate_detector(detector, "test", 4)
    assert json.loads(out[-1]) == evaluate(without_labels(detections), without_labels(truths), 1)


def test_evaluate_a_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "checkpoint.npz"
    bad.write_bytes(b"not a checkpoint")
    assert main(["evaluate", str(bad)]) == 1
    assert "truncated or corrupt" in capsys.readouterr().err


def test_evaluate_the_shipped_reference_reproduces_its_recorded_metrics(capsys):
    # reference.json records each detector's metrics on the first 100 test scenes (quick_metrics)
    from minifpn.weights import QUICK_SCENES, reference_info

    recorded = reference_info()["detectors"]["bottom_up"]["quick_metrics"]
    assert main(["evaluate", "--reference", "bottom_up", "--scenes", str(QUICK_SCENES), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == f"reference bottom_up: setting bottom_up, trained 1600 iterations; test split, " \
                     f"{QUICK_SCENES} scenes:"
    assert json.loads(out[-1]) == pytest.approx(recorded, abs=1e-12)


def test_evaluate_a_weights_only_file_says_what_it_is_and_what_to_run(capsys):
    from minifpn.weights import FOLDER

    assert main(["evaluate", str(pathlib.Path(FOLDER) / "fpn.npz")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "holds weights only (a state dict of" in err and "no configuration" in err
    assert "`minifpn evaluate --reference fpn`" in err


@pytest.mark.parametrize("argv", [["evaluate"], ["evaluate", "ckpt.npz", "--reference", "fpn"]])
def test_evaluate_needs_exactly_one_of_a_checkpoint_and_reference(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "give a checkpoint or --reference NAME (the shipped fpn or bottom_up), one of them" in \
        capsys.readouterr().err


def test_ablation_writes_the_table(tmp_path, capsys):
    assert main(["ablation", *TINY, "--runs", str(tmp_path), "--settings", "b,c"]) == 0
    table = (tmp_path / "ablation" / "table1.md").read_text()
    assert "(b) single-scale: head on C5" in table and "(c) FPN" in table
    assert "| 44.0 | 56.3 | 44.9 | 63.4 | 66.2 |" in table  # the paper's FPN row
    rows = json.loads((tmp_path / "ablation" / "table1.json").read_text())
    assert [r["setting"] for r in rows] == ["c5", "fpn"]
    assert all(r["detector_config"]["num_classes"] == 1 for r in rows)  # an RPN, as the paper's
    assert all(r["detector_config"]["positive_iou"] == 0.7 for r in rows)
