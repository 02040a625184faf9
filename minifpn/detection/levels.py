"""Which pyramid level an RoI is pooled from: the paper's Eq. (1),

    k = floor(k0 + log2(sqrt(w h) / 224)),

clamped to the levels that exist (P2..P5). An RoI of the canonical size (224 px, the ImageNet
pre-training size, in the paper) goes to level k0 = 4; one half as large to k0 - 1, and so on.
"""
from __future__ import annotations

import numbers

from ..backend import get_array_module
from ..functional.checks import integer

EPS = 1e-6  # added before the floor, as torchvision's LevelMapper, so that exact powers of two
# of the canonical size land on their own level despite rounding in log2


def check_level_args(k_min, k_max, canonical_size, canonical_level, op: str):
    """Check Eq. (1)'s settings (ints 0 <= k_min <= k_max, canonical_level >= 0, a positive
    canonical_size in pixels); return them, the ints as Python ints."""
    k_min = integer(k_min, "k_min", op, 0)
    k_max = integer(k_max, "k_max", op, k_min)
    canonical_level = integer(canonical_level, "canonical_level", op, 0)
    if (not isinstance(canonical_size, numbers.Real) or isinstance(canonical_size, bool)
            or not 0 < canonical_size < float("inf")):
        raise ValueError(f"{op}: canonical_size must be a positive number of pixels, got "
                         f"{canonical_size!r}")
    return k_min, k_max, canonical_size, canonical_level


def map_levels(boxes, k_min=2, k_max=5, canonical_size=224, canonical_level=4):
    """The pyramid level k of each box by Eq. (1), clamped to [k_min, k_max].

    boxes: (R, 4) rows (x1, y1, x2, y2), floating point, on the host or the device
    -> levels: (R,) int64 on the same device, each in [k_min, k_max].
    Equal to torchvision's ``LevelMapper(k_min, k_max, canonical_size, canonical_level)``,
    epsilon 1e-6 and the boxes' dtype included, except that LevelMapper returns k - k_min (an
    index into its list of maps) and this returns the level number k itself. A box of zero or
    negative area, or with a NaN coordinate, goes to k_min (LevelMapper: log2 of 0 or of NaN).
    """
    k_min, k_max, canonical_size, canonical_level = check_level_args(
        k_min, k_max, canonical_size, canonical_level, "map_levels")
    if not hasattr(boxes, "ndim") or boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"map_levels: expected boxes of shape (R, 4), rows (x1, y1, x2, y2), got "
                         f"shape {getattr(boxes, 'shape', type(boxes).__name__)}")
    if boxes.dtype.kind != "f":
        raise TypeError(f"map_levels: boxes must be floating point (float32 or float64), got "
                        f"dtype {boxes.dtype}; cast them first, e.g. boxes.astype(np.float32)")
    xp = get_array_module(boxes)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # torchvision's box_area
    area = xp.maximum(area, xp.finfo(boxes.dtype).tiny)  # log2 of 0 is -inf: k_min after the clamp
    size = xp.sqrt(area)  # sqrt(w h): the side of the square of the same area
    k = xp.floor(canonical_level + xp.log2(size / canonical_size) + boxes.dtype.type(EPS))
    k = xp.where(xp.isnan(k), k_min, xp.clip(k, k_min, k_max))  # NaN: a level all the same
    return k.astype(xp.int64)
