"""Checkpoints: the file format of a training run, and the checks that a file fits a detector.

A checkpoint is one ``.npz``: ``model/<name>`` for every parameter and buffer (PyTorch's names),
``optim/<name>`` for SGD's momentum of each trainable parameter, and ``meta``, a JSON string with
the format number, the detector's kind and configuration, the train configuration, the
iteration, the random generator's state and the history. ``save_checkpoint`` writes it
atomically; ``load_checkpoint`` reads it with one clear error for a missing, truncated or corrupt
file; ``detector_from_checkpoint`` rebuilds the detector it holds. ``minifpn.train`` writes them.
"""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from .models.classifier import ClassifierConfig, DigitClassifier
from .models.detector import Detector, DetectorConfig
from .models.two_stage import TwoStageConfig, TwoStageDetector

CHECKPOINT_FORMAT = 1

# The detectors train() runs, by the name a checkpoint's meta["detector"] records (checkpoints made
# before the two-stage detector have no such entry: they hold a one-stage Detector); MODELS adds
# the digit classifier `minifpn pretrain` trains with the same loop, a backbone, not a detector.
DETECTORS = {"one_stage": (Detector, DetectorConfig), "two_stage": (TwoStageDetector, TwoStageConfig)}
MODELS = {**DETECTORS, "classifier": (DigitClassifier, ClassifierConfig)}


def detector_kind(detector) -> str:
    """The name in MODELS of ``detector``'s class: "one_stage", "two_stage" or "classifier"."""
    return detector.kind

class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt, or was made for another configuration."""


def save_checkpoint(path, detector, optimizer, meta: dict) -> None:
    """Write weights, momentum buffers and ``meta`` (configs, iteration, RNG state, history) to
    ``path`` atomically: into ``path + ".tmp"`` first, then renamed over ``path``, so a run killed
    mid-write leaves the previous checkpoint whole."""
    arrays = {f"model/{k}": v for k, v in detector.state_dict().items()}
    arrays.update({f"optim/{k}": v for k, v in optimizer.state_dict().items()})
    arrays["meta"] = np.array(json.dumps({"format": CHECKPOINT_FORMAT, **meta}))
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    """Read a checkpoint: {"meta": dict, "model": state dict, "optim": momentum buffers}."""
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        if "meta" not in arrays and arrays and not any("/" in k for k in arrays):
            raise CheckpointError(
                f"{path} holds weights only (a state dict of {len(arrays)} arrays, no configuration), "
                f"as the shipped reference weights do; `minifpn evaluate --reference fpn` (or "
                f"bottom_up) evaluates the shipped pair, and a checkpoint.npz of `minifpn train` "
                f"carries its configuration")
        meta = json.loads(str(arrays.pop("meta")))
    except (zipfile.BadZipFile, EOFError, ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: "
                              f"{e}); use an earlier one or train again") from e
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')}, "
                              f"expected {CHECKPOINT_FORMAT}")
    return {"meta": meta,
            "model": {k[6:]: v for k, v in arrays.items() if k.startswith("model/")},
            "optim": {k[6:]: v for k, v in arrays.items() if k.startswith("optim/")}}


def check_same_config(checkpoint_config: dict, detector: Detector, path) -> None:
    """Refuse weights made for another detector, naming the settings that differ (pretrained,
    freeze_at and norm among them: a resume may not change how the backbone trains)."""
    ours = json.loads(json.dumps(detector.config.to_dict()))  # tuples -> lists, as saved
    # a field this checkpoint predates had its default then (pretrained, freeze_at, norm: 2026-12)
    defaults = json.loads(json.dumps(type(detector.config)().to_dict()))
    stored = {k: checkpoint_config.get(k, defaults.get(k)) for k in ours}
    diffs = [f"{k}: checkpoint {stored[k]!r} vs detector {ours[k]!r}"
             for k in ours if stored[k] != ours[k]]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was made for another configuration: "
                              + "; ".join(diffs))


def check_arrays_match(ckpt: dict, detector: Detector, path) -> None:
    """Refuse a checkpoint whose arrays disagree with the configuration stored beside them (a
    hand-edited or foreign file), naming the missing, unexpected and misshapen arrays."""
    c = detector.config.to_dict()
    described = "its configuration (" + ", ".join(
        f"{k}={c[k]!r}" for k in ("setting", "widths", "blocks", "channels", "num_classes", "in_channels")
        if k in c) + ")"
    expected = {name: tuple(a.shape) for name, a in detector.state_dict().items()}
    params = {name: tuple(p.shape) for name, p in detector.named_trainable_parameters()}  # have momentum
    problems = [f"array {k} is missing" for k in expected if k not in ckpt["model"]]
    problems += [f"array {k} is unexpected" for k in ckpt["model"] if k not in expected]
    problems += [f"array {k} has shape {tuple(v.shape)} but {described} expects {expected[k]}"
                 for k, v in ckpt["model"].items() if k in expected and tuple(v.shape) != expected[k]]
    problems += [f"momentum optim/{k} belongs to no trainable parameter" for k in ckpt["optim"]
                 if k not in params]
    problems += [f"momentum optim/{k} has shape {tuple(v.shape)} but {described} expects {params[k]}"
                 for k, v in ckpt["optim"].items() if k in params and tuple(v.shape) != params[k]]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"checkpoint {path}: " + "; ".join(problems[:3]) + more)


def check_same_kind(meta: dict, detector, path) -> None:
    """Refuse a checkpoint of the other detector (one-stage weights into a two-stage one, ...)."""
    stored, ours = meta.get("detector", "one_stage"), detector_kind(detector)
    if stored != ours:
        raise CheckpointError(f"checkpoint {path} holds a {stored} detector, not a {ours} one")


def detector_from_checkpoint(path, backend: str = "numpy"):
    """Rebuild the detector a checkpoint was trained with (the class its meta["detector"]
    names, one_stage without one) and load its weights."""
    ckpt = load_checkpoint(path)
    kind = ckpt["meta"].get("detector", "one_stage")
    if kind not in MODELS:
        raise CheckpointError(f"checkpoint {path} holds a detector of unknown kind {kind!r}; "
                              f"expected one of {list(MODELS)}")
    detector_class, config_class = MODELS[kind]
    try:
        stored = dict(ckpt["meta"]["detector_config"])
        # every weight is in the checkpoint: build without loading (or needing) a pre-trained backbone
        config = config_class.from_dict({**stored, "pretrained": False} if "pretrained" in stored else stored)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has no usable detector configuration "
                              f"({type(e).__name__}: {e})") from e
    detector = detector_class(config)
    if "pretrained" in stored:
        config.pretrained = bool(stored["pretrained"])  # as the run recorded it: how it started
    check_arrays_match(ckpt, detector, path)
    detector.load_state_dict(ckpt["model"])
    return detector.to(backend), ckpt


__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "DETECTORS", "MODELS", "check_arrays_match",
           "check_same_config", "check_same_kind", "detector_from_checkpoint", "detector_kind",
           "load_checkpoint", "save_checkpoint"]
