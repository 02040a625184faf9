"""Training targets for a batch: which anchors learn what (paper, Sec. 4.1). Host-side NumPy.

For each image, every anchor is labelled object / background / ignored against the image's
boxes (``match_anchors``), a few are sampled (``sample_anchors``), and each sampled positive
gets the regression target of the box it matches (``encode``). Indices are flat over the batch,
``n * T + a`` for anchor a of image n (T anchors per image), so that one gather on the head's
flattened outputs (N * T rows) picks every sampled anchor of the batch at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anchors import match_anchors, sample_anchors
from .boxes import encode


@dataclass
class Targets:
    """What the loss needs, for a batch of N images with T anchors each (S sampled, P positive).

    cls_index (S,) int64: flat anchor rows n * T + a that the classifier learns on;
    cls_target (S,) int64: 0 for background, 1 + label for an object;
    box_index (P,) int64: flat rows of the sampled positives, which also learn their box;
    box_target (P, 4) float64: (dx, dy, dw, dh) of each positive's matched box (``encode``).
    """

    cls_index: np.ndarray
    cls_target: np.ndarray
    box_index: np.ndarray
    box_target: np.ndarray

    def rows(self, start: int, stop: int, T: int) -> Targets:
        """The targets of images start..stop-1 of the batch, indexed as a batch of their own
        (rows n * T + a with n counted from ``start``): a rank's part of the global batch."""
        keep_cls = (self.cls_index >= start * T) & (self.cls_index < stop * T)
        keep_box = (self.box_index >= start * T) & (self.box_index < stop * T)
        return Targets(self.cls_index[keep_cls] - start * T, self.cls_target[keep_cls],
                       self.box_index[keep_box] - start * T, self.box_target[keep_box])


def image_targets(anchors, gt_boxes, gt_labels, rng, positive_iou, negative_iou, anchors_per_image,
                  positive_fraction):
    """Targets of one image: anchors (T, 4), gt_boxes (G, 4), gt_labels (G,) ints ->
    (sampled (S,), cls_target (S,), positives (P,), box_target (P, 4)), indices into anchors."""
    match, matched = match_anchors(anchors, gt_boxes, positive_iou, negative_iou)
    sampled = sample_anchors(match, rng, anchors_per_image, positive_fraction)
    is_positive = match[sampled] == 1
    positives = sampled[is_positive]
    cls_target = np.zeros(len(sampled), np.int64)
    cls_target[is_positive] = 1 + gt_labels[matched[positives]]
    box_target = encode(gt_boxes[matched[positives]], anchors[positives])
    return sampled, cls_target, positives, box_target


def batch_targets(anchors, boxes, labels, rng, positive_iou=0.7, negative_iou=0.3,
                  anchors_per_image=256, positive_fraction=0.5) -> Targets:
    """Targets of a batch: anchors (T, 4) of one image (every image has the same); boxes: list
    of N host arrays (G_n, 4) (x1, y1, x2, y2); labels: list of N (G_n,) ints in [0, K)."""
    T = len(anchors)
    cls_index, cls_target, box_index, box_target = [], [], [], []
    for n, (gt_boxes, gt_labels) in enumerate(zip(boxes, labels)):
        gt_boxes = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
        gt_labels = np.asarray(gt_labels, np.int64).reshape(-1)
        sampled, target, positives, deltas = image_targets(
            anchors, gt_boxes, gt_labels, rng, positive_iou, negative_iou, anchors_per_image,
            positive_fraction)
        cls_index.append(n * T + sampled)
        cls_target.append(target)
        box_index.append(n * T + positives)
        box_target.append(deltas)
    return Targets(np.concatenate(cls_index), np.concatenate(cls_target),
                   np.concatenate(box_index), np.concatenate(box_target).reshape(-1, 4))
