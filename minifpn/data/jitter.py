"""Scale jitter: a training batch resized by one scale, its boxes with it. The training-time twin of
the featurized image pyramid (``minifpn.detection.image_pyramid``): a single-scale detector that
sees its objects at the pyramid's scales during training as well as at test time.

A pure function of the batch and the scale; which scale each step draws is the caller's choice.
"""
from __future__ import annotations

import numpy as np

from ..detection.image_pyramid import check_scales, resize_for_scale
from ..functional.checks import check_nchw, integer
from ..models.inputs import TOP_STRIDE


def _scaled_boxes(boxes, factor) -> np.ndarray:
    """boxes (G, 4) times factor (4,), in float64, returned as float32 or the boxes' floating dtype."""
    boxes = np.asarray(boxes)
    dtype = np.result_type(boxes.dtype, np.float32)
    return (boxes.astype(np.float64).reshape(-1, 4) * factor).astype(dtype)


def scale_jitter(images, boxes, scale: float, multiple: int = TOP_STRIDE):
    """Resize a batch by ``scale`` and its boxes with it.

    images (N, C, H, W) floating, on any backend; boxes: a list of N host arrays (G_n, 4),
    (x1, y1, x2, y2) in pixels; scale: a finite number > 0.
    Returns (images (N, C, OH', OW'), boxes: a list of N (G_n, 4) arrays, float32 or
    the boxes' own floating dtype):
    the images are ``resize_for_scale``'s: ``F.resize_bilinear`` to (OH, OW) = (round(H * scale),
    round(W * scale)), padded with zeros at the bottom and right to multiples of ``multiple`` (32:
    what a detector needs; 1: no padding); each box's x becomes x * OW / W and its y, y * OH / H,
    the resize's own map of pixel edges (exact where OW = 2 W or OW = W / 2). Labels do not change.
    """
    (scale,) = check_scales((scale,))
    check_nchw(images, "scale_jitter", "images")
    multiple = integer(multiple, "multiple", "scale_jitter", 1)
    N, _, H, W = images.shape
    if len(boxes) != N:
        raise ValueError(f"scale_jitter: expected one box array per image ({N}), got {len(boxes)}")
    resized, (OH, OW) = resize_for_scale(images, scale, multiple)
    factor = np.array([OW / W, OH / H, OW / W, OH / H])
    return resized, [_scaled_boxes(b, factor) for b in boxes]


__all__ = ["scale_jitter"]
