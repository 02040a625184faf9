"""Which RoIs the Fast R-CNN head learns from, and what; and its detections at test time
(paper, Sec. 4.2, following Fast R-CNN). Host-side NumPy bookkeeping, one image at a time.

Training: the image's ground-truth boxes are appended to its proposals (as torchvision does, so
every object has at least one perfect RoI), each RoI is labelled by its best IoU with a box,
``batch_size_per_image`` are sampled with at most ``positive_fraction`` positive, and each
positive gets the regression target of its box. Test: every class's box is decoded from its own
deltas, then clipped, thresholded and suppressed per class.

Box-coder weights: the deltas of ``encode`` multiplied by (10, 10, 5, 5), torchvision's RoI
heads' ``BoxCoder`` weights (Detectron's BBOX_REG_WEIGHTS): RoIs already sit near their objects,
so raw deltas are small (about 0.1 for the centre, 0.2 for the log-size); scaled, they are of
order 1, where a Smooth L1 with beta = 1/9 is mostly in its L1 part, as for the RPN's deltas.
"""
from __future__ import annotations

import numpy as np

from .. import functional as F
from ..backend import to_numpy
from .anchors import sample_anchors
from .boxes import batched_nms, box_iou, clip_boxes, decode, encode
from .postprocess import MIN_BOX_SIZE

BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # (wx, wy, ww, wh), torchvision's RoI heads


def encode_rois(gt_boxes, rois, weights=BOX_CODER_WEIGHTS) -> np.ndarray:
    """Weighted regression targets: ``encode(gt_boxes, rois) * weights``. (R, 4), (R, 4) -> (R, 4);
    equal to torchvision's ``BoxCoder(weights).encode_single``."""
    return encode(gt_boxes, rois) * np.asarray(weights, np.float64)


def decode_rois(deltas, rois, weights=BOX_CODER_WEIGHTS) -> np.ndarray:
    """The inverse of ``encode_rois``: ``decode(deltas / weights, rois)``. (R, 4), (R, 4) -> (R, 4);
    equal to torchvision's ``BoxCoder(weights).decode_single`` (the same log-size clamp)."""
    return decode(np.asarray(deltas, np.float64) / np.asarray(weights, np.float64), rois)


def match_rois(rois, gt_boxes, fg_iou: float = 0.5, bg_iou=(0.0, 0.5)):
    """Label each RoI 1 (object), 0 (background) or -1 (ignored) by its best IoU with a box.

    Object: best IoU >= fg_iou. Background: bg_iou[0] <= best IoU < bg_iou[1]. The rest are
    ignored. No low-quality matches (unlike the RPN's anchors): the appended ground-truth boxes
    already give every object a positive. With no boxes the best IoU is 0.
    rois (R, 4), gt_boxes (G, 4) -> labels (R,) int64, matched (R,) int64 index into gt_boxes
    (-1 where not positive).
    """
    R = len(rois)
    if len(gt_boxes):
        iou = box_iou(rois, gt_boxes)  # (R, G)
        best_gt = iou.argmax(axis=1)
        best_iou = iou[np.arange(R), best_gt]
    else:
        best_gt, best_iou = np.zeros(R, np.int64), np.zeros(R)
    labels = np.full(R, -1, dtype=np.int64)
    labels[(best_iou >= bg_iou[0]) & (best_iou < bg_iou[1])] = 0
    labels[best_iou >= fg_iou] = 1
    matched = np.where(labels == 1, best_gt, -1).astype(np.int64)
    return labels, matched


def sample_rois(proposals, gt_boxes, gt_labels, rng, batch_size_per_image: int = 128,
                positive_fraction: float = 0.25, fg_iou: float = 0.5, bg_iou=(0.0, 0.5),
                weights=BOX_CODER_WEIGHTS):
    """The RoIs of one image that the Fast R-CNN head trains on.

    proposals (Q, 4), gt_boxes (G, 4) (x1, y1, x2, y2, pixels), gt_labels (G,) ints in [0, K):
    the boxes are appended to the proposals, labelled by ``match_rois``, and up to
    ``batch_size_per_image`` are sampled, at most ``positive_fraction`` positive (Fast R-CNN: 25%
    with IoU >= 0.5; background in [0.1, 0.5) there, in [0, 0.5) in Detectron and torchvision,
    whose interval is the default here). Returns, in the order of the Q + G candidates:
        rois (R, 4) float64, R <= batch_size_per_image;
        labels (R,) int64: 0 background, 1 + gt_label for an object (class 0 is background);
        regression_targets (R, 4) float64: ``encode_rois`` of each positive's box, 0 elsewhere.
    128 RoIs, not the paper's 512: a 128 x 128 scene holds a few digits and a few hundred
    proposals, so 32 positives already cover every object several times.
    """
    proposals = np.asarray(to_numpy(proposals), np.float64).reshape(-1, 4)
    gt_boxes = np.asarray(to_numpy(gt_boxes), np.float64).reshape(-1, 4)
    gt_labels = np.asarray(to_numpy(gt_labels), np.int64).reshape(-1)
    candidates = np.concatenate([proposals, gt_boxes])  # torchvision's add_gt_proposals
    match, matched = match_rois(candidates, gt_boxes, fg_iou, bg_iou)
    sampled = sample_anchors(match, rng, batch_size_per_image, positive_fraction)
    is_positive = match[sampled] == 1
    positives = sampled[is_positive]
    labels = np.zeros(len(sampled), np.int64)
    labels[is_positive] = 1 + gt_labels[matched[positives]]
    targets = np.zeros((len(sampled), 4))
    targets[is_positive] = encode_rois(gt_boxes[matched[positives]], candidates[positives], weights)
    return candidates[sampled], labels, targets


def decode_detections(cls_score, bbox_pred, rois, image_size, score_threshold: float = 0.05,
                      nms_iou: float = 0.5, max_detections: int = 100,
                      weights=BOX_CODER_WEIGHTS) -> dict:
    """Detections of one image from the Fast R-CNN head, as torchvision's
    ``RoIHeads.postprocess_detections``.

    cls_score (R, K + 1) logits, bbox_pred (R, 4 * (K + 1)) deltas (host or device; copied to
    the host here), rois (R, 4), image_size (H, W). Every (RoI, class) pair but background is a
    candidate: its box decoded from that class's deltas, clipped to the image; pairs with
    softmax score <= score_threshold or a side <= MIN_BOX_SIZE are dropped, NMS runs per class,
    and the best max_detections are kept. Returns {"boxes": (D, 4) float32, "scores": (D,),
    "labels": (D,) int64 in [0, K)}, best score first (labels as the data set's: class - 1).
    """
    logits = to_numpy(cls_score).astype(np.float64)
    deltas = to_numpy(bbox_pred).astype(np.float64)
    rois = np.asarray(to_numpy(rois), np.float64).reshape(-1, 4)
    R, K1 = logits.shape
    probs = F.softmax(logits, axis=1)
    boxes = decode_rois(deltas.reshape(R * K1, 4), np.repeat(rois, K1, axis=0), weights)
    boxes = clip_boxes(boxes, *image_size).reshape(R, K1, 4)[:, 1:].reshape(-1, 4)
    scores = probs[:, 1:].reshape(-1)  # (R * K,), RoI-major like the boxes
    labels = np.tile(np.arange(K1 - 1, dtype=np.int64), R)
    wide = ((boxes[:, 2] - boxes[:, 0]) > MIN_BOX_SIZE) & ((boxes[:, 3] - boxes[:, 1]) > MIN_BOX_SIZE)
    kept = (scores > score_threshold) & wide
    boxes, scores, labels = boxes[kept], scores[kept], labels[kept]
    keep = batched_nms(boxes, scores, labels, nms_iou)[:max_detections]
    return {"boxes": boxes[keep].astype(np.float32), "scores": scores[keep], "labels": labels[keep]}
