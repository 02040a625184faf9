"""What each level knows: a linear probe of digit identity on every map of the pyramid.

The paper's claim for FPN is "strong semantics at all scales" (Lin et al. 2017, Sec. 1): the
top-down pathway carries the coarse levels' semantics down to the fine ones, so P2 should know
*what* a small object is far better than C2, whose units have seen only a few pixels through a
few layers. A linear probe measures that directly: pool each level's features inside every
labelled digit's box, and ask how well a linear classifier of the digit's identity (0-9) does on
those vectors alone. The detector is frozen; only the probe is fitted.

The recipe, fixed before looking at any result:

- digits: every labelled digit of ``scenes`` val scenes (the probe is fitted on these) and
  ``scenes`` test scenes (the probe is scored on these), drawn with the training run's seed; val
  and test use disjoint source digits, and neither was seen in training
  (``minifpn.data.split_indices``);
- pooling (``box_cells``, ``pool_box``): on a level of stride s, the mean over the cells whose
  centres ((j + 0.5) s) lie inside the box, on each axis; where no centre does (a box narrower
  than a stride), the one cell that holds the box's centre;
- the classifier (``fit_softmax``): our own softmax regression in NumPy, features standardised
  with the fitting set's mean and std, weights and biases from zero, full-batch gradient descent
  for ``STEPS`` steps at step 1 / L (L = 0.5 * the largest eigenvalue of X^T X / n, plus the L2
  weight: a bound on the loss's curvature), L2 weight ``L2`` on the weights (not the biases);
- the spread (``seeds``): probe seed s resamples the fitting digits and the scored digits, each
  with replacement (a bootstrap); every level sees the same resamples, so levels compare paired.
  Accuracy is reported overall and by object size (``minifpn.data.size_bucket``), as the mean
  and standard deviation over the seeds.

Host-only code (NumPy): the maps come back from the detector's backend with ``to_numpy``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from . import functional as F
from .backend import to_device, to_numpy
from .data import DigitScenes, size_bucket
from .models.inputs import check_images

BUCKETS = ("all", "small", "medium", "large")  # accuracy columns: every digit, then by size
NUM_DIGITS = 10  # the probe's classes: the digit's identity, whatever the detector was trained on
STEPS = 1000  # gradient-descent steps of each probe fit
L2 = 1e-2  # weight decay of the probe, on the mean cross-entropy


# ---- pooling a level's features inside a box -------------------------------------------------

def _axis_cells(lo: float, hi: float, stride: int, size: int) -> slice:
    """Cells j of one axis whose centres (j + 0.5) * stride lie in [lo, hi); if none, the cell
    holding (lo + hi) / 2. Always at least one cell, inside [0, size)."""
    first = int(np.ceil(lo / stride - 0.5))  # smallest j with (j + 0.5) * stride >= lo
    last = int(np.ceil(hi / stride - 0.5)) - 1  # largest j with (j + 0.5) * stride < hi
    first, last = max(first, 0), min(last, size - 1)
    if first > last:  # the box falls between two centres: take the cell under its centre
        centre = min(max(int((lo + hi) / 2 // stride), 0), size - 1)
        return slice(centre, centre + 1)
    return slice(first, last + 1)


def box_cells(box, stride: int, height: int, width: int) -> tuple[slice, slice]:
    """The cells of a (height, width) map at ``stride`` that a box (x1, y1, x2, y2) in pixels
    (x2, y2 exclusive) covers: (rows, cols) slices, each at least one cell long."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return _axis_cells(y1, y2, stride, height), _axis_cells(x1, x2, stride, width)


def pool_box(feature_map: np.ndarray, box, stride: int) -> np.ndarray:
    """feature_map (C, H, W), one image's level at ``stride`` -> (C,) its mean over ``box_cells``."""
    if feature_map.ndim != 3:
        raise ValueError(f"pool_box: expected one image's map (C, H, W), got shape {feature_map.shape}")
    rows, cols = box_cells(box, stride, *feature_map.shape[1:])
    return feature_map[:, rows, cols].mean(axis=(1, 2))


# ---- the features of every digit, on every level ---------------------------------------------

def level_maps(detector, images) -> dict:
    """images (N, in_channels, H, W) -> {name: (host map (N, C_l, H_l, W_l), stride)} for C2..C5
    (the bottom-up pathway) and, where the detector has a pyramid, its P2..P5 (P6 left out: the
    paper's P6 only subsamples P5). The detector runs in eval mode (BatchNorm's running stats)."""
    check_images(images, detector.config.in_channels)
    with detector.evaluating():
        c_maps = detector.backbone(images)
        maps = {f"C{i + 2}": (to_numpy(c), 2 ** (i + 2)) for i, c in enumerate(c_maps)}  # strides 4..32
        if hasattr(detector, "fpn"):
            outputs = detector.fpn(c_maps)
            for name, stride, p in zip(detector.fpn.output_names, detector.fpn.strides, outputs):
                if int(name[1:]) in detector.fpn.levels:
                    maps[name] = (to_numpy(p), stride)
    return maps


@dataclass
class DigitFeatures:
    """Every labelled digit of a set of scenes: features[name] (D, C_l) per level, labels (D,)
    int64, sizes (D,) "small"/"medium"/"large"."""

    features: dict
    labels: np.ndarray
    sizes: np.ndarray


def digit_features(detector, scenes: DigitScenes, batch_size: int = 16) -> DigitFeatures:
    """Pool every level of ``level_maps`` inside every labelled digit's box of ``scenes``."""
    pooled, labels, sizes = {}, [], []
    for start in range(0, len(scenes), batch_size):
        images, boxes, digits = scenes.batch(range(start, min(len(scenes), start + batch_size)))
        maps = level_maps(detector, to_device(images, detector.backend))
        for n, (image_boxes, image_digits) in enumerate(zip(boxes, digits)):
            for name, (m, stride) in maps.items():
                pooled.setdefault(name, []).extend(pool_box(m[n], b, stride) for b in image_boxes)
            labels.append(image_digits)
            sizes.append(size_bucket(image_boxes))
    return DigitFeatures({name: np.stack(rows).astype(np.float64) for name, rows in pooled.items()},
                         np.concatenate(labels).astype(np.int64), np.concatenate(sizes))


# ---- the probe: softmax regression by full-batch gradient descent -----------------------------

@dataclass
class SoftmaxProbe:
    """A fitted linear classifier: standardise with (mean, std), then logits = x W + b."""

    mean: np.ndarray  # (C,)
    std: np.ndarray  # (C,)
    W: np.ndarray  # (C, K)
    b: np.ndarray  # (K,)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """X (D, C) -> the class of each row, (D,) int64."""
        return np.argmax(((X - self.mean) / self.std) @ self.W + self.b, axis=1)


def fit_softmax(X: np.ndarray, y: np.ndarray, num_classes: int = NUM_DIGITS, steps: int = STEPS,
                l2: float = L2) -> SoftmaxProbe:
    """Softmax regression on X (D, C), labels y (D,) in [0, num_classes), by full-batch gradient
    descent on  mean_i CE(softmax(x_i W + b), y_i) + l2 / 2 * |W|^2  from W = 0, b = 0.

    Step 1 / L, with L = 0.5 * lambda_max(Z^T Z / D) + l2 (Z: the standardised features) a bound on
    the loss's curvature, so every step lowers the loss. Deterministic: no random draw at all."""
    X = np.asarray(X, np.float64)
    y = np.asarray(y, np.int64)
    if X.ndim != 2 or y.shape != (X.shape[0],) or X.shape[0] == 0:
        raise ValueError(f"fit_softmax: expected X (D, C) and y (D,) with D >= 1, got {X.shape} and "
                         f"{y.shape}")
    mean, std = X.mean(axis=0), X.std(axis=0)
    std = np.where(std > 0, std, 1.0)  # a constant feature (a dead channel) stays 0, not NaN
    Z = (X - mean) / std
    D, C = Z.shape
    onehot = np.eye(num_classes)[y]  # (D, K)
    curvature = 0.5 * np.linalg.eigvalsh(Z.T @ Z / D)[-1] + l2
    step = 1.0 / curvature
    W, b = np.zeros((C, num_classes)), np.zeros(num_classes)
    for _ in range(steps):
        logits = Z @ W + b
        d_logits = (F.softmax(logits, axis=1) - onehot) / D  # the gradient of the mean cross-entropy
        W -= step * (Z.T @ d_logits + l2 * W)
        b -= step * d_logits.sum(axis=0)
    return SoftmaxProbe(mean, std, W, b)


# ---- the probe of every level, over seeds ----------------------------------------------------

@dataclass
class ProbeResult:
    """accuracy (levels, seeds, buckets): fraction of scored digits named right, per level, seed
    and size bucket (BUCKETS; NaN where a resample has no digit of that size). counts (buckets,):
    scored digits of each size. channels: feature length per level. fit_digits: digits fitted on.
    scene_seed: the seed the scenes and their split were drawn with."""

    setting: str
    levels: list
    accuracy: np.ndarray
    counts: dict
    channels: dict
    fit_digits: int
    scene_seed: int
    buckets: tuple = BUCKETS
    seconds: float = field(default=0.0)

    def to_dict(self) -> dict:
        """Everything, as JSON types: accuracy as nested lists (NaN as None), and the mean and std
        per level and bucket."""
        def number(v):
            return None if np.isnan(v) else float(v)  # JSON has no NaN

        acc = [[[number(v) for v in seed] for seed in level] for level in self.accuracy]
        summary = {name: {b: {"mean": number(self.mean(name, b)), "std": number(self.std(name, b))}
                          for b in self.buckets} for name in self.levels}
        return {"setting": self.setting, "levels": self.levels, "buckets": list(self.buckets),
                "accuracy": acc, "summary": summary, "counts": self.counts, "channels": self.channels,
                "fit_digits": self.fit_digits, "scene_seed": self.scene_seed,
                "seconds": round(self.seconds, 1)}

    @classmethod
    def from_dict(cls, d: dict) -> ProbeResult:
        """The inverse of ``to_dict`` (as read back from JSON): d["accuracy"], nested lists
        (levels, seeds, buckets) with None for NaN, becomes the float64 array of that shape with
        NaN there; setting, levels, counts, channels, fit_digits, scene_seed, buckets (as a tuple)
        and seconds (rounded to 0.1 s by ``to_dict``) are kept; "summary" is left out (``mean``
        and ``std`` recompute it from the accuracy)."""
        levels, buckets = list(d["levels"]), tuple(d["buckets"])
        accuracy = np.array([[[np.nan if v is None else v for v in seed] for seed in level]
                             for level in d["accuracy"]], dtype=np.float64)
        if accuracy.ndim != 3 or accuracy.shape[::2] != (len(levels), len(buckets)):
            raise ValueError(f"ProbeResult.from_dict: expected accuracy (levels {len(levels)}, seeds, "
                             f"buckets {len(buckets)}), got shape {accuracy.shape}")
        return cls(d["setting"], levels, accuracy, dict(d["counts"]), dict(d["channels"]),
                   d["fit_digits"], d["scene_seed"], buckets, seconds=d.get("seconds", 0.0))

    def _seeds(self, level: str, bucket: str) -> np.ndarray:
        """The accuracy of each seed whose resample holds a digit of ``bucket``."""
        values = self.accuracy[self.levels.index(level), :, self.buckets.index(bucket)]
        return values[np.isfinite(values)]

    def mean(self, level: str, bucket: str = "all") -> float:
        """Mean over the probe seeds (NaN if no resample held a digit of ``bucket``)."""
        values = self._seeds(level, bucket)
        return float(values.mean()) if values.size else float("nan")

    def std(self, level: str, bucket: str = "all") -> float:
        """Standard deviation over the probe seeds (ddof = 0: 0 with one seed)."""
        values = self._seeds(level, bucket)
        return float(values.std()) if values.size else float("nan")


def probe_levels(detector, scenes: int = 150, seeds: int = 3, steps: int = STEPS, l2: float = L2,
                 batch_size: int = 16, scene_config=None, scene_seed: int | None = None) -> ProbeResult:
    """Fit a linear probe of digit identity on every level of ``detector`` (the module docstring
    gives the recipe): fitted on the digits of ``scenes`` val scenes, scored on those of
    ``scenes`` test scenes, ``seeds`` bootstrap resamples of both. ``scene_config``: a
    ``minifpn.data.SceneConfig`` for both (default: plain scenes). ``scene_seed``: the seed of the
    scenes and of the digits' split, which must be the training run's (``TrainConfig.seed``) for
    the val and test digits to be unseen in training; None: ``detector.config.seed``, which
    ``minifpn train`` sets to the same. Returns a ``ProbeResult``."""
    if not (isinstance(scenes, int) and scenes >= 1 and isinstance(seeds, int) and seeds >= 1):
        raise ValueError(f"probe_levels: scenes and seeds must be integers >= 1, got {scenes!r} and "
                         f"{seeds!r}")
    start = time.perf_counter()
    seed = detector.config.seed if scene_seed is None else scene_seed
    fit = digit_features(detector, DigitScenes("val", scenes, seed, scene_config), batch_size)
    score = digit_features(detector, DigitScenes("test", scenes, seed, scene_config), batch_size)
    levels = list(fit.features)
    accuracy = np.full((len(levels), seeds, len(BUCKETS)), np.nan)
    for s in range(seeds):
        rng = np.random.default_rng(s)
        fit_rows = rng.integers(0, len(fit.labels), len(fit.labels))  # a bootstrap resample
        score_rows = rng.integers(0, len(score.labels), len(score.labels))
        sizes = score.sizes[score_rows]
        for i, name in enumerate(levels):
            probe = fit_softmax(fit.features[name][fit_rows], fit.labels[fit_rows], NUM_DIGITS, steps, l2)
            right = probe.predict(score.features[name][score_rows]) == score.labels[score_rows]
            for j, bucket in enumerate(BUCKETS):
                chosen = right if bucket == "all" else right[sizes == bucket]
                if len(chosen):
                    accuracy[i, s, j] = chosen.mean()
    counts = {b: int(len(score.sizes) if b == "all" else (score.sizes == b).sum()) for b in BUCKETS}
    return ProbeResult(detector.config.setting, levels, accuracy, counts,
                       {name: fit.features[name].shape[1] for name in levels}, len(fit.labels), seed,
                       seconds=time.perf_counter() - start)


def format_probe_table(results) -> str:
    """A markdown table: one row per (detector, level), accuracy in % as mean ± std over seeds."""
    results = [results] if isinstance(results, ProbeResult) else list(results)
    first = results[0]
    head = "| detector | level | channels | " + " | ".join(
        f"{b} ({first.counts[b]})" for b in first.buckets) + " |"
    lines = [head, "|" + " --- |" * (3 + len(first.buckets))]
    for r in results:
        for name in r.levels:
            cells = [f"{100 * r.mean(name, b):.1f} ± {100 * r.std(name, b):.1f}" if r.counts[b] else "-"
                     for b in r.buckets]  # "-": no scored digit of that size
            lines.append(f"| {r.setting} | {name} | {r.channels[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_probe(results, sizes=("small", "medium", "large")):
    """A bar chart by object size: one panel per size, levels 2..5 on the x axis, bars for the
    first result's C_k and P_k and every other result's P_k, each with its std over seeds as an
    error bar, and chance (10 %) dotted. Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    results = [results] if isinstance(results, ProbeResult) else list(results)
    series = [(r, kind) for i, r in enumerate(results) for kind in (("C", "P") if i == 0 else ("P",))
              if f"{kind}2" in r.levels]
    colours = ["tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:purple"]
    width = 0.8 / len(series)
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.7 * len(sizes), 3.8), sharey=True, squeeze=False)
    levels = np.arange(2, 6)
    for ax, size in zip(axes[0], sizes):
        for j, (r, kind) in enumerate(series):
            means = [100 * r.mean(f"{kind}{k}", size) for k in levels]
            stds = [100 * r.std(f"{kind}{k}", size) for k in levels]
            ax.bar(levels + (j - (len(series) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
                   color=colours[j % len(colours)], label=f"{r.setting}: {kind}_k")
        ax.axhline(100 / NUM_DIGITS, color="black", linestyle=":", linewidth=1, label="chance (10 %)")
        ax.set_xticks(levels, [f"level {k}" for k in levels])
        ax.set_title(f"{size} digits ({results[0].counts[size]} scored)", fontsize=10)
    axes[0][0].set_ylabel("probe accuracy, % (± std over seeds)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Which levels name the digit? A linear probe on each level's features pooled in its box",
                 fontsize=11)
    fig.tight_layout()
    return fig


# ---- gradient norms per level: what the detection loss asks of each level of the backbone ------

def gradient_norms(detector, batches: int = 20, batch_size: int = 8, seed: int | None = None,
                   scene_config=None) -> dict:
    """At ``detector``'s current weights (unchanged: running statistics are put back), the mean
    over ``batches`` training batches of ``batch_size`` scenes (the train split of ``seed``,
    default ``detector.config.seed``; train mode, as in training) of:

    * "dC": the L2 norm of the loss's gradient that reaches each of C2..C5 from the FPN (the
      lateral connections and, for C5, also P6's path), per image: (N, C_k, H_k, W_k) summed
      over all entries, divided by the batch size. It is computed for a frozen level too (which
      training skips: ``Conv2d.needs_input_grad``): what the loss asks of a map it cannot change;
    * "stage": the L2 norm of the parameter gradient of the stem (conv1, bn1) and of each stage
      layer1..layer4, 0.0 for a part that ``freeze_at`` freezes (its backward never runs).

    Returns {"dC": {"C2": ..., ...}, "stage": {"stem": ..., "layer1": ..., ...}, "batches": n}.
    Host floats; the detector must have a pyramid (``detector.fpn``)."""
    if not hasattr(detector, "fpn"):
        raise ValueError(f"gradient_norms: setting {detector.config.setting!r} has no FPN; the norms "
                         f"of the gradient from the FPN into C2..C5 need one")
    seed = detector.config.seed if seed is None else seed
    scenes = DigitScenes("train", batches * batch_size, seed, scene_config)
    rng = np.random.default_rng(0)
    buffers = detector.state_dict()  # train mode moves batch norm's running averages: put them back
    backbone = detector.backbone
    parts = {"stem": [backbone.conv1, backbone.bn1],
             **{f"layer{k}": [stage] for k, stage in enumerate(backbone.stages, start=1)}}
    sums = {"dC": dict.fromkeys(["C2", "C3", "C4", "C5"], 0.0), "stage": dict.fromkeys(parts, 0.0)}
    was_training = detector.training
    skipped = [conv for conv in detector.fpn.inner_blocks if not conv.needs_input_grad]
    for conv in skipped:  # the laterals on frozen levels: compute their dC_k here too
        conv.needs_input_grad = True
    detector.train()
    try:
        for b in range(batches):
            images, boxes, labels = scenes.batch(range(b * batch_size, (b + 1) * batch_size))
            detector.zero_grad()
            detector.loss(to_device(images, detector.backend), boxes, labels, rng)
            d_c = detector.fpn.backward(detector.head_backward())  # [dC2, dC3, dC4, dC5]
            backbone.backward(d_c)
            for k, d in zip(("C2", "C3", "C4", "C5"), d_c):
                sums["dC"][k] += _norm(d) / batch_size
            for name, modules in parts.items():
                grads = [p.grad for m in modules for p in m.parameters()]
                sums["stage"][name] += float(np.sqrt(sum(_norm(g) ** 2 for g in grads)))
    finally:
        for conv in skipped:
            conv.needs_input_grad = False
        detector.load_state_dict(buffers)
        detector.zero_grad()
        detector.train(was_training)
    return {group: {k: v / batches for k, v in values.items()} for group, values in sums.items()} | {
        "batches": batches}


def _norm(a) -> float:
    """The L2 norm of every entry of ``a`` (a device or host array), as a host float; 0 for None."""
    return 0.0 if a is None else float(np.sqrt((to_numpy(a).astype(np.float64) ** 2).sum()))


__all__ = ["BUCKETS", "DigitFeatures", "L2", "NUM_DIGITS", "ProbeResult", "STEPS", "SoftmaxProbe",
           "box_cells", "digit_features", "fit_softmax", "format_probe_table", "gradient_norms", "level_maps",
           "plot_probe", "pool_box", "probe_levels"]
