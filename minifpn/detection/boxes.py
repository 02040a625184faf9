"""Boxes as (x1, y1, x2, y2) in pixels: IoU, clipping, and the Faster R-CNN box encoding.

Host-side NumPy: matching and decoding are bookkeeping on a few thousand anchors per image.
"""
from __future__ import annotations

import math

import numpy as np

# Object-size buckets for a 128 x 128 canvas, by box area (COCO's 32^2 and 96^2 are for images
# about 5x larger): the metrics, the data set, the docs and the notebooks all use these.
SMALL_AREA = 16 ** 2
MEDIUM_AREA = 40 ** 2
AREA_RANGES = {"all": (0, float("inf")), "small": (0, SMALL_AREA),
               "medium": (SMALL_AREA, MEDIUM_AREA), "large": (MEDIUM_AREA, float("inf"))}

# Largest log-scale change a decoded box may have (torchvision's and Detectron's clamp).
BBOX_CLIP = math.log(1000.0 / 16)


def box_area(boxes: np.ndarray) -> np.ndarray:
    """(B, 4) -> (B,) areas (w * h)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of every pair: a (A, 4), b (B, 4) -> (A, B)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def clip_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Clip (B, 4) boxes to the image [0, width] x [0, height]."""
    boxes = np.array(boxes, np.float64).reshape(-1, 4)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    return boxes


def encode(boxes: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """Regression targets (dx, dy, dw, dh) that move each anchor onto its box (Faster R-CNN):
        dx = (gx - ax) / aw,  dy = (gy - ay) / ah,  dw = log(gw / aw),  dh = log(gh / ah)
    with (x, y) box centres and (w, h) sizes. boxes, anchors: (B, 4) -> (B, 4)."""
    boxes, anchors = np.asarray(boxes, np.float64), np.asarray(anchors, np.float64)
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
    gw, gh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    gx, gy = boxes[:, 0] + 0.5 * gw, boxes[:, 1] + 0.5 * gh
    return np.stack([(gx - ax) / aw, (gy - ay) / ah, np.log(gw / aw), np.log(gh / ah)], axis=1)


def decode(deltas: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """The inverse of ``encode``: deltas (B, 4) applied to anchors (B, 4) -> boxes (B, 4).
    dw, dh are clamped at log(1000/16) so that an untrained head cannot overflow exp."""
    deltas, anchors = np.asarray(deltas, np.float64), np.asarray(anchors, np.float64)
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
    x = ax + deltas[:, 0] * aw
    y = ay + deltas[:, 1] * ah
    w = aw * np.exp(np.minimum(deltas[:, 2], BBOX_CLIP))
    h = ah * np.exp(np.minimum(deltas[:, 3], BBOX_CLIP))
    return np.stack([x - 0.5 * w, y - 0.5 * h, x + 0.5 * w, y + 0.5 * h], axis=1)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression: keep the best box, drop every box overlapping it by more
    than ``iou_threshold``, repeat. boxes (B, 4), scores (B,) -> kept indices, best first."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep = []
    while order.size:
        best = order[0]
        keep.append(best)
        if order.size == 1:
            break
        overlap = box_iou(boxes[best], boxes[order[1:]])[0]
        order = order[1:][overlap <= iou_threshold]
    return np.array(keep, dtype=np.int64)


def batched_nms(boxes, scores, labels, iou_threshold: float) -> np.ndarray:
    """NMS within each label separately (boxes of different digits never suppress each other)."""
    keep = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        keep.extend(idx[nms(boxes[idx], scores[idx], iou_threshold)])
    keep = np.array(keep, dtype=np.int64)
    return keep[np.argsort(-np.asarray(scores)[keep], kind="stable")]
