"""The whole detector: an end-to-end float64 gradient check, bad input, and prediction."""
import numpy as np
import pytest

from minifpn.data import DigitScenes
from minifpn.gradcheck import directional_check, numerical_gradient, rel_error
from minifpn.models.detector import Detector, DetectorConfig, pad_images
from minifpn.nn import init
from minifpn.table1 import SETTINGS

# The loss is one scalar, so its rounding (about 1e-16 * |loss|, over 2h) cannot cancel term by
# term as it does for array outputs: h = 3e-6 balances that noise against the chance that a step
# carries some activation across a ReLU or max-pool kink (measured: 1e-5 crosses one in conv1).
H_STEP, TOL = 3e-6, 1e-6


def tiny(setting, **kw):
    config = DetectorConfig(**{"setting": setting, "num_classes": 3, "widths": (4, 4, 6, 8),
                               "channels": 4, "anchors_per_image": 64, **kw})
    return Detector(config).to(dtype=np.float64)


def scene_batch(rng, n=2, size=64):
    images = rng.random((n, 1, size, size))
    boxes = [np.array([[4, 6, 12, 18], [20, 20, 50, 58.0]]), np.array([[30, 2, 38, 9.0]])][:n]
    labels = [np.array([0, 2]), np.array([1])][:n]
    return images, boxes, labels


@pytest.mark.parametrize("setting", ["fpn", "c4", "p2_only"])
def test_detector_gradients_end_to_end(setting, rng):
    """Backbone + FPN + head + loss, float64: d loss / d every checked parameter. The head is
    drawn at std 0.3 (not 0.01) so that its gradients stand well above the loss's rounding."""
    # the paper's labelling: with the demo's IoU 0.4 a few class-weight gradients fall to ~4e-8,
    # below the scalar loss's rounding noise over 2h (about 1e-10), so relative error is noise
    det = tiny(setting, anchors_per_image=32, positive_iou=0.7)
    head_rng = np.random.default_rng(5)
    for conv in (det.head.conv, det.head.cls_logits, det.head.bbox_pred):
        init.normal_(conv.weight, 0.3, head_rng)
    images, boxes, labels = scene_batch(rng)

    def loss():  # the same anchors are sampled every call (a fixed seed)
        return np.array([det.loss(images, boxes, labels, np.random.default_rng(7))[0]])

    value = loss()[0]
    assert np.isfinite(value) and value > 0
    det.zero_grad()
    dx = det.backward()
    checked = [("head.conv.weight", det.head.conv.weight),
               ("head.cls_logits.weight", det.head.cls_logits.weight),
               ("head.bbox_pred.weight", det.head.bbox_pred.weight),
               ("head.bbox_pred.bias", det.head.bbox_pred.bias),
               ("backbone.conv1.weight", det.backbone.conv1.weight),
               ("backbone.layer3.0.bn1.weight", det.backbone.layer3[0].bn1.weight)]
    if setting != "c4":
        checked += [("fpn.layer_blocks.0.weight", det.fpn.layer_blocks[0].weight),
                    ("fpn.inner_blocks.3.weight", det.fpn.inner_blocks[3].weight)]
    errors = {}
    for name, p in checked:
        analytic = p.grad.copy()
        assert np.abs(analytic).max() > 0, f"{name} gets no gradient"
        errors[name] = rel_error(analytic, numerical_gradient(loss, p.data, np.ones(1), H_STEP))
    for i in range(2):
        errors[f"images (direction {i})"] = directional_check(loss, images, dx, np.ones(1), H_STEP, rng)
    assert max(errors.values()) < TOL, errors


def test_shared_head_gradient_is_the_sum_over_levels(rng):
    """One weight serves five levels: its gradient is the sum of the five levels' gradients."""
    det = tiny("fpn")
    maps = det.features(rng.random((2, 1, 64, 64)))
    logits, deltas = det.head(maps)
    d_logits = [rng.standard_normal(x.shape) for x in logits]
    d_deltas = [rng.standard_normal(x.shape) for x in deltas]
    det.head.zero_grad()
    det.head.backward((d_logits, d_deltas))
    together = det.head.conv.weight.grad.copy()
    per_level = []
    for i in range(len(maps)):
        det.head.zero_grad()
        det.head([maps[i]])
        det.head.backward(([d_logits[i]], [d_deltas[i]]))
        per_level.append(det.head.conv.weight.grad.copy())
    assert len(per_level) == 5 and all(np.abs(g).max() > 0 for g in per_level)
    np.testing.assert_allclose(together, sum(per_level), rtol=1e-12)


def test_scene_without_objects_has_a_finite_loss_of_background_only(rng):
    det = tiny("fpn")
    images = rng.random((2, 1, 64, 64))
    loss, parts = det.loss(images, [np.zeros((0, 4))] * 2, [np.zeros(0, int)] * 2,
                           np.random.default_rng(0))
    assert np.isfinite(loss) and parts["box"] == 0.0
    assert parts["cls"] == pytest.approx(np.log(4), rel=0.05)  # near-uniform over 3 + 1 classes
    det.zero_grad()
    det.backward()
    assert np.abs(det.head.cls_logits.bias.grad).max() > 0
    assert not det.head.bbox_pred.weight.grad.any()  # no positives: no box gradient


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_every_table1_setting_trains_one_step_and_predicts(setting):
    det = Detector(setting=setting, widths=(8, 8, 16, 16), channels=8)
    images, boxes, labels = DigitScenes("train", 4).batch(range(2))
    loss, _ = det.loss(images, boxes, labels, np.random.default_rng(0))
    det.zero_grad()
    dx = det.backward()
    assert np.isfinite(loss) and dx.shape == images.shape and dx.dtype == np.float32
    out = det.predict(images)
    assert len(out) == 2
    for d in out:
        assert d["boxes"].shape[1] == 4 and len(d["boxes"]) == len(d["scores"]) == len(d["labels"])
        assert (d["boxes"][:, 2:] <= 128).all() and (d["boxes"][:, :2] >= 0).all()
        assert np.all(np.diff(d["scores"]) <= 0) and len(d["scores"]) <= 100
    levels = {"c4": ["C4"], "c5": ["C5"], "p2_only": ["P2"]}.get(setting, ["P2", "P3", "P4", "P5", "P6"])
    assert [name for name, _, _ in det.head_maps] == levels
    assert det.num_anchors == (15 if setting in ("c4", "c5", "p2_only") else 3)


def test_table1_letters_name_the_settings():
    assert DetectorConfig(setting="a").setting == "c4"
    assert DetectorConfig(setting="f").setting == "p2_only"
    with pytest.raises(ValueError, match="setting must be one of"):
        DetectorConfig(setting="g")


def test_image_size_must_be_a_multiple_of_32_or_padded(rng):
    det = tiny("fpn")
    images = rng.random((1, 1, 70, 64))
    with pytest.raises(ValueError, match=r"multiples of 32 .* got 70x64; pad them with .*pad_images"):
        det.predict(images)
    padded = pad_images(images)
    assert padded.shape == (1, 1, 96, 64)
    np.testing.assert_array_equal(padded[:, :, :70], images)
    assert not padded[:, :, 70:].any()
    assert len(det.predict(padded)) == 1


def test_wrong_channels():
    det = tiny("fpn")
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 1, H, W\), got \(1, 3, 64, 64\)"):
        det.predict(np.zeros((1, 3, 64, 64)))


@pytest.mark.parametrize("box,message", [
    ([-2, 0, 10, 10], "lies outside the 64x64 image"),
    ([50, 50, 70, 60], "lies outside the 64x64 image"),
    ([5, 5, 5, 9], "has zero area"),
    ([5, 9, 8, 9], "has zero area"),
    ([5, 5, np.nan, 9], "non-finite box"),
])
def test_bad_boxes(box, message, rng):
    det = tiny("fpn")
    with pytest.raises(ValueError, match=message):
        det.loss(rng.random((1, 1, 64, 64)), [np.array([box], float)], [np.array([0])])


def test_bad_labels_and_counts(rng):
    det = tiny("fpn")
    images = rng.random((1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"labels of image 0 must lie in \[0, 3\)"):
        det.loss(images, [np.array([[1, 1, 9, 9.0]])], [np.array([3])])
    with pytest.raises(ValueError, match="has 1 boxes but 2 labels"):
        det.loss(images, [np.array([[1, 1, 9, 9.0]])], [np.array([0, 1])])
    with pytest.raises(ValueError, match="for each of the 1 images"):
        det.loss(images, [], [])
