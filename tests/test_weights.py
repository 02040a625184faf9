"""The shipped reference pair (minifpn/weights/): it loads, it is what reference.json says, and it
reproduces the metrics recorded when `minifpn reference` made it."""
import json
import os

import numpy as np
import pytest

from minifpn import weights
from minifpn.cli import main
from minifpn.train import evaluate_detector

# How close a re-evaluation must come to the recorded metrics. The detector's scores are float32
# sums of products; another BLAS (or thread count) sums in another order and moves a score by about
# 1e-6 relative. That can reorder two near-tied detections or move one across the 0.05 threshold,
# which changes AP or AR by a small part of one detection's share (1 / ~300 digits per 100 scenes,
# times the precision difference of the swap): well under 1e-3. On one machine the match is exact.
METRIC_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def info():
    return weights.reference_info()


@pytest.mark.parametrize("name", weights.NAMES)
def test_reference_detector_reproduces_its_recorded_metrics(info, name):
    detector = weights.load_reference(name)
    assert detector.config.setting == name and not detector.training
    recorded = info["detectors"][name]["quick_metrics"]
    metrics, _, _ = evaluate_detector(detector, "test", info["quick_scenes"])
    assert set(metrics) == set(recorded)
    for key, value in recorded.items():
        assert metrics[key] == pytest.approx(value, abs=METRIC_TOLERANCE), key


def test_reference_json_records_one_budget_the_command_and_trained_detectors(info):
    assert info["command"].startswith("minifpn reference") and info["seed"] == 0
    assert info["iterations"] == info["train_config"]["iterations"] == 1600  # cli.REFERENCE_ITERATIONS
    assert info["batch_size"] == info["train_config"]["batch_size"] == 8
    assert (info["test_scenes"], info["quick_scenes"]) == (300, weights.QUICK_SCENES)
    assert sorted(info["detectors"]) == sorted(weights.NAMES)
    for name, entry in info["detectors"].items():
        config = entry["detector_config"]
        assert config["setting"] == name and config["seed"] == info["seed"]
        # every field but the setting is the same: the pair differs by the top-down pathway alone
        others = {k: v for k, v in config.items() if k != "setting"}
        assert others == {k: v for k, v in info["detectors"]["fpn"]["detector_config"].items()
                          if k != "setting"}
        assert entry["metrics"]["AP50"] > 0.3  # trained: an untrained detector scores about 0


@pytest.mark.parametrize("name", weights.NAMES)
def test_weight_files_are_small_float32_state_dicts(name):
    path = os.path.join(weights.FOLDER, f"{name}.npz")
    assert os.path.getsize(path) < 5 * 2 ** 20  # "a few MB at most"
    with np.load(path, allow_pickle=False) as f:
        dtypes = {f[k].dtype for k in f.files if f[k].dtype.kind == "f"}
        names = set(f.files)
    assert dtypes == {np.dtype(np.float32)}
    assert names == set(weights.load_reference(name).state_dict())


def test_load_reference_names_the_detectors_it_has():
    with pytest.raises(ValueError, match="reference detector must be one of fpn, bottom_up, got 'c5'"):
        weights.load_reference("c5")
    with pytest.raises(FileNotFoundError, match="no reference.json in .*; run `minifpn reference`"):
        weights.reference_info("/nonexistent-folder")


def test_reference_job_writes_weights_that_load_and_reproduce_their_metrics(tmp_path, capsys):
    out = tmp_path / "new" / "weights"  # made by the job
    assert main(["reference", "--iterations", "1", "--eval-scenes", "3", "--out", str(out),
                 "--runs", str(tmp_path / "runs"), "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    info = json.loads((out / "reference.json").read_text())
    assert info["command"] == (f"minifpn reference --iterations 1 --eval-scenes 3 --out {out} "
                               f"--runs {tmp_path / 'runs'} --quiet")
    assert info["quick_scenes"] == 100 and info["test_scenes"] == 3  # quick: min(100, 3) scenes
    for name in weights.NAMES:
        detector = weights.load_reference(name, folder=str(out))
        metrics, _, _ = evaluate_detector(detector, "test", 3)
        assert metrics == info["detectors"][name]["metrics"] == info["detectors"][name]["quick_metrics"]


def test_reference_job_refuses_an_out_folder_it_cannot_write_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["reference", "--out", str(blocker / "weights"), "--runs", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err.strip() == (f"minifpn reference: error: --out {blocker / 'weights'}: "
                                               f"{blocker} is a file, not a folder")
    assert not (tmp_path / "runs").exists()  # nothing trained
