"""From the head's outputs to detections and to the RPN's proposals: top-k, decode, clip, drop
tiny boxes, NMS. Host-side (``rpn_proposals`` takes the head's device outputs and reads them once).

The inverse of training's targets: each anchor's deltas are decoded against the anchor into a
box, and non-maximum suppression keeps one box per object (per class).
"""
from __future__ import annotations

import numpy as np

from .. import functional as F
from ..backend import get_array_module, to_numpy
from .boxes import batched_nms, clip_boxes, decode, nms

MIN_BOX_SIZE = 0.5  # pixels: a box clipped to a sliver thinner than this is dropped


def level_candidates(scores, deltas, anchors, score_threshold: float, top_k: int):
    """One image, one pyramid level: scores (T_l, K) per (anchor, class), deltas (T_l, 4),
    anchors (T_l, 4) -> boxes (D, 4), scores (D,), labels (D,) of the top_k (anchor, class)
    pairs scoring above score_threshold (boxes not yet clipped)."""
    K = scores.shape[1]
    flat = scores.ravel()  # (T_l * K,): anchor-major, class-minor
    candidates = np.flatnonzero(flat > score_threshold)
    if len(candidates) > top_k:
        best = np.argpartition(-flat[candidates], top_k - 1)[:top_k]
        candidates = candidates[best]
    anchor_index, label = candidates // K, candidates % K
    return decode(deltas[anchor_index], anchors[anchor_index]), flat[candidates], label


def image_candidates(scores, deltas, anchors_per_level, image_size, score_threshold: float, top_k: int):
    """One image's candidates over every level: the top_k (anchor, class) pairs of each level
    above score_threshold (``level_candidates``, as torchvision's RPN), decoded, clipped to the
    image, and those with a side <= MIN_BOX_SIZE dropped. scores (T, K), deltas (T, 4),
    anchors_per_level: list of (T_l, 4) with sum T_l = T, image_size (H, W) ->
    boxes (D, 4), scores (D,), labels (D,) int64, level by level."""
    H, W = image_size
    all_boxes, all_scores, all_labels = [], [], []
    start = 0
    for anchors in anchors_per_level:
        end = start + len(anchors)
        boxes, level_scores, labels = level_candidates(scores[start:end], deltas[start:end],
                                                       anchors, score_threshold, top_k)
        all_boxes.append(clip_boxes(boxes, H, W))
        all_scores.append(level_scores)
        all_labels.append(labels)
        start = end
    boxes = np.concatenate(all_boxes)
    scores = np.concatenate(all_scores)
    labels = np.concatenate(all_labels).astype(np.int64)
    wide = ((boxes[:, 2] - boxes[:, 0]) > MIN_BOX_SIZE) & ((boxes[:, 3] - boxes[:, 1]) > MIN_BOX_SIZE)
    return boxes[wide], scores[wide], labels[wide]


def postprocess_image(scores, deltas, anchors_per_level, image_size, score_threshold=0.05,
                      nms_iou=0.5, top_k=1000, max_detections=100) -> dict:
    """Detections of one image. scores (T, K): probability of each class (background dropped),
    deltas (T, 4), anchors_per_level: list of (T_l, 4) with sum T_l = T, image_size (H, W).
    ``image_candidates``, then NMS per class. Returns {"boxes": (D, 4) float32, "scores": (D,),
    "labels": (D,) int64}, D <= max_detections, best score first."""
    boxes, scores, labels = image_candidates(scores, deltas, anchors_per_level, image_size,
                                             score_threshold, top_k)
    keep = batched_nms(boxes, scores, labels, nms_iou)[:max_detections]
    return {"boxes": boxes[keep].astype(np.float32), "scores": scores[keep], "labels": labels[keep]}


def rpn_proposals(logits, deltas, anchors_per_level, image_size, pre_nms_top_n: int = 1000,
                  post_nms_top_n: int = 300, nms_iou: float = 0.7) -> list:
    """The RPN's proposals of each image (Faster R-CNN, Sec. 3.3, per pyramid level as in FPN).

    logits (N, T, 2) (background, object), deltas (N, T, 4), on any backend; anchors_per_level:
    list of host (T_l, 4) with sum T_l = T; image_size (H, W). Per image: ``image_candidates``
    with the pre_nms_top_n anchors of highest objectness p(object) on each level, then NMS at
    ``nms_iou`` over all levels together keeps the best ``post_nms_top_n`` (``nms_top``).
    Returns a list of N host float64 arrays (P_n, 4), P_n <= post_nms_top_n, best first. They
    are plain host numbers, outside the graph: the paper's approximate joint training.
    """
    xp = get_array_module(logits)
    objectness = F.softmax(logits, axis=2)[..., 1:]  # (N, T, 1): p(object) against background
    host = to_numpy(xp.concatenate([objectness, deltas], axis=2))  # one device read
    proposals = []
    for n in range(host.shape[0]):
        boxes, scores, _ = image_candidates(host[n, :, :1], host[n, :, 1:], anchors_per_level,
                                            image_size, 0.0, pre_nms_top_n)
        proposals.append(boxes[nms_top(boxes, scores, nms_iou, post_nms_top_n)])
    return proposals


def nms_top(boxes, scores, iou_threshold: float, count: int) -> np.ndarray:
    """The first ``count`` boxes that greedy NMS (``boxes.nms``) keeps, best first (host).

    Greedy NMS decides each box by the kept boxes ranked above it alone, so NMS on the best m
    boxes keeps exactly the boxes NMS on all would keep among those m. Try m = count, 2 count,
    ... until ``count`` survive or every box was tried: an untrained RPN's boxes barely overlap,
    and NMS over all ~2,000 of them would cost ~2,000 steps for the 300 kept.
    boxes (B, 4), scores (B,) -> indices (<= count,) into boxes."""
    order = np.argsort(-np.asarray(scores), kind="stable")  # as nms orders them
    m = count
    while True:
        top = order[:m]
        keep = top[nms(boxes[top], scores[top], iou_threshold)]
        if len(keep) >= count or m >= len(order):
            return keep[:count]
        m *= 2
