"""Training: fresh digit scenes every step, SGD with warm-up and step decay, atomic checkpoints
that resume the same run, and a stop with a clear message if the loss stops being finite."""
from __future__ import annotations

import json
import math
import os
import time
import zipfile
from dataclasses import asdict, dataclass, field

import numpy as np

from .backend import default_rng, get_array_module, to_device
from .data import DigitScenes, SceneConfig
from .detection.metrics import evaluate
from .models.detector import Detector, DetectorConfig
from .optim import SGD, learning_rate

CHECKPOINT_FORMAT = 1


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; nothing was written after the last good checkpoint."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt, or was made for another configuration."""


@dataclass
class TrainConfig:
    """How a detector is trained. Scene i of step t is train scene t * batch_size + i, so a
    resumed run sees exactly the scenes the uninterrupted run would have seen."""

    iterations: int = 1000
    batch_size: int = 8
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup: int = 50
    milestones: tuple = (0.75, 0.9)
    checkpoint_every: int = 100
    seed: int = 0
    scenes: dict = field(default_factory=dict)  # SceneConfig overrides, e.g. {"max_objects": 4}

    def scene_config(self) -> SceneConfig:
        return SceneConfig(**self.scenes)


# ---- checkpoints -----------------------------------------------------------------------------

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
    """Refuse weights made for another detector, naming the settings that differ."""
    ours = json.loads(json.dumps(detector.config.to_dict()))  # tuples -> lists, as saved
    diffs = [f"{k}: checkpoint {checkpoint_config.get(k)!r} vs detector {ours[k]!r}"
             for k in ours if checkpoint_config.get(k) != ours[k]]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was made for another configuration: "
                              + "; ".join(diffs))


def detector_from_checkpoint(path, backend: str = "numpy"):
    """Rebuild the detector a checkpoint was trained with and load its weights."""
    ckpt = load_checkpoint(path)
    detector = Detector(DetectorConfig(**ckpt["meta"]["detector_config"]))
    detector.load_state_dict(ckpt["model"])
    return detector.to(backend), ckpt


# ---- the training loop -------------------------------------------------------------------------

def train(detector: Detector, config: TrainConfig, run_dir: str, resume: bool = False,
          progress: bool = True, time_limit: float | None = None, log=print) -> dict:
    """Train ``detector`` for ``config.iterations`` steps, checkpointing into ``run_dir``.

    With ``resume``, continue from ``run_dir/checkpoint.npz``: weights, momentum, RNG state and
    the iteration count all come back, so the run goes on as if never stopped. (The learning-rate
    milestones are fractions of ``config.iterations``: resume with the same total to keep them.) ``time_limit``
    (seconds) ends the run early, after a checkpoint. Returns the history
    {"iteration": [...], "loss": [...], "cls": [...], "box": [...], "lr": [...]}.
    """
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "checkpoint.npz")
    optimizer = SGD(detector.named_parameters(), config.lr, config.momentum, config.weight_decay)
    rng = default_rng(config.seed)
    history = {"iteration": [], "loss": [], "cls": [], "box": [], "lr": [], "seconds": []}
    start_iteration = 0
    if resume:
        ckpt = load_checkpoint(path)
        check_same_config(ckpt["meta"]["detector_config"], detector, path)
        detector.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optim"])
        rng.bit_generator.state = ckpt["meta"]["rng_state"]
        history = ckpt["meta"]["history"]
        start_iteration = ckpt["meta"]["iteration"]
        log(f"resumed from {path} at iteration {start_iteration}")
    scenes = DigitScenes("train", n=10 ** 9, seed=config.seed, config=config.scene_config())
    backend = detector.backend
    detector.train()

    def checkpoint(iteration):
        save_checkpoint(path, detector, optimizer, {
            "detector_config": detector.config.to_dict(), "train_config": asdict(config),
            "iteration": iteration, "rng_state": rng.bit_generator.state, "history": history})

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=config.iterations, initial=start_iteration, unit="it",
                   desc=f"train {detector.config.setting}", mininterval=1.0)
    began = time.perf_counter()
    iteration = start_iteration
    try:
        for iteration in range(start_iteration, config.iterations):
            lr = learning_rate(iteration, config.lr, config.iterations, config.warmup,
                               milestones=config.milestones)
            optimizer.lr = lr
            first = iteration * config.batch_size
            images, boxes, labels = scenes.batch(range(first, first + config.batch_size))
            tick = time.perf_counter()
            loss, parts = detector.loss(to_device(images, backend), boxes, labels, rng)
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"the loss became {loss} at iteration {iteration} (lr {lr:g}); training "
                    f"stopped and the last good checkpoint, {path}, was left as it was. "
                    f"Try a smaller --lr or a longer --warmup.")
            optimizer.zero_grad()
            detector.backward()
            optimizer.step()
            if not all(bool(get_array_module(p.data).isfinite(p.data).all())
                       for p in optimizer.params.values()):
                raise TrainingDiverged(
                    f"a weight became NaN or infinite at iteration {iteration} (lr {lr:g}); "
                    f"training stopped and the last good checkpoint, {path}, was left as it "
                    f"was. Try a smaller --lr or a longer --warmup.")
            for key, value in (("iteration", iteration + 1), ("loss", loss), ("cls", parts["cls"]),
                               ("box", parts["box"]), ("lr", lr),
                               ("seconds", time.perf_counter() - tick)):
                history[key].append(value)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False,
                                img_s=f"{config.batch_size / history['seconds'][-1]:.1f}")
            done = iteration + 1
            if done % config.checkpoint_every == 0 or done == config.iterations:
                checkpoint(done)
            if time_limit is not None and time.perf_counter() - began > time_limit:
                if done % config.checkpoint_every:
                    checkpoint(done)
                log(f"time limit of {time_limit:.0f} s reached after {done} iterations")
                break
    finally:
        if bar is not None:
            bar.close()
    return history


def evaluate_detector(detector: Detector, split: str = "test", n: int = 300, batch_size: int = 16,
                      seed: int = 0, scene_config: SceneConfig | None = None):
    """COCO-style metrics of ``detector`` on ``n`` scenes of ``split``; returns
    (metrics, detections, ground truths)."""
    scenes = DigitScenes(split, n=n, seed=seed, config=scene_config)
    detections, truths = [], []
    backend = detector.backend
    for start in range(0, n, batch_size):
        images, boxes, labels = scenes.batch(range(start, min(n, start + batch_size)))
        detections += detector.predict(to_device(images, backend))
        truths += [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels)]
    if detector.config.num_classes == 1:  # an RPN: proposals are scored as "object" alone
        truths = [{"boxes": t["boxes"], "labels": np.zeros_like(t["labels"])} for t in truths]
    metrics = evaluate(detections, truths, detector.config.num_classes)
    return metrics, detections, truths


__all__ = ["CheckpointError", "TrainConfig", "TrainingDiverged", "check_same_config",
           "detector_from_checkpoint", "evaluate_detector", "load_checkpoint", "save_checkpoint",
           "train"]
