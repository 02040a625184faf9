"""A trained reference pair, shipped with the package: the FPN detector (Table 1 setting (c)) and
the bottom-up pyramid (setting (d)), trained from one seed with the same budget as ``minifpn demo``
(1600 SGD steps of 8 fresh plain scenes each), so that notebooks show trained maps without training.

``load_reference("fpn")`` / ``load_reference("bottom_up")`` -> a ``Detector`` in eval mode;
``reference_info()`` -> what ``reference.json`` records: the detector and train configurations, the
seed, the command that made the files, its run time, its date, and the metrics each detector
reached on the test split (on all ``test_scenes`` scenes and on the first ``quick_scenes``).

``minifpn reference --seed 0`` (``make_reference``) trains both again and rewrites the files:
``fpn.npz`` and ``bottom_up.npz`` hold the model's state dict only (float32 weights and batch-norm
statistics, PyTorch names, np.savez_compressed), ``reference.json`` the rest.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

import numpy as np

NAMES = ("fpn", "bottom_up")  # Table 1's (c) and (d): with and without the top-down pathway
FOLDER = os.path.dirname(os.path.abspath(__file__))
INFO_FILE = "reference.json"
QUICK_SCENES = 100  # the metrics are also recorded on the first 100 test scenes: a fast test


def _check_name(name) -> str:
    if name not in NAMES:
        raise ValueError(f"reference detector must be one of {', '.join(NAMES)}, got {name!r}")
    return name


def reference_info(folder: str = FOLDER) -> dict:
    """The contents of ``reference.json``: {"seed", "command", "date", "train_config",
    "detectors": {name: {"detector_config", "metrics", "quick_metrics", "train_seconds", ...}}}."""
    path = os.path.join(folder, INFO_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {INFO_FILE} in {folder}; run `minifpn reference` to make the "
                                f"reference weights")
    with open(path) as f:
        return json.load(f)


def load_reference(name: str, backend: str = "numpy", folder: str = FOLDER):
    """The shipped trained detector ``name`` ("fpn" or "bottom_up") on ``backend``, in eval mode."""
    from ..models.detector import Detector, DetectorConfig

    _check_name(name)
    info = reference_info(folder)["detectors"][name]
    detector = Detector(DetectorConfig.from_dict(info["detector_config"]))
    with np.load(os.path.join(folder, f"{name}.npz"), allow_pickle=False) as f:
        detector.load_state_dict({k: f[k] for k in f.files})
    return detector.to(backend).eval()


def save_weights(detector, path: str) -> None:
    """The model's state dict only, floats as float32, compressed: a few hundred kB."""
    state = {k: v.astype(np.float32) if v.dtype.kind == "f" else v
             for k, v in detector.state_dict().items()}
    np.savez_compressed(path, **state)


def make_reference(seed: int = 0, iterations: int = 1600, batch_size: int = 8,
                   run_dir: str = os.path.join("runs", "reference"), eval_scenes: int = 300,
                   folder: str = FOLDER, command: str = "", progress: bool = True, jobs: int = 1,
                   log=print) -> dict:
    """Train ``fpn`` and ``bottom_up`` from ``seed`` with the same budget (the demo's recipe:
    DetectorConfig's defaults, TrainConfig with ``iterations`` steps of ``batch_size`` scenes),
    evaluate each on ``eval_scenes`` test scenes (and on the first QUICK_SCENES), and write
    ``NAME.npz`` and ``reference.json`` into ``folder``. Checkpoints go to RUN_DIR/NAME. With
    ``jobs`` = 2 the two run in two processes at once (each run is the same as alone: every
    random draw comes from its own seeded generator). Returns the dict written to reference.json."""
    from ..train import TrainConfig

    os.makedirs(folder, exist_ok=True)  # before training: a folder that cannot be made fails now
    train_config = TrainConfig(iterations=iterations, batch_size=batch_size, seed=seed)
    info = {"seed": seed, "command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "iterations": iterations, "batch_size": batch_size, "scenes": "plain (DigitScenes defaults)",
            "train_config": asdict(train_config), "test_scenes": eval_scenes, "quick_scenes": QUICK_SCENES,
            "detectors": {}}
    start = time.perf_counter()
    runs = [(name, seed, train_config, os.path.join(run_dir, name), eval_scenes, folder, progress)
            for name in NAMES]
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(max_workers=min(jobs, len(NAMES))) as pool:
            entries = list(pool.map(_train_one, *zip(*runs)))
    else:
        entries = [_train_one(*run) for run in runs]
    for name, entry in zip(NAMES, entries):
        info["detectors"][name] = entry
        m = entry["metrics"]
        log(f"{name}: AP {m['AP']:.4f}, AP50 {m['AP50']:.4f}, AR_small {m['AR_small']:.4f} on "
            f"{eval_scenes} test scenes; trained in {entry['train_seconds']:.0f} s")
    info["wall_seconds"] = round(time.perf_counter() - start, 1)
    with open(os.path.join(folder, INFO_FILE), "w") as f:
        json.dump(info, f, indent=2)
    return info


def _train_one(name, seed, train_config, run_dir, eval_scenes, folder, progress) -> dict:
    """Train and evaluate one reference detector, write NAME.npz; its entry of reference.json."""
    from ..models.detector import Detector, DetectorConfig
    from ..train import evaluate_detector, train_and_evaluate

    detector = Detector(DetectorConfig(setting=name, seed=seed))
    summary, *_ = train_and_evaluate(detector, train_config, run_dir, eval_scenes, progress=progress)
    detector.eval()
    quick, _, _ = evaluate_detector(detector, "test", min(QUICK_SCENES, eval_scenes))
    save_weights(detector, os.path.join(folder, f"{name}.npz"))
    return {"detector_config": detector.config.to_dict(), "metrics": summary["metrics"],
            "quick_metrics": quick, "train_seconds": summary["train_seconds"],
            "total_seconds": summary["total_seconds"]}


__all__ = ["NAMES", "QUICK_SCENES", "load_reference", "make_reference", "reference_info", "save_weights"]
