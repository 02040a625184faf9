"""Training: fresh digit scenes every step, SGD with warm-up and step decay, atomic checkpoints
that resume the same run, and a stop with one clear line when training diverges or is interrupted.

Every step is checked before it may be checkpointed: the loss must be finite and not explode
(above LOSS_EXPLOSION x its median over the last LOSS_WINDOW steps), and the weights must be
finite with a global norm that did not jump NORM_JUMP-fold in one step. The checkpoint on disk is
therefore always the last state that passed those checks."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from .backend import default_rng, get_array_module, to_device, to_numpy
from .checkpoint import (  # noqa: F401  (named here too: minifpn.train has always offered them)
    CHECKPOINT_FORMAT,
    DETECTORS,
    MODELS,
    CheckpointError,
    check_arrays_match,
    check_same_config,
    check_same_kind,
    detector_from_checkpoint,
    detector_kind,
    load_checkpoint,
    save_checkpoint,
)
from .data import DigitScenes, SceneConfig, scale_jitter
from .detection.metrics import evaluate, without_labels
from .functional.checks import integer, is_real
from .models.detector import Detector
from .optim import SGD, learning_rate
from .parallel import checksum, synchronize_batch_norm, world
from .parallel import split as part_of

# The linear scaling rule (Goyal et al. 2017, as Detectron): the peak learning rate is BASE_LR per
# BASE_BATCH images, so lr = BASE_LR * batch_size / BASE_BATCH. 0.05 was tuned at batch 8.
BASE_LR, BASE_BATCH = 0.05, 8

# Divergence checks. A healthy run's loss stays within about 3x its recent median (measured in
# docs/results.md); 10x is far outside that, and a weight norm growing 10-fold in one step is not
# learning (with weight decay the norm moves by well under 1% per step).
LOSS_WINDOW = 50  # steps whose median the loss is compared with
LOSS_MIN_HISTORY = 20  # the loss check waits for this much history: the first losses fall fast
LOSS_EXPLOSION = 10.0
NORM_JUMP = 10.0


class TrainingDiverged(RuntimeError):
    """The loss or the weights became non-finite or exploded; nothing was written after the last
    good checkpoint. The message is one line."""


class TrainingInterrupted(Exception):
    """Ctrl-C during train(): ``iteration`` steps are done and checkpointed at ``path``."""

    def __init__(self, iteration: int, path: str):
        super().__init__(f"interrupted at step {iteration}; checkpoint saved to {path}")
        self.iteration, self.path = iteration, path


@dataclass
class TrainConfig:
    """How a detector is trained. Scene i of a step is train scene images_seen + i, where
    images_seen counts the images of every earlier step, so a resumed run sees exactly the scenes
    the uninterrupted run would have seen (and no scene twice after a batch-size change).

    ``lr`` is the peak learning rate; None means the linear scaling rule, BASE_LR * batch_size /
    BASE_BATCH (``peak_lr()`` gives the number)."""

    iterations: int = 1000
    batch_size: int = 8
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup: int = 50
    milestones: tuple = (0.75, 0.9)
    checkpoint_every: int = 100
    seed: int = 0
    scenes: dict = field(default_factory=dict)  # SceneConfig overrides, e.g. {"max_objects": 4}
    scale_jitter: tuple = ()  # image scales, one drawn per step (e.g. (0.5, 1, 2)); () for none

    def __post_init__(self):
        where = "TrainConfig"
        self.scale_jitter = _check_scale_jitter(self.scale_jitter, where)
        for name, minimum in (("iterations", 1), ("batch_size", 1), ("warmup", 0), ("checkpoint_every", 1),
                              ("seed", 0)):
            setattr(self, name, integer(getattr(self, name), name, where, minimum))
        if self.lr is not None and not (is_real(self.lr) and self.lr > 0):
            raise ValueError(f"{where}: lr must be a positive finite number (or None: the linear "
                             f"scaling rule), got {self.lr!r}")
        if not (is_real(self.momentum) and 0 <= self.momentum < 1):
            raise ValueError(f"{where}: momentum must be a number in [0, 1), got {self.momentum!r}")
        if not (is_real(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"{where}: weight_decay must be a finite number >= 0, got "
                             f"{self.weight_decay!r}")
        self.milestones = tuple(self.milestones)
        if not all(is_real(m) and 0 < m <= 1 for m in self.milestones) or \
                list(self.milestones) != sorted(set(self.milestones)):
            raise ValueError(f"{where}: milestones must be increasing fractions of the run in (0, 1], "
                             f"got {self.milestones!r}")
        try:
            SceneConfig(**self.scenes)
        except (TypeError, ValueError) as e:  # an unknown field, or a bad value
            raise ValueError(f"{where}: scenes {self.scenes!r} are not a SceneConfig: {e}") from None

    def jitter_scale(self, rng) -> float | None:
        """The step's scale of ``scale_jitter``, drawn from ``rng`` (the run's, saved in every
        checkpoint, so a resume draws what the run would have); None, with no draw, without it."""
        if not self.scale_jitter:  # no draw: the run's random stream is that of a run without jitter
            return None
        return self.scale_jitter[int(rng.integers(len(self.scale_jitter)))]

    def peak_lr(self) -> float:
        """The learning rate after warm-up: ``lr``, or BASE_LR * batch_size / BASE_BATCH."""
        return self.lr if self.lr is not None else BASE_LR * self.batch_size / BASE_BATCH

    def scene_config(self) -> SceneConfig:
        return SceneConfig(**self.scenes)

    def schedule(self) -> dict:
        """What a resume must not change silently, by command-line flag: {"--lr": 0.05, ...}."""
        return {"--lr": self.peak_lr(), "--batch-size": self.batch_size,
                "--iterations": self.iterations, "--warmup": self.warmup,
                "--milestones": [float(m) for m in self.milestones],
                "--scale-jitter": list(self.scale_jitter)}

    @classmethod
    def from_dict(cls, stored: dict) -> TrainConfig:
        """The config saved by asdict (lists for tuples; keys this version does not know dropped)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in stored.items() if k in known})


def check_pretraining_split(detector, config: TrainConfig) -> None:
    """A detector that starts from a pre-trained backbone must train (and be tested) on the split
    of the seed that backbone was pre-trained for: another seed's test digits include train
    digits of the backbone's seed, which it has learnt to name."""
    c = detector.config
    if getattr(c, "pretrained", False) and c.seed != config.seed:
        raise ValueError(f"the detector's backbone was pre-trained on the train digits of seed "
                         f"{c.seed}, but training draws the scenes of seed {config.seed}, whose test "
                         f"digits that backbone may have seen; use the same seed for both")


def _check_scale_jitter(scales, where: str) -> tuple:
    """TrainConfig's scale_jitter as a tuple of floats: () or finite numbers > 0."""
    scales = tuple(scales) if isinstance(scales, (list, tuple)) else scales
    if not isinstance(scales, tuple) or not all(is_real(s) and s > 0 for s in scales):
        raise ValueError(f"{where}: scale_jitter must be image scales > 0 (e.g. (0.5, 1, 2)), or () "
                         f"for none, got {scales!r}")
    return tuple(float(s) for s in scales)


def schedule_changes(stored: dict, config: TrainConfig) -> dict:
    """{flag: [checkpoint value, new value]} for each schedule setting that differs."""
    before, after = TrainConfig.from_dict(stored).schedule(), config.schedule()
    return {k: [before[k], after[k]] for k in after if before[k] != after[k]}


def weight_norms(detector: Detector) -> tuple[float, float]:
    """(global norm of the parameters, that of the floating-point buffers) in float64, with ONE
    device-to-host transfer for the whole model: the sums of squares stay on the device until
    both are stacked and copied at once. A NaN or inf anywhere makes its norm non-finite."""
    params = [p.data for p in detector.parameters()]
    xp = get_array_module(params[0])
    buffers = [b for _, b in detector.named_buffers() if b.dtype.kind == "f"]
    sums = [_sum_of_squares(xp, group) for group in (params, buffers)]
    host = to_numpy(xp.stack(sums))  # the one synchronisation of the check
    return math.sqrt(float(host[0])), math.sqrt(float(host[1]))


def _sum_of_squares(xp, arrays):
    """Sum of the squares of every entry of ``arrays``, in float64, as a 0-d device array: one
    concatenation and three whole-model operations, however many arrays there are."""
    if not arrays:
        return xp.zeros((), xp.float64)
    flat = xp.concatenate([a.ravel() for a in arrays]).astype(xp.float64)
    return (flat * flat).sum()


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


# ---- the training loop -------------------------------------------------------------------------

def train(detector: Detector, config: TrainConfig, run_dir: str, resume: bool = False,
          progress: bool = True, time_limit: float | None = None, log=print,
          allow_changes: bool = False, after_checkpoint=None, comm=None) -> dict:
    """Train ``detector`` for ``config.iterations`` steps, checkpointing into ``run_dir``.

    With ``resume``, continue from ``run_dir/checkpoint.npz``: weights, momentum, RNG state and
    the iteration count all come back, so the run goes on as if never stopped. A different
    schedule (lr, batch size, iterations, warm-up, milestones) is refused with CheckpointError
    unless ``allow_changes``, which records it in the checkpoint's meta["changes"]. Without
    ``resume``, the initial weights are checkpointed first (iteration 0), so a run always has one.
    ``time_limit`` (seconds) ends the run early, after a checkpoint. Divergence raises
    TrainingDiverged and Ctrl-C raises TrainingInterrupted, both after leaving the last step that
    passed the checks on disk. Returns the history {"iteration": [...], "loss": [...], "cls":
    [...], "box": [...], "lr": [...], "seconds": [...], "images_seen": [...]} (one entry per step;
    images_seen counts every image trained on up to and including that step; a two-stage
    detector adds rpn_cls, rpn_box, rcnn_cls and rcnn_box, and its cls and box sum both stages).
    ``after_checkpoint(iteration, path)``, if given, is called after every checkpoint written during
    the run (every ``checkpoint_every`` steps and the last), e.g. to keep a copy for a learning curve.

    Data-parallel: ``comm`` (default ``minifpn.parallel.world()``: the MPI ranks this process is
    one of, else one process) splits each step's global batch over the ranks, sums their gradients
    in one all-reduce and synchronizes batch norm, so the run is the one-process run (same loss
    history, same weights up to float summation order). Rank 0 alone writes the checkpoint and
    shows progress; the weights are checked to be identical on every rank at each checkpoint.
    """
    check_pretraining_split(detector, config)  # before a folder is made
    comm = comm or world()
    run = _Run(detector, config, run_dir, log if comm.rank == 0 else _silent, comm)
    if resume:
        run.resume(allow_changes)
    else:
        run.saved = run.checkpoint(0)
    run.norm = weight_norms(detector)[0]
    bar = _progress_bar(detector, config, run.done) if progress and comm.rank == 0 else None
    began = time.perf_counter()
    try:
        for iteration in range(run.done, config.iterations):
            run.step(iteration)  # raises TrainingDiverged before anything unchecked is kept
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{run.history['loss'][-1]:.3f}", refresh=False,
                                img_s=f"{config.batch_size / run.history['seconds'][-1]:.1f}")
            if run.done % config.checkpoint_every == 0 or run.done == config.iterations:
                run.saved = run.checkpoint(run.done)
                if after_checkpoint is not None:
                    after_checkpoint(run.done, run.path)
            if time_limit is not None and comm.bcast(time.perf_counter() - began > time_limit):
                if run.saved != run.done:
                    run.saved = run.checkpoint(run.done)
                log(f"time limit of {time_limit:.0f} s reached after {run.done} iterations")
                break
    except KeyboardInterrupt:
        raise TrainingInterrupted(run.keep_last_step(), run.path) from None
    finally:
        if bar is not None:
            bar.close()
    return run.history


def _silent(*_):
    """The log of a rank other than 0: rank 0 speaks for the run."""


def _progress_bar(detector, config, start):
    from tqdm.auto import tqdm
    what = getattr(detector.config, "setting", detector_kind(detector))  # "fpn", ... or "classifier"
    return tqdm(total=config.iterations, initial=start, unit="it", desc=f"train {what}",
                mininterval=1.0)


class _Run:
    """The state of one training run: the detector and its optimizer, the random generator, the
    history, and the bookkeeping that keeps the checkpoint on disk the last step that passed the
    checks (``saved``), while ``done`` steps are complete in memory."""

    def __init__(self, detector: Detector, config: TrainConfig, run_dir: str, log, comm):
        self.comm = comm
        if comm.size > 1:
            check_data_parallel(detector, config, comm.size)
            synchronize_batch_norm(detector, comm)  # the same arrays: the checkpoint is unchanged
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "checkpoint.npz")
        # a write killed before its rename: the .npz is whole
        if comm.rank == 0 and os.path.exists(f"{self.path}.tmp"):
            os.remove(f"{self.path}.tmp")
            log(f"removed {self.path}.tmp, left by a checkpoint write that was killed; "
                f"{self.path} was not touched")
        self.detector, self.config, self.log = detector, config, log
        self.peak_lr = config.peak_lr()
        # frozen parameters (the backbone's freeze_at) get no step and no weight decay
        self.optimizer = SGD(detector.named_trainable_parameters(), self.peak_lr, config.momentum,
                             config.weight_decay)
        self.rng = default_rng(config.seed)
        # and one list per loss part, made at the first step: cls and box (a classifier has cls only)
        self.history = {"iteration": [], "loss": [], "lr": [], "seconds": [], "images_seen": []}
        self.done = self.saved = self.images_seen = 0
        self.changes = []
        self.scenes = DigitScenes("train", n=10 ** 9, seed=config.seed, config=config.scene_config())
        self.updating = False  # True while optimizer.step() has written some weights but not all
        self.norm = None  # the global weight norm after the last step, for the jump check
        detector.train()
        self._remember_step()

    def resume(self, allow_changes: bool) -> None:
        """Load weights, momentum, RNG state and history from the run's checkpoint."""
        ckpt = load_checkpoint(self.path)
        check_same_kind(ckpt["meta"], self.detector, self.path)
        check_same_config(ckpt["meta"]["detector_config"], self.detector, self.path)
        check_arrays_match(ckpt, self.detector, self.path)
        meta = ckpt["meta"]
        changed = schedule_changes(meta["train_config"], self.config)
        if changed and not allow_changes:
            raise CheckpointError(
                f"checkpoint {self.path} was trained with another schedule: "
                + "; ".join(f"{k}: checkpoint {_fmt(a)}, now {_fmt(b)}" for k, (a, b) in changed.items())
                + "; resume with the same values, or allow the change explicitly (--allow-changes)")
        self.detector.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optim"])
        self.rng.bit_generator.state = meta["rng_state"]
        self.history = meta["history"]
        old_batch = TrainConfig.from_dict(meta["train_config"]).batch_size
        self.history.setdefault("images_seen", [i * old_batch for i in self.history["iteration"]])
        self.done = self.saved = meta["iteration"]
        self.images_seen = meta.get("images_seen", self.done * old_batch)  # older files lack it
        self.changes = meta.get("changes", [])
        if changed:
            self.changes.append({"at_iteration": self.done, "changed": changed})
            self.log(f"resuming with changes at iteration {self.done}: " + "; ".join(
                f"{k} {_fmt(a)} -> {_fmt(b)}" for k, (a, b) in changed.items()))
        self.log(f"resumed from {self.path} at iteration {self.done}")
        self._remember_step()

    def checkpoint(self, iteration: int) -> int:
        """Check that every rank holds the same weights, then save (rank 0) step ``iteration``."""
        if self.comm.size > 1:
            check_same_weights(self.detector, self.optimizer, self.comm, iteration)
        return self._save(iteration)

    def _save(self, iteration: int) -> int:
        """Rank 0 writes the checkpoint of step ``iteration`` (atomically); returns ``iteration``."""
        if self.comm.rank != 0:
            return iteration
        save_checkpoint(self.path, self.detector, self.optimizer, {
            "detector": detector_kind(self.detector),
            "detector_config": self.detector.config.to_dict(), "train_config": asdict(self.config),
            "peak_lr": self.peak_lr, "iteration": iteration, "images_seen": self.images_seen,
            "rng_state": self.rng.bit_generator.state, "history": self.history,
            "changes": self.changes})
        return iteration

    def step(self, iteration: int) -> None:
        """One SGD step on the next batch, checked before and after the update."""
        lr = learning_rate(iteration, self.peak_lr, self.config.iterations, self.config.warmup,
                           milestones=self.config.milestones)
        self.optimizer.lr = lr
        first, batch = self.images_seen, self.config.batch_size
        images, boxes, labels = self.scenes.batch(range(first, first + batch))
        scale = self.config.jitter_scale(self.rng)
        if scale is not None:  # the batch at one of the image pyramid's scales, boxes with it
            images, boxes = scale_jitter(images, boxes, scale)
        tick = time.perf_counter()
        loss, parts = self._loss(images, boxes, labels)
        self._check_loss(loss, iteration, lr)
        self.optimizer.zero_grad()
        self.detector.backward()
        self.comm.allreduce_(self.optimizer.grad)  # the step's one gradient all-reduce (flat)
        self.updating = True
        self.optimizer.step()
        self.updating = False
        self._check_weights(iteration, lr)
        for key, value in (("iteration", iteration + 1), ("loss", loss), ("lr", lr),
                           ("seconds", time.perf_counter() - tick), ("images_seen", first + batch)):
            self.history[key].append(value)
        for key, value in parts.items():  # cls, box; the two-stage's per-stage parts
            self.history.setdefault(key, []).append(value)
        self.images_seen = first + batch
        self.done = iteration + 1  # the step is complete: from here on a Ctrl-C keeps it
        self._remember_step()

    def _loss(self, images, boxes, labels):
        """The global batch's (loss, parts): with several ranks, this rank's forward on its part
        of the images, the targets of the whole batch, and the parts summed over the ranks."""
        backend = self.detector.backend
        if self.comm.size == 1:
            return self.detector.loss(to_device(images, backend), boxes, labels, self.rng)
        start, stop = part_of(len(images), self.comm.size, self.comm.rank)
        _, parts = self.detector.loss(to_device(images[start:stop], backend), boxes, labels, self.rng,
                                      shard=(start, stop))
        summed = self.comm.allreduce_(np.array(list(parts.values()), np.float64))
        parts = {key: float(v) for key, v in zip(parts, summed)}
        return sum(parts.values()), parts

    def _check_loss(self, loss: float, iteration: int, lr: float) -> None:
        if not math.isfinite(loss):
            raise self._diverged(f"the loss became {loss}", iteration, lr)
        recent = self.history["loss"][-LOSS_WINDOW:]
        if len(recent) >= LOSS_MIN_HISTORY and loss > LOSS_EXPLOSION * float(np.median(recent)):
            raise self._diverged(f"the loss exploded to {loss:.3g}, over {LOSS_EXPLOSION:g}x its "
                                 f"median {float(np.median(recent)):.3g} over the last "
                                 f"{len(recent)} steps", iteration, lr)

    def _check_weights(self, iteration: int, lr: float) -> None:
        new_norm, stats_norm = weight_norms(self.detector)  # the step's one batched finite check
        if not (math.isfinite(new_norm) and math.isfinite(stats_norm)):
            raise self._diverged("a weight became NaN or infinite", iteration, lr)
        if new_norm > NORM_JUMP * self.norm > 0:
            raise self._diverged(f"the weight norm jumped from {self.norm:.3g} to {new_norm:.3g} "
                                 f"({new_norm / self.norm:.0f}x) in one step", iteration, lr)
        self.norm = new_norm

    def _diverged(self, what: str, iteration: int, lr: float) -> TrainingDiverged:
        return TrainingDiverged(
            f"{what} at iteration {iteration} (lr {lr:g}); training stopped and the last good "
            f"checkpoint, {self.path} (iteration {self.saved}), was left as it was. Try a smaller "
            f"--lr or a longer --warmup.")

    def _remember_step(self) -> None:
        """Keep what a Ctrl-C in the middle of the next step rolls back to."""
        self.rng_state = self.rng.bit_generator.state
        self.stats = _snapshot(dict(self.detector.named_buffers()))

    def keep_last_step(self) -> int:
        """After Ctrl-C: checkpoint the last completed step; returns the step on disk."""
        if self.updating:  # some weights are of the next step, some not: only the file is whole
            return self.saved
        if self.done != self.saved:  # undo what the interrupted step did, then keep step `done`
            keep = sum(i <= self.done for i in self.history["iteration"])
            for values in self.history.values():
                del values[keep:]
            self.images_seen = self.history["images_seen"][-1] if self.history["images_seen"] else 0
            self.rng.bit_generator.state = self.rng_state
            self.detector.load_state_dict(_restore(self.stats), strict=False)
            self.saved = self._save(self.done)  # rank 0 alone: a Ctrl-C reaches rank 0 only
        return self.saved


def check_data_parallel(detector, config: TrainConfig, size: int) -> None:
    """What data-parallel training over ``size`` ranks needs: a one-stage detector (the two-stage
    one samples RoIs per image: not split yet) and at least one scene per rank."""
    if detector_kind(detector) != "one_stage":
        raise ValueError(f"data-parallel training supports the one-stage detector, got "
                         f"{detector_kind(detector)}; run it with --workers 1")
    if config.batch_size < size:
        raise ValueError(f"{size} ranks need a global batch of at least {size} scenes, got "
                         f"batch_size {config.batch_size}")


def check_same_weights(detector, optimizer, comm, iteration: int) -> None:
    """Raise TrainingDiverged on every rank unless every rank holds bit-identical parameters,
    buffers and momentum (a CRC-32 of each rank's arrays, compared by an all-gather)."""
    arrays = [optimizer.data, *(b for _, b in detector.named_buffers())]
    if optimizer.velocity is not None:
        arrays.append(optimizer.velocity)
    sums = comm.allgather(checksum(arrays))
    if len(set(sums)) > 1:
        differ = [r for r, c in enumerate(sums) if c != sums[0]]
        raise TrainingDiverged(f"data-parallel training: at step {iteration} the weights of rank(s) "
                               f"{differ} differ from rank 0's; the ranks no longer train one model "
                               f"(nothing was written at this step)")


def _snapshot(arrays: dict):
    """A copy of named device arrays in one concatenation per dtype (a handful of device
    operations, not one per array); ``_restore`` gives them back as host arrays by name."""
    groups = {}
    for name, a in arrays.items():
        groups.setdefault(a.dtype.str, []).append((name, a.shape))
    flats = {dtype: get_array_module(*arrays.values()).concatenate(
        [arrays[name].ravel() for name, _ in members]) for dtype, members in groups.items()}
    return groups, flats


def _restore(snapshot) -> dict:
    groups, flats = snapshot
    out = {}
    for dtype, members in groups.items():
        host, start = to_numpy(flats[dtype]), 0
        for name, shape in members:
            size = int(np.prod(shape))
            out[name] = host[start:start + size].reshape(shape)
            start += size
    return out


def evaluate_detector(detector: Detector, split: str = "test", n: int = 300, batch_size: int = 16,
                      seed: int = 0, scene_config: SceneConfig | None = None, comm=None):
    """COCO-style metrics of ``detector`` on ``n`` scenes of ``split``; returns
    (metrics, detections, ground truths). With several ranks (``comm``, default
    ``minifpn.parallel.world()``), each predicts its contiguous part of the scenes and every rank
    gathers all of them, in order, so every rank returns the one-process result."""
    comm = comm or world()
    first, stop = part_of(n, comm.size, comm.rank)
    scenes = DigitScenes(split, n=n, seed=seed, config=scene_config)
    detections, truths = [], []
    backend = detector.backend
    for start in range(first, stop, batch_size):
        images, boxes, labels = scenes.batch(range(start, min(stop, start + batch_size)))
        detections += detector.predict(to_device(images, backend))
        truths += [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels)]
    if comm.size > 1:
        detections, truths = ([x for part in comm.allgather(xs) for x in part] for xs in (detections, truths))
    if detector.config.num_classes == 1:  # an RPN: proposals are scored as "object" alone
        truths = without_labels(truths)
    metrics = evaluate(detections, truths, detector.config.num_classes)
    return metrics, detections, truths


__all__ = ["BASE_BATCH", "BASE_LR", "CheckpointError", "DETECTORS", "MODELS", "TrainConfig",
           "TrainingDiverged", "TrainingInterrupted", "check_arrays_match", "check_pretraining_split",
           "check_same_config", "check_same_kind", "detector_from_checkpoint", "detector_kind",
           "evaluate_detector", "load_checkpoint", "save_checkpoint", "schedule_changes", "train",
           "weight_norms"]


# ---- one run: train, then evaluate (the CLI's demo/train jobs and minifpn.table1's runner) ------

def train_and_evaluate(detector: Detector, config: TrainConfig, run_dir: str, eval_scenes: int,
                       resume: bool = False, progress: bool = True, time_limit: float | None = None,
                       allow_changes: bool = False):
    """Train ``detector`` (``train``, same options), evaluate it on ``eval_scenes`` test scenes and
    write the run's summary to ``run_dir``/metrics.json. Prints nothing but ``train``'s progress.

    Returns (summary, history, detections, truths): summary is the dict in metrics.json
    (setting, detector, metrics, iterations, images_seen, stopped_by_time_limit, seconds, test_scenes,
    detector_config); history is ``train``'s; detections and truths are ``evaluate_detector``'s."""
    start = time.perf_counter()
    history = train(detector, config, run_dir, resume=resume, progress=progress, time_limit=time_limit,
                    allow_changes=allow_changes)
    train_seconds = time.perf_counter() - start
    # the test split of the run's own seed (disjoint from its train digits), drawn like its train scenes
    metrics, detections, truths = evaluate_detector(detector, "test", eval_scenes, seed=config.seed,
                                                    scene_config=config.scene_config())
    steps = len(history["iteration"])
    # history["images_seen"] stays right across a resume with another batch size
    images_seen = history["images_seen"][-1] if history.get("images_seen") else steps * config.batch_size
    summary = {"setting": detector.config.setting, "detector": detector_kind(detector),
               "metrics": metrics,
               "iterations": steps, "images_seen": images_seen,
               "stopped_by_time_limit": steps < config.iterations,  # train() stops early only then
               "train_seconds": round(train_seconds, 1),
               "total_seconds": round(time.perf_counter() - start, 1),
               "test_scenes": eval_scenes, "detector_config": detector.config.to_dict()}
    if world().rank == 0:  # one run, one set of outputs
        with open(os.path.join(run_dir, "metrics.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary, history, detections, truths


__all__ += ["train_and_evaluate"]
