"""The library rejects bad input as clearly as the CLI: NaN images, empty batches, backward
before forward, non-integer sizes and labels. Each test names the exception and its words."""
import json
import re

import numpy as np
import pytest

from minifpn import functional as F
from minifpn import nn
from minifpn.backend import to_device
from minifpn.detection.anchors import grid_anchors
from minifpn.models import FPN, ResNet
from minifpn.models.detector import Detector, DetectorConfig
from minifpn.models.fpn import LastLevelP6P7
from minifpn.models.head import DetectionHead
from minifpn.models.resnet import BasicBlock
from minifpn.nn import BackwardBeforeForward

SMALL = dict(widths=(4, 4, 8, 8), channels=8, anchor_sizes=(8, 16, 32, 64, 128), num_classes=3)


def f32(*shape):
    return np.zeros(shape, dtype=np.float32)


def small_detector(setting="fpn", backend="numpy", **overrides):
    return Detector(DetectorConfig(setting=setting, **{**SMALL, **overrides})).to(backend)


def one_box_targets(n):
    return [np.array([[10.0, 12.0, 30.0, 34.0]])] * n, [np.array([1])] * n


# ---- NaN and infinity in the images ---------------------------------------------------------
def nan_images(n=1, channels=1):
    """(n, channels, 64, 64) zeros with NaN at (0, 0, 5, 7) and (0, 0, 40, 3) and +inf at
    (n-1, channels-1, 20, 20): 3 bad values, the first in scan order at image 0, row 5, col 7."""
    x = np.random.default_rng(0).random((n, channels, 64, 64)).astype(np.float32)
    x[0, 0, 5, 7] = np.nan
    x[0, 0, 40, 3] = np.nan
    x[n - 1, channels - 1, 20, 20] = np.inf
    return x


@pytest.mark.parametrize("setting", ["c4", "c5", "fpn", "bottom_up", "no_lateral", "p2_only"])
@pytest.mark.parametrize("call", ["predict", "loss", "features"])
def test_nan_or_inf_images_are_refused_in_every_setting(setting, call, backend):
    detector = small_detector(setting, backend)
    images = to_device(nan_images(), backend)
    message = re.escape("Detector: images contain NaN or infinite values "
                        "(3 of 4096 pixels, first at image 0, row 5, column 7)")
    with pytest.raises(ValueError, match=message):
        if call == "predict":
            detector.predict(images)
        elif call == "loss":
            detector.loss(images, *one_box_targets(1))
        else:
            detector.features(images)


def test_nan_image_message_counts_every_image_and_names_the_channel(backend):
    detector = small_detector(in_channels=3, backend=backend)
    images = to_device(nan_images(n=2, channels=3), backend)
    with pytest.raises(ValueError, match=re.escape(
            "(3 of 24576 pixel values, first at image 0, channel 0, row 5, column 7)")):
        detector.predict(images)
    only_inf = np.zeros((2, 3, 64, 64), np.float32)
    only_inf[1, 2, 0, 9] = -np.inf
    with pytest.raises(ValueError, match=re.escape(
            "(1 of 24576 pixel values, first at image 1, channel 2, row 0, column 9)")):
        detector.predict(to_device(only_inf, backend))


def test_a_nan_pixel_never_comes_out_as_detections(backend):
    """Before the check, a NaN at a window's second entry vanished in max_pool2d and the
    image came out as normal-looking detections; now predict refuses it."""
    detector = small_detector(backend=backend)
    images = np.random.default_rng(1).random((1, 1, 64, 64)).astype(np.float32)
    clean = detector.predict(to_device(images, backend))
    assert len(clean) == 1 and len(clean[0]["boxes"]) > 0, "a clean image gives detections"
    images[0, 0, 33, 33] = np.nan
    with pytest.raises(ValueError, match="images contain NaN or infinite values"):
        detector.predict(to_device(images, backend))


# ---- empty batches ----------------------------------------------------------------------------
def test_predict_on_an_empty_batch_returns_an_empty_list(backend):
    detector = small_detector(backend=backend)
    assert detector.predict(to_device(f32(0, 1, 64, 64), backend)) == []


def test_loss_on_an_empty_batch_says_the_batch_is_empty(backend):
    detector = small_detector(backend=backend)
    with pytest.raises(ValueError, match=re.escape("Detector.loss: the batch is empty (N = 0 images)")):
        detector.loss(to_device(f32(0, 1, 64, 64), backend), [], [])


def test_empty_batch_with_a_wrong_shape_is_still_a_shape_error():
    with pytest.raises(ValueError, match=r"Detector: expected images of shape \(N, 1, H, W\)"):
        small_detector().predict(f32(0, 3, 64, 64))


# ---- backward before forward ------------------------------------------------------------------
def _sequential():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())


MODULES = {  # name: (build, call backward with arguments of the right kind)
    "Conv2d": (lambda: nn.Conv2d(1, 2, 3), lambda m: m.backward(f32(1, 2, 4, 4))),
    "BatchNorm2d": (lambda: nn.BatchNorm2d(2), lambda m: m.backward(f32(2, 2, 4, 4))),
    "ReLU": (nn.ReLU, lambda m: m.backward(f32(1, 2, 4, 4))),
    "MaxPool2d": (lambda: nn.MaxPool2d(2), lambda m: m.backward(f32(1, 2, 2, 2))),
    "Upsample": (nn.Upsample, lambda m: m.backward(f32(1, 2, 4, 4))),
    "Sequential": (_sequential, lambda m: m.backward(f32(1, 2, 4, 4))),
    "BasicBlock": (lambda: BasicBlock(2, 2), lambda m: m.backward(f32(1, 2, 4, 4))),
    "ResNet": (lambda: ResNet((4, 4, 8, 8), in_channels=1),
               lambda m: m.backward([None, None, None, f32(1, 8, 2, 2)])),
    "FPN": (lambda: FPN([4, 4, 8, 8], 8), lambda m: m.backward([f32(1, 8, 2, 2)] * 5)),
    "LastLevelP6P7": (lambda: LastLevelP6P7(8, 8), lambda m: m.backward([f32(1, 8, 2, 2), None])),
    "DetectionHead": (lambda: DetectionHead(8, 8, 3, 2),
                      lambda m: m.backward(([f32(1, 9, 2, 2)], [f32(1, 12, 2, 2)]))),
    "Detector": (lambda: small_detector(), lambda m: m.backward()),
}


@pytest.mark.parametrize("name", MODULES)
def test_backward_before_forward_says_so(name):
    build, backward = MODULES[name]
    module = build()
    assert type(module).__name__ == name
    forward = "loss" if name == "Detector" else "forward"
    with pytest.raises(BackwardBeforeForward, match=re.escape(
            f"{name}.backward called before {forward}: run {forward} first (each backward uses "
            f"the cache of the last {forward})")):
        backward(module)
    assert issubclass(BackwardBeforeForward, RuntimeError)


def test_backward_after_forward_still_works_for_the_containers():
    seq = _sequential()
    out = seq(np.ones((1, 1, 6, 6), np.float32))
    assert seq.backward(np.ones_like(out)).shape == (1, 1, 6, 6)


def test_detector_backward_after_predict_refuses_the_stale_loss():
    """predict overwrites every layer's cache, so the last loss can no longer be backpropagated."""
    detector = small_detector()
    images = np.random.default_rng(2).random((1, 1, 64, 64)).astype(np.float32)
    detector.loss(images, *one_box_targets(1))
    detector.predict(images)
    with pytest.raises(BackwardBeforeForward, match="Detector.backward called before loss"):
        detector.backward()


# ---- NumPy integer scalars are ints; bools and floats are not -----------------------------------
def test_numpy_integers_are_accepted_as_sizes(rng):
    x = rng.standard_normal((1, 2, 9, 9)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    i2, i1 = np.int64(2), np.int32(1)
    np.testing.assert_array_equal(F.conv2d(x, w, None, i2, i1)[0], F.conv2d(x, w, None, 2, 1)[0])
    np.testing.assert_array_equal(F.conv2d(x, w, None, (i2, i1), (i1, np.int16(0)))[0],
                                  F.conv2d(x, w, None, (2, 1), (1, 0))[0])
    np.testing.assert_array_equal(F.max_pool2d(x, np.int64(3), i2, i1)[0], F.max_pool2d(x, 3, 2, 1)[0])
    np.testing.assert_array_equal(F.upsample_nearest(x, np.int64(13))[0], F.upsample_nearest(x, 13)[0])
    np.testing.assert_array_equal(F.upsample_nearest(x, (np.int64(18), np.uint8(5)))[0],
                                  F.upsample_nearest(x, (18, 5))[0])
    np.testing.assert_array_equal(grid_anchors(np.int64(3), np.int64(2), np.int64(8), [np.int64(16)]),
                                  grid_anchors(3, 2, 8, [16]))


def test_numpy_integers_are_accepted_by_layers_and_configs():
    i = np.int64
    conv = nn.Conv2d(i(2), i(3), i(3), i(2), i(1), rng=np.random.default_rng(0))
    assert repr(conv) == "Conv2d(2, 3, kernel_size=(3, 3), stride=2, padding=1, bias=True)"
    assert conv.weight.shape == (3, 2, 3, 3)
    assert nn.MaxPool2d(np.int64(3), np.int64(2), np.int64(1)).extra_repr() == \
        "kernel_size=3, stride=2, padding=1"
    assert nn.BatchNorm2d(np.int64(4)).num_features == 4
    assert nn.Upsample(np.int64(2)).scale_factor == 2
    config = DetectorConfig(num_classes=np.int64(3), channels=np.int64(8), seed=np.int64(5),
                            widths=np.array([4, 4, 8, 8]), anchors_per_image=np.int32(16),
                            anchor_sizes=np.array([8, 16, 32, 64, 128]))
    saved = json.loads(json.dumps(config.to_dict()))  # checkpoints store it as JSON
    assert saved["num_classes"] == 3 and saved["widths"] == [4, 4, 8, 8] and saved["seed"] == 5
    assert type(config.widths[0]) is int and type(config.anchor_sizes[0]) is int
    assert Detector(config).head.num_classes == 3


BAD_INTS = {"bool": (True, "True"), "float": (2.5, "2.5"), "np-float": (np.float64(2.0), "2.0"),
            "str": ("2", "'2'"), "None": (None, "None")}
SIZED_OPS = ["conv2d stride", "conv2d padding", "max_pool2d kernel_size", "max_pool2d stride",
             "upsample_nearest size"]


@pytest.mark.parametrize("op,value,shown", [
    pytest.param(op, value, shown, id=f"{op}-{kind}") for op in SIZED_OPS
    for kind, (value, shown) in BAD_INTS.items()
    if not (op == "max_pool2d stride" and value is None)])  # None is max_pool2d's default stride
def test_non_integer_sizes_are_refused_by_the_ops(op, value, shown):
    x = f32(1, 2, 8, 8)
    call = {
        "conv2d stride": lambda: F.conv2d(x, f32(3, 2, 3, 3), None, value, 0),
        "conv2d padding": lambda: F.conv2d(x, f32(3, 2, 3, 3), None, 1, value),
        "max_pool2d kernel_size": lambda: F.max_pool2d(x, value, 1),
        "max_pool2d stride": lambda: F.max_pool2d(x, 2, value),
        "upsample_nearest size": lambda: F.upsample_nearest(x, value),
    }[op]
    name = op.split()[1]
    with pytest.raises(ValueError, match=rf"{name} must be an int or a pair of ints \(not bools or "
                                         rf"floats\), got .*{re.escape(shown)}"):
        call()


def test_a_pair_with_a_bool_or_float_inside_is_refused():
    with pytest.raises(ValueError, match=r"conv2d: stride must be an int or a pair .* got \(1, True\)"):
        F.conv2d(f32(1, 2, 8, 8), f32(3, 2, 3, 3), None, (1, True))
    with pytest.raises(ValueError, match=r"max_pool2d: kernel_size must be an int or .* got \(2, 2.0\)"):
        F.max_pool2d(f32(1, 2, 8, 8), (2, 2.0))


@pytest.mark.parametrize("build,message", [
    (lambda: nn.Conv2d(3, 4, 2.5), r"Conv2d: kernel_size must be an int or a pair of ints .*got 2.5"),
    (lambda: nn.Conv2d(3.0, 4, 3), r"Conv2d: in_channels must be an int \(not a bool or a float\), got 3.0"),
    (lambda: nn.Conv2d(3, True, 3), r"Conv2d: out_channels must be an int .*got True"),
    (lambda: nn.Conv2d(3, 4, 3, stride=1.5), r"Conv2d: stride must be an int or a pair .*got 1.5"),
    (lambda: nn.Conv2d(3, 4, 3, padding=-1), r"Conv2d: padding must be >= 0, got -1"),
    (lambda: nn.BatchNorm2d(4.0), r"BatchNorm2d: num_features must be an int .*got 4.0"),
    (lambda: nn.MaxPool2d(2.5), r"MaxPool2d: kernel_size must be an int or a pair .*got 2.5"),
    (lambda: nn.Upsample(1.5), r"Upsample: scale_factor must be an int .*got 1.5"),
    (lambda: FPN([4, 4, 8, 8.0], 8), r"FPN: each of in_channels_list must be an int .*got 8.0"),
    (lambda: DetectionHead(8, 8, 3, True), r"DetectionHead: num_classes must be an int .*got True"),
    (lambda: ResNet((4, 4, 8, 8.5)), r"ResNet: each width must be an int .*got 8.5"),
    (lambda: DetectorConfig(num_classes=2.5), r"DetectorConfig: num_classes must be an int .*got 2.5"),
    (lambda: DetectorConfig(channels=True), r"DetectorConfig: channels must be an int .*got True"),
    (lambda: DetectorConfig(seed=-1), r"DetectorConfig: seed must be >= 0, got -1"),
    (lambda: DetectorConfig(widths=(4, 4, 8, 0)), r"DetectorConfig: each of widths must be >= 1, got 0"),
], ids=["conv-kernel", "conv-in", "conv-out", "conv-stride", "conv-padding", "bn", "pool", "upsample",
        "fpn", "head", "resnet", "config-classes", "config-channels", "config-seed", "config-widths"])
def test_layer_and_config_constructors_refuse_non_integers(build, message):
    with pytest.raises(ValueError, match=message):
        build()


# ---- labels must be integers ------------------------------------------------------------------
@pytest.mark.parametrize("labels,shown", [
    ([1.5], r"dtype float64 \[1.5\]"),
    (np.array([1.0, 2.0]), r"dtype float64 \[1.0, 2.0\]"),  # whole floats are refused too
    (np.array([True]), r"dtype bool \[True\]"),
    (["1"], r"dtype <U1 \['1'\]"),
], ids=["fractional", "whole-float-array", "bool", "str"])
def test_non_integer_labels_are_refused(labels, shown):
    detector = small_detector()
    n = len(labels)
    boxes = [np.array([[10.0, 12.0, 30.0, 34.0]] * n)]
    with pytest.raises(ValueError, match=r"Detector.loss: labels of image 0 must be integers \(class "
                                         r"indices\), got " + shown + r"; float labels are refused even "
                                         r"when whole \(1.0\): use an int array"):
        detector.loss(np.zeros((1, 1, 64, 64), np.float32), boxes, [labels])


def test_integer_labels_of_any_kind_and_empty_scenes_are_accepted():
    detector = small_detector()
    images = np.random.default_rng(3).random((3, 1, 64, 64)).astype(np.float32)
    boxes = [np.array([[10.0, 12.0, 30.0, 34.0]]), np.array([[1.0, 2.0, 20.0, 24.0]]), []]
    labels = [np.array([2], np.int32), [np.int64(1)], []]  # the last scene has no objects
    loss, parts = detector.loss(images, boxes, labels)
    assert np.isfinite(loss) and set(parts) == {"cls", "box"}
