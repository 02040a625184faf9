"""From the head's outputs to detections: top-k, decode, clip, drop tiny boxes, NMS. Host-side.

The inverse of training's targets: each anchor's deltas are decoded against the anchor into a
box, and non-maximum suppression keeps one box per object (per class).
"""
from __future__ import annotations

import numpy as np

from .boxes import batched_nms, clip_boxes, decode

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


def postprocess_image(scores, deltas, anchors_per_level, image_size, score_threshold=0.05,
                      nms_iou=0.5, top_k=1000, max_detections=100) -> dict:
    """Detections of one image. scores (T, K): probability of each class (background dropped),
    deltas (T, 4), anchors_per_level: list of (T_l, 4) with sum T_l = T, image_size (H, W).
    Returns {"boxes": (D, 4) float32, "scores": (D,), "labels": (D,) int64}, D <= max_detections,
    best score first."""
    H, W = image_size
    all_boxes, all_scores, all_labels = [], [], []
    start = 0
    for anchors in anchors_per_level:  # top_k per level, as torchvision's RPN
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
    boxes, scores, labels = boxes[wide], scores[wide], labels[wide]
    keep = batched_nms(boxes, scores, labels, nms_iou)[:max_detections]
    return {"boxes": boxes[keep].astype(np.float32), "scores": scores[keep], "labels": labels[keep]}
