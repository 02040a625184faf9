"""Anchors, matching, sampling, box encoding and NMS (host-side NumPy)."""
import numpy as np
import pytest

from minifpn.detection import (
    batched_nms,
    box_iou,
    cell_anchors,
    clip_boxes,
    decode,
    encode,
    grid_anchors,
    match_anchors,
    nms,
    sample_anchors,
)
from minifpn.detection.boxes import BBOX_CLIP


def test_cell_anchors_have_the_area_and_aspect_ratios_of_the_paper():
    a = cell_anchors(32)
    w, h = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    np.testing.assert_allclose(w * h, 32 ** 2)
    np.testing.assert_allclose(h / w, [0.5, 1.0, 2.0])
    np.testing.assert_allclose((a[:, :2] + a[:, 2:]) / 2, 0)


def test_grid_anchors_order_is_row_column_anchor_at_cell_centres():
    anchors = grid_anchors(2, 3, stride=8, sizes=[16])
    assert anchors.shape == (2 * 3 * 3, 4)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    np.testing.assert_allclose(centres[0], [4, 4])     # row 0, column 0
    np.testing.assert_allclose(centres[3], [12, 4])    # row 0, column 1
    np.testing.assert_allclose(centres[9], [4, 12])    # row 1, column 0
    np.testing.assert_allclose(centres[:3], [[4, 4]] * 3)  # three ratios per cell


def test_box_iou_known_values():
    a = np.array([[0, 0, 10, 10.0]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 5, 5.0]])
    np.testing.assert_allclose(box_iou(a, b)[0], [1.0, 50 / 150, 0.0, 0.25])


def test_encode_decode_round_trip_and_known_deltas(rng):
    anchors = np.array([[0, 0, 10, 20.0]])
    boxes = np.array([[5, 0, 15, 40.0]])
    np.testing.assert_allclose(encode(boxes, anchors), [[0.5, 0.5, 0.0, np.log(2)]])
    anchors = np.abs(rng.normal(size=(50, 2))) * 20
    anchors = np.concatenate([anchors, anchors + rng.uniform(2, 30, (50, 2))], axis=1)
    boxes = np.concatenate([anchors[:, :2] + rng.normal(0, 2, (50, 2)),
                            anchors[:, 2:] + rng.normal(0, 2, (50, 2)) + 3], axis=1)
    np.testing.assert_allclose(decode(encode(boxes, anchors), anchors), boxes, rtol=1e-10)


def test_decode_clamps_huge_scale_changes():
    out = decode(np.array([[0, 0, 100.0, 100.0]]), np.array([[0, 0, 10, 10.0]]))
    np.testing.assert_allclose(out[0, 2] - out[0, 0], 10 * np.exp(BBOX_CLIP))


def test_clip_boxes():
    np.testing.assert_array_equal(clip_boxes([[-5, 3, 140, 200]], 128, 128), [[0, 3, 128, 128]])


def test_match_anchors_thresholds_and_best_anchor_rule():
    anchors = np.array([[0, 0, 10, 10], [0, 0, 10, 8], [0, 0, 10, 5], [50, 50, 60, 60],
                        [100, 100, 104, 104.0]])
    gt = np.array([[0, 0, 10, 10], [100, 100, 110, 110.0]])
    labels, matched = match_anchors(anchors, gt)
    # IoU with gt 0: 1.0, 0.8 (positive), 0.5 (ignored); anchor 3 touches nothing (negative);
    # anchor 4 overlaps gt 1 by only 0.16, but it is gt 1's best anchor, so it is positive
    np.testing.assert_array_equal(labels, [1, 1, -1, 0, 1])
    np.testing.assert_array_equal(matched, [0, 0, -1, -1, 1])


def test_match_anchors_without_objects_makes_every_anchor_background():
    labels, matched = match_anchors(np.array([[0, 0, 4, 4.0], [1, 1, 9, 9]]), np.zeros((0, 4)))
    np.testing.assert_array_equal(labels, [0, 0])
    np.testing.assert_array_equal(matched, [-1, -1])


def test_sample_anchors_caps_positives_at_the_fraction(rng):
    labels = np.array([1] * 300 + [0] * 1000 + [-1] * 50)
    chosen = sample_anchors(labels, rng, batch_size=256, positive_fraction=0.5)
    assert len(chosen) == 256 and len(np.unique(chosen)) == 256
    assert (labels[chosen] == 1).sum() == 128 and (labels[chosen] == 0).sum() == 128
    few = np.array([1] * 3 + [0] * 1000)
    chosen = sample_anchors(few, rng, batch_size=256)
    assert (few[chosen] == 1).sum() == 3 and len(chosen) == 256  # negatives fill the rest


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9.0]])
    scores = np.array([0.8, 0.9, 0.5, 0.7])
    np.testing.assert_array_equal(nms(boxes, scores, 0.5), [1, 2])
    labels = np.array([0, 0, 0, 1])  # a different class is never suppressed
    np.testing.assert_array_equal(batched_nms(boxes, scores, labels, 0.5), [1, 3, 2])


def test_nms_matches_torchvision(rng):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    ops = pytest.importorskip("torchvision.ops", reason="torchvision is not installed")
    xy = rng.uniform(0, 100, (200, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (200, 2))], axis=1)
    scores = rng.random(200)
    expected = ops.nms(torch.tensor(boxes), torch.tensor(scores), 0.5).numpy()
    np.testing.assert_array_equal(nms(boxes, scores, 0.5), expected)
