"""COCO-style detection metrics, written to be read: AP@[.5:.95], AP50, AP75, AP by object size,
and AR@1/10/100 and AR by size, with the same rules as pycocotools' COCOeval (a test checks
that the numbers agree to 1e-4).

The recipe, for each class, area range and IoU threshold t:
 1. In each image, sort detections by score and keep the best ``max_det``. Ground truths outside
    the area range are "ignored": matching one neither helps nor hurts.
 2. Each detection, best first, takes the unmatched ground truth it overlaps most (IoU >= t),
    preferring real ground truths to ignored ones. Matched: a true positive. Unmatched: a false
    positive, unless its own box lies outside the area range (then it is ignored too).
 3. Pool the detections of all images, sort by score, and trace precision against recall.
    Make precision non-increasing from the right, and read it at 101 recall points 0, .01 .. 1.
AP is the mean of those precisions over recall points, IoU thresholds and classes that have
ground truth; AR is the final recall, averaged over IoU thresholds and classes.
Host-only NumPy.
"""
from __future__ import annotations

import numpy as np

from .boxes import AREA_RANGES, box_area, box_iou

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
MAX_DETS = (1, 10, 100)


def _match_image(det_boxes, det_scores, gt_boxes, area_range, max_det):
    """One image, one class, one area range. Returns, per kept detection (best first):
    scores (D,), matched (T, D) bool, ignored (T, D) bool, and the count of real ground truths."""
    lo, hi = area_range
    gt_area = box_area(gt_boxes)
    gt_ignored = (gt_area < lo) | (gt_area > hi)
    gt_order = np.argsort(gt_ignored, kind="stable")  # real ground truths first
    gt_boxes, gt_ignored = gt_boxes[gt_order], gt_ignored[gt_order]
    order = np.argsort(-det_scores, kind="mergesort")[:max_det]
    det_boxes, det_scores = det_boxes[order], det_scores[order]
    iou = box_iou(det_boxes, gt_boxes)  # (D, G)
    T, D, G = len(IOU_THRESHOLDS), len(det_boxes), len(gt_boxes)
    matched = np.zeros((T, D), bool)
    ignored = np.zeros((T, D), bool)
    for t, threshold in enumerate(IOU_THRESHOLDS):
        gt_taken = np.zeros(G, bool)
        for d in range(D):
            best, best_iou = -1, min(threshold, 1 - 1e-10)
            for g in range(G):
                if gt_taken[g]:
                    continue
                if best > -1 and not gt_ignored[best] and gt_ignored[g]:
                    break  # a real match beats any ignored one, and ignored ones come last
                if iou[d, g] < best_iou:
                    continue
                best, best_iou = g, iou[d, g]
            if best > -1:
                gt_taken[best] = True
                matched[t, d] = True
                ignored[t, d] = gt_ignored[best]
    det_area = box_area(det_boxes)
    outside = (det_area < lo) | (det_area > hi)
    ignored |= ~matched & outside[None, :]
    return det_scores, matched, ignored, int((~gt_ignored).sum())


def _precision_recall(per_image, max_det):
    """Pool one class's images; returns precision (T, 101) and recall (T,), or None if the class
    has no real ground truth in this area range."""
    scores, matched, ignored, n_gt = [], [], [], 0
    for s, m, ig, g in per_image:
        scores.append(s[:max_det])
        matched.append(m[:, :max_det])
        ignored.append(ig[:, :max_det])
        n_gt += g
    if n_gt == 0:
        return None
    scores = np.concatenate(scores)
    order = np.argsort(-scores, kind="mergesort")
    matched = np.concatenate(matched, axis=1)[:, order]
    ignored = np.concatenate(ignored, axis=1)[:, order]
    tp = np.cumsum(matched & ~ignored, axis=1).astype(np.float64)
    fp = np.cumsum(~matched & ~ignored, axis=1).astype(np.float64)
    T = len(IOU_THRESHOLDS)
    precision = np.zeros((T, len(RECALL_POINTS)))
    recall = np.zeros(T)
    for t in range(T):
        rc = tp[t] / n_gt
        pr = tp[t] / (tp[t] + fp[t] + np.spacing(1))
        recall[t] = rc[-1] if len(rc) else 0.0
        pr = np.maximum.accumulate(pr[::-1])[::-1] if len(pr) else pr  # non-increasing
        idx = np.searchsorted(rc, RECALL_POINTS, side="left")
        valid = idx < len(pr)
        precision[t, valid] = pr[idx[valid]]
    return precision, recall


def _class_curves(detections, ground_truths, num_classes, area_range, max_det):
    """Precision (classes, T, 101) and recall (classes, T) of one area range and max_det, over
    the classes that have real ground truth there."""
    precisions, recalls = [], []
    for k in range(num_classes):
        per_image = []
        for det, gt in zip(detections, ground_truths):
            dk = np.asarray(det["labels"]) == k
            gk = np.asarray(gt["labels"]) == k
            per_image.append(_match_image(
                np.asarray(det["boxes"], np.float64).reshape(-1, 4)[dk],
                np.asarray(det["scores"], np.float64)[dk],
                np.asarray(gt["boxes"], np.float64).reshape(-1, 4)[gk],
                area_range, max_det))
        pr = _precision_recall(per_image, max_det)
        if pr is not None:
            precisions.append(pr[0])
            recalls.append(pr[1])
    return np.array(precisions), np.array(recalls)


def _mean_or_missing(a) -> float:
    return float(a.mean()) if a.size else -1.0


def _summarize(table, sizes) -> dict:
    """The twelve numbers from {(area, max_det): (precision, recall)}; ``sizes`` are the size
    buckets present ("small", "medium", "large")."""
    precision_all = table["all", 100][0]  # (classes, T, 101)
    results = {"AP": _mean_or_missing(precision_all),
               "AP50": _mean_or_missing(precision_all[:, 0]) if precision_all.size else -1.0,
               "AP75": _mean_or_missing(precision_all[:, 5]) if precision_all.size else -1.0}
    for size in sizes:
        results[f"AP_{size}"] = _mean_or_missing(table[size, 100][0])
    for max_det in MAX_DETS:
        results[f"AR@{max_det}"] = _mean_or_missing(table["all", max_det][1])
    for size in sizes:
        results[f"AR_{size}"] = _mean_or_missing(table[size, 100][1])
    return results


def evaluate(detections, ground_truths, num_classes: int, area_ranges=None) -> dict:
    """COCO-style metrics.

    detections: one dict per image with "boxes" (D, 4) (x1, y1, x2, y2), "scores" (D,),
    "labels" (D,); ground_truths: one dict per image with "boxes" (G, 4) and "labels" (G,).
    Returns {"AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR@1", "AR@10",
    "AR@100", "AR_small", "AR_medium", "AR_large"}; a metric with no ground truth at all is -1.
    """
    area_ranges = AREA_RANGES if area_ranges is None else area_ranges
    if len(detections) != len(ground_truths):
        raise ValueError(f"evaluate: {len(detections)} detection lists for "
                         f"{len(ground_truths)} images")
    table = {}  # (area, max_det) -> (precisions, recalls); by size only at max_det = 100
    for area_name, area_range in area_ranges.items():
        for max_det in (MAX_DETS if area_name == "all" else MAX_DETS[-1:]):
            table[area_name, max_det] = _class_curves(detections, ground_truths, num_classes,
                                                      area_range, max_det)
    return _summarize(table, [s for s in ("small", "medium", "large") if s in area_ranges])


def without_labels(items) -> list[dict]:
    """Detections or ground truths (dicts with "labels") with every label set to 0. ``evaluate``
    on both with num_classes = 1 is class-agnostic: it scores finding the objects, apart from
    naming them (a detection of the wrong digit then counts as found)."""
    return [{**item, "labels": np.zeros_like(np.asarray(item["labels"]))} for item in items]


def format_metrics(metrics: dict) -> str:
    """A small table: AP and AR overall and by object size."""
    rows = [("", "all", "small", "medium", "large"),
            ("AP@[.5:.95]", metrics["AP"], metrics.get("AP_small"), metrics.get("AP_medium"),
             metrics.get("AP_large")),
            ("AR@100", metrics["AR@100"], metrics.get("AR_small"), metrics.get("AR_medium"),
             metrics.get("AR_large"))]
    lines = ["".join(f"{c if isinstance(c, str) else f'{c:.3f}':>12}" for c in row)
             for row in rows]
    lines.append(f"AP50 {metrics['AP50']:.3f}   AP75 {metrics['AP75']:.3f}   "
                 f"AR@1 {metrics['AR@1']:.3f}   AR@10 {metrics['AR@10']:.3f}")
    return "\n".join(lines)
