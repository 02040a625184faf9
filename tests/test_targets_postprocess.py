"""detection/targets.py and detection/postprocess.py: the two halves the detector calls."""
import numpy as np

from minifpn.detection.boxes import decode
from minifpn.detection.postprocess import MIN_BOX_SIZE, postprocess_image
from minifpn.detection.targets import batch_targets


def test_batch_targets_index_rows_of_the_flattened_batch():
    anchors = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 4, 4]], np.float64)  # T = 3
    boxes = [np.array([[0, 0, 10, 10]]), np.array([[20, 20, 30, 31]])]
    labels = [np.array([7]), np.array([2])]
    t = batch_targets(anchors, boxes, labels, np.random.default_rng(0), 0.7, 0.3, 8, 0.5)
    # image 0: anchor 0 is its box (label 7), anchors 1 and 2 are background;
    # image 1: anchor 1 (row 3 + 1) matches (label 2), anchors 0 and 2 are background
    assert t.cls_index.tolist() == [0, 1, 2, 3, 4, 5]
    assert t.cls_target.tolist() == [8, 0, 0, 0, 3, 0]
    assert t.box_index.tolist() == [0, 4]
    np.testing.assert_allclose(decode(t.box_target, anchors[[0, 1]]), [[0, 0, 10, 10], [20, 20, 30, 31]])


def test_postprocess_keeps_the_best_box_per_object_and_drops_slivers():
    anchors = np.array([[10, 10, 30, 30], [11, 10, 31, 30], [0, 0, 0.2, 20]], np.float64)
    scores = np.array([[0.9, 0.0], [0.8, 0.0], [0.0, 0.95]])  # (T, K): two classes
    out = postprocess_image(scores, np.zeros((3, 4)), [anchors], (64, 64), nms_iou=0.5)
    # anchor 1 overlaps anchor 0 (IoU 0.9) in the same class: suppressed; anchor 2 is 0.2 px wide
    assert 0.2 < MIN_BOX_SIZE
    assert out["labels"].tolist() == [0]
    np.testing.assert_allclose(out["scores"], [0.9])
    np.testing.assert_allclose(out["boxes"], [[10, 10, 30, 30]])
    assert out["boxes"].dtype == np.float32 and out["labels"].dtype == np.int64
