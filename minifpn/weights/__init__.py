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

Beside them, the pre-trained backbones (``minifpn pretrain``, docs/results.md): one digit
classifier per seed, each pre-trained on the train split's source digits of that seed only, so
that a detector trained and tested with that seed never meets a test digit its backbone saw.
``backbone_seed0.npz`` ... hold the ResNet's state dict and its classifier ``fc.weight``,
``fc.bias`` (as a torchvision ResNet checkpoint does); ``backbones.json`` records, for each file,
the architecture, the seed, the recipe and command, the run time and the accuracy on the val
split. ``find_backbone`` and ``load_backbone`` pick the one a ``DetectorConfig(pretrained=True)``
of that architecture and seed starts from.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

import numpy as np

from ..parallel import world

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
                   log=print, backbone: dict | None = None) -> dict:
    """Train ``fpn`` and ``bottom_up`` from ``seed`` with the same budget (the demo's recipe:
    DetectorConfig's defaults, TrainConfig with ``iterations`` steps of ``batch_size`` scenes),
    evaluate each on ``eval_scenes`` test scenes (and on the first QUICK_SCENES), and write
    ``NAME.npz`` and ``reference.json`` into ``folder``. Checkpoints go to RUN_DIR/NAME. With
    ``jobs`` = 2 the two run in two processes at once (each run is the same as alone: every
    random draw comes from its own seeded generator). ``backbone``: DetectorConfig's pretrained,
    freeze_at and norm (default: from scratch). Returns the dict written to reference.json."""
    from ..train import TrainConfig

    if jobs > 1 and world().size > 1:
        raise ValueError(f"make_reference: jobs={jobs} with {world().size} MPI ranks; use one of the two")
    os.makedirs(folder, exist_ok=True)  # before training: a folder that cannot be made fails now
    train_config = TrainConfig(iterations=iterations, batch_size=batch_size, seed=seed)
    info = {"seed": seed, "command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "iterations": iterations, "batch_size": batch_size, "scenes": "plain (DigitScenes defaults)",
            "train_config": asdict(train_config), "test_scenes": eval_scenes, "quick_scenes": QUICK_SCENES,
            "detectors": {}}
    start = time.perf_counter()
    runs = [(name, seed, train_config, os.path.join(run_dir, name), eval_scenes, folder, progress,
             backbone or {}) for name in NAMES]
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
    if world().rank == 0:  # with --workers, rank 0 writes the one set of outputs
        with open(os.path.join(folder, INFO_FILE), "w") as f:
            json.dump(info, f, indent=2)
    return info


def _train_one(name, seed, train_config, run_dir, eval_scenes, folder, progress, backbone) -> dict:
    """Train and evaluate one reference detector, write NAME.npz; its entry of reference.json."""
    from ..models.detector import Detector, DetectorConfig
    from ..train import evaluate_detector, train_and_evaluate

    detector = Detector(DetectorConfig(setting=name, seed=seed, **backbone))
    summary, *_ = train_and_evaluate(detector, train_config, run_dir, eval_scenes, progress=progress)
    detector.eval()
    quick, _, _ = evaluate_detector(detector, "test", min(QUICK_SCENES, eval_scenes))
    if world().rank == 0:
        save_weights(detector, os.path.join(folder, f"{name}.npz"))
    return {"detector_config": detector.config.to_dict(), "metrics": summary["metrics"],
            "quick_metrics": quick, "train_seconds": summary["train_seconds"],
            "total_seconds": summary["total_seconds"]}


# ---- the pre-trained backbones ----------------------------------------------------------------

BACKBONES_FILE = "backbones.json"
CLASSIFIER_PREFIX = "fc."  # the classifier's arrays in a backbone file; a detector leaves them out


def backbone_file_name(fields: dict, seed: int) -> str:
    """backbone_seed0.npz for the default ResNet (widths 16/32/64/128, one block per stage, 3x3
    stem, one input channel); otherwise the architecture is spelled out in the name."""
    from ..models.config import DetectorConfig

    if _plain(fields) == _plain(DetectorConfig().backbone_fields()):
        return f"backbone_seed{seed}.npz"
    f = _plain(fields)
    return (f"backbone_in{f['in_channels']}_w{'-'.join(map(str, f['widths']))}_"
            f"b{'-'.join(map(str, f['blocks']))}_k{f['stem_kernel']}_seed{seed}.npz")


def _plain(fields: dict) -> dict:
    """Tuples as lists, as JSON gives them back."""
    return json.loads(json.dumps(fields))


def shipped_backbones(folder: str = FOLDER) -> dict:
    """The contents of ``backbones.json``: {file name: {"seed", "resnet", "accuracy", ...}};
    {} where there is none."""
    path = os.path.join(folder, BACKBONES_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def find_backbone(fields: dict, seed: int, folder: str = FOLDER) -> dict:
    """The ``backbones.json`` entry of the backbone pre-trained for ResNet ``fields``
    (in_channels, widths, blocks, stem_kernel) and ``seed``; a ValueError naming what is
    shipped, and how to make the one asked for, where there is none."""
    shipped = shipped_backbones(folder)
    name = backbone_file_name(fields, seed)
    if name in shipped and shipped[name]["resnet"] == _plain(fields):
        return shipped[name]
    kinds = {}
    for entry in shipped.values():
        kinds.setdefault(json.dumps(entry["resnet"]), []).append(entry["seed"])
    have = "; ".join(f"{_describe(json.loads(k))} for seeds {', '.join(map(str, sorted(s)))}"
                     for k, s in kinds.items()) or "none"
    raise ValueError(f"pretrained: no pre-trained backbone for {_describe(_plain(fields))} and seed "
                     f"{seed} in {folder} (shipped: {have}); make it with `minifpn pretrain --seed "
                     f"{seed}` and the same architecture, or train from scratch")


def _describe(f: dict) -> str:
    return (f"widths {','.join(map(str, f['widths']))}, blocks {','.join(map(str, f['blocks']))}, "
            f"stem_kernel {f['stem_kernel']}, in_channels {f['in_channels']}")


def load_backbone(fields: dict, seed: int, folder: str = FOLDER) -> dict:
    """The pre-trained ResNet's state dict (host float32 arrays, ``ResNet`` names, without the
    classifier's ``fc.*``) for ``fields`` and ``seed`` (``find_backbone``)."""
    entry = find_backbone(fields, seed, folder)
    with np.load(os.path.join(folder, entry["file"]), allow_pickle=False) as f:
        return {k: f[k] for k in f.files if not k.startswith(CLASSIFIER_PREFIX)}


def load_classifier(seed: int, fields: dict | None = None, folder: str = FOLDER):
    """The whole pre-trained digit classifier (backbone and fc) of ``seed``, in eval mode: what
    ``minifpn pretrain`` measured its accuracy on."""
    from ..models.classifier import ClassifierConfig, DigitClassifier

    fields = ClassifierConfig().backbone_fields() if fields is None else fields
    entry = find_backbone(fields, seed, folder)
    classifier = DigitClassifier(ClassifierConfig(**entry["resnet"], seed=seed))
    with np.load(os.path.join(folder, entry["file"]), allow_pickle=False) as f:
        classifier.load_state_dict({("" if k.startswith(CLASSIFIER_PREFIX) else "backbone.") + k: f[k]
                                    for k in f.files})
    return classifier.eval()


def save_backbone(classifier, folder: str, entry: dict) -> str:
    """Write ``classifier``'s backbone (ResNet names) and fc as float32 into FOLDER/NAME
    (``backbone_file_name``), and its ``entry`` into FOLDER/backbones.json. Returns the path."""
    c = classifier.config
    name = backbone_file_name(c.backbone_fields(), c.seed)
    state = {**classifier.backbone.state_dict(), **classifier.fc.state_dict(CLASSIFIER_PREFIX)}
    state = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in state.items()}
    os.makedirs(folder, exist_ok=True)
    np.savez_compressed(os.path.join(folder, name), **state)
    shipped = shipped_backbones(folder)
    shipped[name] = {"file": name, "seed": c.seed, "resnet": _plain(c.backbone_fields()), **entry}
    path = os.path.join(folder, BACKBONES_FILE)
    with open(f"{path}.tmp", "w") as f:  # then renamed over it: a reader never sees half a file
        json.dump(dict(sorted(shipped.items())), f, indent=2)
    os.replace(f"{path}.tmp", path)
    return os.path.join(folder, name)


__all__ = ["BACKBONES_FILE", "backbone_file_name", "find_backbone", "load_backbone", "load_classifier",
           "save_backbone", "shipped_backbones"]
__all__ += ["NAMES", "QUICK_SCENES", "load_reference", "make_reference", "reference_info", "save_weights"]
