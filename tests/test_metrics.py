"""Our COCO-style metrics against pycocotools' COCOeval on the same detections."""
import contextlib
import io

import numpy as np
import pytest

from minifpn.detection.boxes import AREA_RANGES
from minifpn.detection.metrics import evaluate, format_metrics, without_labels

KEYS = ["AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
        "AR@1", "AR@10", "AR@100", "AR_small", "AR_medium", "AR_large"]


def random_boxes(rng, n, canvas=128):
    size = np.exp(rng.uniform(np.log(4), np.log(70), n))
    aspect = rng.uniform(0.5, 1.5, n)
    w, h = size * np.sqrt(aspect), size / np.sqrt(aspect)
    x1 = rng.uniform(0, canvas - w)
    y1 = rng.uniform(0, canvas - h)
    return np.stack([x1, y1, x1 + w, y1 + h], axis=1)


def synthetic_set(rng, n_images=25, num_classes=4):
    """Ground truths, and detections that jitter, miss, duplicate or invent them; some images
    have no objects, some no detections."""
    gts, dets = [], []
    for i in range(n_images):
        n_gt = 0 if i % 7 == 0 else rng.integers(1, 6)
        boxes = random_boxes(rng, n_gt)
        labels = rng.integers(0, num_classes, n_gt)
        gts.append({"boxes": boxes, "labels": labels})
        if i % 5 == 1:
            dets.append({"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int)})
            continue
        keep = rng.random(n_gt) < 0.8
        jitter = rng.normal(0, 0.08, (n_gt, 4)) * (boxes[:, 2:] - boxes[:, :2]).repeat(2, axis=1)
        d_boxes = [boxes[keep] + jitter[keep]]
        d_labels = [np.where(rng.random(keep.sum()) < 0.85, labels[keep],
                             rng.integers(0, num_classes, keep.sum()))]
        n_fp = rng.integers(0, 5)
        d_boxes.append(random_boxes(rng, n_fp))
        d_labels.append(rng.integers(0, num_classes, n_fp))
        if n_gt:  # a duplicate of the first box
            d_boxes.append(boxes[:1] + 1.0)
            d_labels.append(labels[:1])
        d_boxes = np.concatenate(d_boxes)
        d_boxes[:, 2:] = np.maximum(d_boxes[:, 2:], d_boxes[:, :2] + 0.5)
        dets.append({"boxes": d_boxes, "labels": np.concatenate(d_labels),
                     "scores": rng.random(len(d_boxes))})
    return dets, gts


def pycocotools_stats(dets, gts, num_classes):
    coco_mod = pytest.importorskip("pycocotools.coco", reason="pycocotools is not installed")
    cocoeval = pytest.importorskip("pycocotools.cocoeval")
    images, annotations, results = [], [], []
    for i, (d, g) in enumerate(zip(dets, gts)):
        images.append({"id": i, "width": 128, "height": 128})
        for box, label in zip(g["boxes"], g["labels"]):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(label) + 1,
                                "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0})
        for box, label, score in zip(d["boxes"], d["labels"], d["scores"]):
            results.append({"image_id": i, "category_id": int(label) + 1, "score": float(score),
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    gt = coco_mod.COCO()
    gt.dataset = {"images": images, "annotations": annotations,
                  "categories": [{"id": k + 1} for k in range(num_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = cocoeval.COCOeval(gt, dt, "bbox")
        ev.params.areaRng = [[0, 1e10], list(AREA_RANGES["small"]), list(AREA_RANGES["medium"]),
                             [AREA_RANGES["large"][0], 1e10]]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(KEYS, ev.stats))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_pycocotools(seed):
    rng = np.random.default_rng(seed)
    dets, gts = synthetic_set(rng)
    ours = evaluate(dets, gts, num_classes=4)
    theirs = pycocotools_stats(dets, gts, 4)
    assert any(len(g["boxes"]) == 0 for g in gts) and any(len(d["boxes"]) == 0 for d in dets)
    for key in KEYS:
        assert abs(ours[key] - theirs[key]) < 1e-4, (key, ours[key], theirs[key])
    assert 0.2 < ours["AP50"] < 0.95  # the synthetic set is neither trivial nor hopeless


def test_perfect_detections_score_one():
    rng = np.random.default_rng(3)
    _, gts = synthetic_set(rng)
    dets = [{"boxes": g["boxes"], "labels": g["labels"], "scores": np.ones(len(g["boxes"]))}
            for g in gts]
    m = evaluate(dets, gts, num_classes=4)
    assert m["AP"] == pytest.approx(1.0) and m["AR@100"] == pytest.approx(1.0)


def test_without_labels_scores_finding_apart_from_naming():
    """Every box found, every digit named wrong: AP 0 per class, AP 1 class-agnostic."""
    rng = np.random.default_rng(4)
    _, gts = synthetic_set(rng)
    wrong = [{"boxes": g["boxes"], "labels": (g["labels"] + 1) % 4, "scores": np.ones(len(g["boxes"]))}
             for g in gts]
    assert evaluate(wrong, gts, num_classes=4)["AP"] == 0.0
    agnostic = evaluate(without_labels(wrong), without_labels(gts), num_classes=1)
    assert agnostic["AP"] == pytest.approx(1.0) and agnostic["AR@100"] == pytest.approx(1.0)
    assert [d["labels"].tolist() for d in without_labels(wrong)] == [[0] * len(g["labels"]) for g in gts]
    assert all((w["labels"] == (g["labels"] + 1) % 4).all() for w, g in zip(wrong, gts))  # unchanged


def test_no_detections_anywhere_scores_zero_and_no_ground_truth_is_minus_one():
    gts = [{"boxes": np.array([[10, 10, 20, 30.0]]), "labels": np.array([1])}]
    empty = [{"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int)}]
    m = evaluate(empty, gts, num_classes=3)
    assert m["AP"] == 0.0 and m["AR@100"] == 0.0
    assert m["AP_large"] == -1.0  # the only object is small: no large ground truth exists


def test_format_metrics_shows_every_size():
    m = dict.fromkeys(KEYS, 0.5)
    text = format_metrics(m)
    assert "small" in text and "large" in text and "0.500" in text
