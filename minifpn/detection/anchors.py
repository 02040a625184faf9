"""Anchors, and the labelling of anchors as positive or negative for training (paper, Sec. 4.1).

"we define the anchors to have areas of {32^2, 64^2, 128^2, 256^2, 512^2} pixels on
{P2, P3, P4, P5, P6} respectively ... anchors of multiple aspect ratios {1:2, 1:1, 2:1}".
On our 128 x 128 canvas (about 1/6 of the paper's 800-pixel images) the sizes are 8, 16, 32,
64, 128 pixels: two strides, where the paper uses eight. Host-side NumPy.
"""
from __future__ import annotations

import numpy as np

from .boxes import box_iou

ASPECT_RATIOS = (0.5, 1.0, 2.0)  # height / width: 1:2, 1:1, 2:1
ANCHOR_SIZES = {2: 8, 3: 16, 4: 32, 5: 64, 6: 128}  # level -> side of the square anchor, pixels


def cell_anchors(size: float, ratios=ASPECT_RATIOS) -> np.ndarray:
    """The anchors of one feature-map cell, centred on (0, 0): (len(ratios), 4).
    Each has area size^2 and height / width = ratio."""
    ratios = np.asarray(ratios, np.float64)
    h = size * np.sqrt(ratios)
    w = size / np.sqrt(ratios)
    return np.stack([-w / 2, -h / 2, w / 2, h / 2], axis=1)


def grid_anchors(height: int, width: int, stride: int, sizes, ratios=ASPECT_RATIOS) -> np.ndarray:
    """All anchors of one level: (height * width * A, 4), A = len(sizes) * len(ratios), in the
    order (row, column, anchor) that the head's outputs are flattened in. Anchor centres sit at
    the centres of the cells, ((x + 0.5) * stride, (y + 0.5) * stride)."""
    base = np.concatenate([cell_anchors(s, ratios) for s in np.atleast_1d(sizes)])  # (A, 4)
    ys, xs = np.meshgrid((np.arange(height) + 0.5) * stride, (np.arange(width) + 0.5) * stride,
                         indexing="ij")
    centres = np.stack([xs, ys, xs, ys], axis=-1).reshape(-1, 1, 4)
    return (centres + base[None]).reshape(-1, 4)


def match_anchors(anchors: np.ndarray, gt_boxes: np.ndarray, positive_iou: float = 0.7,
                  negative_iou: float = 0.3):
    """Label each anchor 1 (object), 0 (background) or -1 (ignored), with the box it matches.

    Positive: IoU >= positive_iou with some box, or the highest IoU any anchor has with a box
    (so every box gets at least one anchor, however small). Negative: IoU < negative_iou with
    every box. The rest are ignored. anchors (A, 4), gt_boxes (G, 4) ->
    labels (A,) int64, matched (A,) int64 index into gt_boxes (-1 where none).
    """
    A = len(anchors)
    labels = np.full(A, -1, dtype=np.int64)
    matched = np.full(A, -1, dtype=np.int64)
    if len(gt_boxes) == 0:  # a scene with no objects: every anchor is background
        labels[:] = 0
        return labels, matched
    iou = box_iou(anchors, gt_boxes)  # (A, G)
    best_gt = iou.argmax(axis=1)
    best_iou = iou[np.arange(A), best_gt]
    labels[best_iou < negative_iou] = 0
    labels[best_iou >= positive_iou] = 1
    # the best anchors of each box (ties included), if they overlap it at all
    best_per_gt = iou.max(axis=0)
    rows, _ = np.nonzero((iou == best_per_gt[None, :]) & (best_per_gt[None, :] > 0))
    labels[rows] = 1
    matched[labels == 1] = best_gt[labels == 1]  # as torchvision: each anchor's own best box
    return labels, matched


def sample_anchors(labels: np.ndarray, rng: np.random.Generator, batch_size: int = 256,
                   positive_fraction: float = 0.5) -> np.ndarray:
    """Pick up to ``batch_size`` anchors per image, at most ``positive_fraction`` of them
    positive, the rest negative (Faster R-CNN's sampling). Returns their indices (sorted)."""
    positives = np.flatnonzero(labels == 1)
    negatives = np.flatnonzero(labels == 0)
    n_pos = min(len(positives), int(batch_size * positive_fraction))
    n_neg = min(len(negatives), batch_size - n_pos)
    chosen = np.concatenate([rng.choice(positives, n_pos, replace=False),
                             rng.choice(negatives, n_neg, replace=False)])
    return np.sort(chosen)
