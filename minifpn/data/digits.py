"""Multi-scale scenes of real handwritten digits: the data set FPN is for.

The 1,797 8x8 digits that ship inside scikit-learn (``load_digits``, no download) are placed on
a canvas at sizes drawn log-uniformly from ``min_size`` to ``max_size`` pixels, so that small,
medium and large objects all occur. Each box is the tight box around the digit's ink; labels are
the digits 0-9. Train/val/test use disjoint source digits, so a test digit was never seen in
training. Scene ``i`` of a split is a pure function of (seed, split, i).

``SceneConfig.distractors`` adds clutter that is not an object (no box, no label): fragments of
digits, scrambled digits and strokes, at the digits' own sizes, so that ink alone no longer tells
a digit from background (``draw_distractors``; docs/data.md, "Distractors").

Host-only code (NumPy): images are made on the CPU and moved with ``to_device`` by the caller.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..detection.boxes import AREA_RANGES, MEDIUM_AREA, SMALL_AREA, box_area, box_iou  # noqa: F401

SPLITS = {"train": 0, "val": 1, "test": 2}
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)
# the kinds of clutter SceneConfig.distractors draws (see draw_distractors)
DISTRACTOR_KINDS = ("fragment", "scrambled", "stroke")



@lru_cache(maxsize=1)
def load_source_digits():
    """The scikit-learn digits: images (1797, 8, 8) float64 in [0, 1], labels (1797,) int64."""
    from sklearn.datasets import load_digits
    d = load_digits()
    return (d.images / 16.0).astype(np.float64), d.target.astype(np.int64)


def split_indices(split: str, seed: int = 0) -> np.ndarray:
    """Indices of the source digits of ``split`` (70/15/15, disjoint, fixed by ``seed``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    n = len(load_source_digits()[1])
    order = np.random.default_rng(seed).permutation(n)
    a = int(SPLIT_FRACTIONS[0] * n)
    b = a + int(SPLIT_FRACTIONS[1] * n)
    return {"train": order[:a], "val": order[a:b], "test": order[b:]}[split]


def resize_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize of a 2-d image (half-pixel centres, as align_corners=False)."""
    in_h, in_w = image.shape

    def coords(n_out, n_in):
        x = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        x = np.clip(x, 0, n_in - 1)
        lo = np.floor(x).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, x - lo

    r0, r1, fr = coords(out_h, in_h)
    c0, c1, fc = coords(out_w, in_w)
    top = image[r0][:, c0] * (1 - fc) + image[r0][:, c1] * fc
    bottom = image[r1][:, c0] * (1 - fc) + image[r1][:, c1] * fc
    return top * (1 - fr[:, None]) + bottom * fr[:, None]


@dataclass
class SceneConfig:
    """How scenes are drawn. Sizes are the side of the square the 8x8 digit is scaled to."""

    canvas: int = 128
    min_size: float = 6.0
    max_size: float = 80.0
    min_objects: int = 1
    max_objects: int = 5
    max_iou: float = 0.0  # boxes of one scene may not overlap beyond this IoU
    noise: float = 0.05  # std of the pixel noise in the background
    texture: float = 0.15  # amplitude of a smooth background texture
    ink_threshold: float = 0.2  # a pixel is ink above this fraction of the digit's maximum
    distractors: int = 0  # clutter patches per scene (no box, no label); 0: none, the scene unchanged
    distractor_kinds: tuple = DISTRACTOR_KINDS  # drawn uniformly from these
    distractor_max_iou: float = 0.0  # a distractor's square may overlap no digit's box beyond this IoU

    def __post_init__(self):
        whole = isinstance(self.distractors, (int, np.integer)) and not isinstance(self.distractors, bool)
        if not whole or self.distractors < 0:
            raise ValueError(f"distractors must be an integer >= 0, got {self.distractors!r}")
        kinds = tuple(self.distractor_kinds)
        unknown = [k for k in kinds if k not in DISTRACTOR_KINDS]
        if not kinds or unknown:
            raise ValueError(f"distractor_kinds must be a non-empty subset of {DISTRACTOR_KINDS}, "
                             f"got {kinds}")
        self.distractor_kinds = kinds
        if not 0.0 <= self.distractor_max_iou < 1.0:
            raise ValueError(f"distractor_max_iou must be in [0, 1), got {self.distractor_max_iou}")


def _texture(rng, canvas: int, amplitude: float) -> np.ndarray:
    """A smooth random background: a coarse random grid resized up bilinearly."""
    coarse = rng.random((6, 6))
    return amplitude * resize_bilinear(coarse, canvas, canvas)


def make_scene(rng: np.random.Generator, pool: np.ndarray, config: SceneConfig | None = None):
    """Draw one scene from source digits ``pool`` (indices into the sklearn digits).

    Returns image (1, canvas, canvas) float32 in [0, 1], boxes (B, 4) float32 as
    (x1, y1, x2, y2) in pixels (x2, y2 exclusive), labels (B,) int64.
    """
    config = SceneConfig() if config is None else config
    images, labels = load_source_digits()
    c = config.canvas
    canvas = _texture(rng, c, config.texture) + rng.normal(0, config.noise, (c, c))
    boxes, classes = [], []
    n = rng.integers(config.min_objects, config.max_objects + 1)
    for _ in range(n):
        source = pool[rng.integers(len(pool))]
        size = int(round(np.exp(rng.uniform(np.log(config.min_size), np.log(config.max_size)))))
        digit = resize_bilinear(images[source], size, size)
        ink = digit > config.ink_threshold * digit.max()
        rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        for _attempt in range(30):
            top, left = rng.integers(0, c - size + 1, size=2)
            box = np.array([left + c0, top + r0, left + c1, top + r1], np.float64)
            if not boxes or box_iou(box, np.array(boxes)).max() <= config.max_iou:
                region = canvas[top:top + size, left:left + size]
                np.maximum(region, digit, out=region)
                boxes.append(box)
                classes.append(labels[source])
                break
    if config.distractors:  # drawn after the digits, so a scene's digits never depend on them
        draw_distractors(rng, canvas, pool, np.array(boxes, np.float64).reshape(-1, 4), config)
    image = np.clip(canvas, 0, 1).astype(np.float32)[None]
    return (image, np.array(boxes, np.float32).reshape(-1, 4), np.array(classes, np.int64))


def _fragment(rng, source: np.ndarray, size: int) -> np.ndarray:
    """A piece of a digit: an h x w window (h, w in 3..5) of the 8x8 ``source``, resized so its
    longer side is ``size`` (its strokes are those of a digit 8/5 to 8/3 times larger)."""
    for _attempt in range(10):  # a window of blank margin is no clutter: try another
        h, w = rng.integers(3, 6, size=2)
        top, left = rng.integers(0, 8 - h + 1), rng.integers(0, 8 - w + 1)
        window = source[top:top + h, left:left + w]
        if window.max() >= 0.5:
            break
    longer = max(h, w)
    return resize_bilinear(window, max(2, round(size * h / longer)), max(2, round(size * w / longer)))


def _scrambled(rng, source: np.ndarray, size: int) -> np.ndarray:
    """A digit whose sixteen 2x2 blocks are shuffled: the same ink, strokes and size, no digit."""
    blocks = source.reshape(4, 2, 4, 2).transpose(0, 2, 1, 3).reshape(16, 2, 2)
    blocks = blocks[rng.permutation(16)].reshape(4, 4, 2, 2).transpose(0, 2, 1, 3).reshape(8, 8)
    return resize_bilinear(blocks, size, size)


def _stroke(rng, size: int) -> np.ndarray:
    """One straight pen stroke across a size x size square, as thick as a digit's stroke there
    (about size / 8 px, at least 1 px), with a soft 1-px edge."""
    ends = rng.uniform(0, size, size=(2, 2))  # (x, y) of both ends
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    d = ends[1] - ends[0]
    t = np.clip(((xs - ends[0, 0]) * d[0] + (ys - ends[0, 1]) * d[1]) / max(d @ d, 1e-9), 0, 1)
    dist = np.hypot(xs - ends[0, 0] - t * d[0], ys - ends[0, 1] - t * d[1])
    half = max(0.5, size / 16)
    return np.clip(half + 0.5 - dist, 0, 1) * rng.uniform(0.7, 1.0)


def draw_distractors(rng: np.random.Generator, canvas: np.ndarray, pool: np.ndarray,
                     boxes: np.ndarray, config: SceneConfig) -> int:
    """Draw ``config.distractors`` clutter patches onto ``canvas`` (canvas, canvas) in place, with
    ``max`` as the digits are; returns how many were placed. ``boxes`` (B, 4): the scene's digits.

    Each patch is a kind from ``config.distractor_kinds`` at a size drawn as the digits' sizes are
    (log-uniform in [min_size, max_size]): "fragment", a window of a digit (``_fragment``);
    "scrambled", a digit with shuffled 2x2 blocks (``_scrambled``); "stroke", one pen stroke
    (``_stroke``). Source digits come from ``pool``, the split's own, so a test scene's clutter
    holds no train digit. A patch's square may overlap no digit's box beyond
    ``config.distractor_max_iou`` (up to 30 tries, then it is left out); patches may overlap each
    other. They get no box and no label: to the detector they are background."""
    images, _ = load_source_digits()
    c, placed = config.canvas, 0
    for _ in range(config.distractors):
        kind = config.distractor_kinds[rng.integers(len(config.distractor_kinds))]
        size = int(round(np.exp(rng.uniform(np.log(config.min_size), np.log(config.max_size)))))
        source = images[pool[rng.integers(len(pool))]]
        patch = (_fragment(rng, source, size) if kind == "fragment" else
                 _scrambled(rng, source, size) if kind == "scrambled" else _stroke(rng, size))
        h, w = patch.shape
        for _attempt in range(30):
            top, left = rng.integers(0, c - h + 1), rng.integers(0, c - w + 1)
            square = np.array([left, top, left + w, top + h], np.float64)
            if not len(boxes) or box_iou(square, boxes).max() <= config.distractor_max_iou:
                region = canvas[top:top + h, left:left + w]
                np.maximum(region, patch, out=region)
                placed += 1
                break
    return placed


class DigitScenes:
    """A reproducible set of ``n`` scenes of one split: ``scenes[i] -> (image, boxes, labels)``.

    image: (1, canvas, canvas) float32; boxes: (B, 4) float32 (x1, y1, x2, y2); labels: (B,).
    """

    def __init__(self, split: str = "train", n: int = 1000, seed: int = 0,
                 config: SceneConfig | None = None):
        self.split, self.n, self.seed = split, n, seed
        self.config = config or SceneConfig()
        self.pool = split_indices(split, seed)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(f"scene {i} out of range for {self.n} scenes")
        rng = np.random.default_rng([self.seed, SPLITS[self.split], i])
        return make_scene(rng, self.pool, self.config)

    def batch(self, indices):
        """images (B, 1, canvas, canvas) float32, and lists of boxes and labels."""
        scenes = [self[i] for i in indices]
        return (np.stack([s[0] for s in scenes]), [s[1] for s in scenes], [s[2] for s in scenes])


def size_bucket(boxes: np.ndarray) -> np.ndarray:
    """"small", "medium" or "large" for each box (B, 4), by area (see AREA_RANGES)."""
    area = box_area(boxes)
    return np.where(area < SMALL_AREA, "small", np.where(area < MEDIUM_AREA, "medium", "large"))
