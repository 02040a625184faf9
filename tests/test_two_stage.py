"""The two-stage detector (paper, Sec. 4.2): the pyramid RPN's proposals, Fast R-CNN on the
pyramid, the joint loss and its backward (float64 gradient check with the proposals held fixed),
training, prediction, checkpoints and the command line."""
import json
import subprocess
import sys

import numpy as np
import pytest

from minifpn import cli
from minifpn.backend import to_numpy
from minifpn.cli import main
from minifpn.data import DigitScenes
from minifpn.detection.boxes import box_iou, nms
from minifpn.gradcheck import directional_check, numerical_gradient, rel_error
from minifpn.models.detector import Detector, DetectorConfig
from minifpn.models.two_stage import (
    TwoStageConfig,
    TwoStageDetector,
    nms_top,
    rois_with_batch_index,
    rpn_proposals,
)
from minifpn.nn import BackwardBeforeForward, init
from minifpn.optim import SGD
from minifpn.train import CheckpointError, TrainConfig, detector_from_checkpoint, evaluate_detector, train

# As in test_detector: the loss is one scalar, whose rounding (about 1e-16 * |loss| over 2h)
# cannot cancel term by term; h = 3e-6 keeps that noise near 1e-11 while a step rarely carries
# an activation across a ReLU or max-pool kink. RoIAlign is linear in the maps for fixed RoIs.
H_STEP, TOL = 3e-6, 1e-6
TINY = {"widths": (4, 4, 4, 4), "channels": 4, "hidden": 16, "num_classes": 3,
        "anchors_per_image": 32, "rois_per_image": 32, "post_nms_top_n_train": 50,
        "post_nms_top_n_test": 20}


def tiny(**kw):
    return TwoStageDetector(TwoStageConfig(**{**TINY, **kw})).to(dtype=np.float64)


def scene_batch(rng, n=2, size=64):
    images = rng.random((n, 1, size, size))
    boxes = [np.array([[4, 6, 12, 18], [20, 20, 50, 58.0]]), np.array([[30, 2, 38, 9.0]])][:n]
    labels = [np.array([0, 2]), np.array([1])][:n]
    return images, boxes, labels


def grads(module):
    return {name: to_numpy(p.grad).copy() for name, p in module.named_parameters()}


# ---- the loss and its gradient ---------------------------------------------------------------

def test_loss_has_both_stages_and_backward_reaches_every_part(rng):
    det = tiny()
    images, boxes, labels = scene_batch(rng)
    loss, parts = det.loss(images, boxes, labels, np.random.default_rng(0))
    assert set(parts) == {"rpn_cls", "rpn_box", "rcnn_cls", "rcnn_box", "cls", "box"}
    assert loss == pytest.approx(parts["rpn_cls"] + parts["rpn_box"] + parts["rcnn_cls"] + parts["rcnn_box"])
    assert loss == pytest.approx(parts["cls"] + parts["box"])
    assert parts["rpn_cls"] == pytest.approx(np.log(2), rel=0.05)  # an untrained RPN: p = 1/2
    assert parts["rcnn_cls"] == pytest.approx(np.log(4), rel=0.05)  # ... and 3 + 1 classes alike
    assert all(v >= 0 for v in parts.values())
    assert [len(p) for p in det.proposals] == [50, 50]  # post_nms_top_n_train
    for p in det.proposals:
        assert p.dtype == np.float64 and (p[:, :2] >= 0).all() and (p[:, 2:] <= 64).all()
        assert (p[:, 2:] > p[:, :2]).all()
    pooled_shape = det.roi_head.cache[0]
    assert pooled_shape[1:] == (4, 7, 7) and 2 < pooled_shape[0] <= 2 * 32  # R sampled RoIs
    det.zero_grad()
    dx = det.backward()
    assert dx.shape == images.shape
    for name, g in grads(det).items():
        assert np.isfinite(g).all(), name
    for name in ("rpn.backbone.conv1.weight", "rpn.fpn.layer_blocks.0.weight", "rpn.head.conv.weight",
                 "roi_head.fc6.weight", "roi_head.cls_score.bias", "roi_head.bbox_pred.weight"):
        assert np.abs(grads(det)[name]).max() > 0, f"{name} gets no gradient"


@pytest.mark.parametrize("pooling", ["pyramid", "c4"])
def test_whole_two_stage_loss_gradient_with_fixed_proposals(pooling, rng):
    """Backbone + FPN + RPN + pooler + Fast R-CNN, float64, against central differences: every
    parameter along a random direction, a few small ones entry by entry, and the images. The
    proposals are held fixed (approximate joint training: their coordinates carry no gradient)
    and a fixed seed draws the same anchors and RoIs at every call. Both heads' output layers
    are drawn at std 0.3 (not 0.01, 0.001) so that their gradients stand well above the
    loss's rounding. With pooling "c4" the RoIs are pooled from the backbone's C4, whose
    gradient is then the FPN's plus Fast R-CNN's."""
    det = tiny(pooling=pooling)
    head_rng = np.random.default_rng(5)
    for layer in (det.rpn.head.conv, det.rpn.head.cls_logits, det.rpn.head.bbox_pred,
                  det.roi_head.cls_score, det.roi_head.bbox_pred):
        init.normal_(layer.weight, 0.3, head_rng)
    images, boxes, labels = scene_batch(rng)
    first, _ = det.loss(images, boxes, labels, np.random.default_rng(7))
    fixed = [p.copy() for p in det.proposals]

    def loss():
        return np.array([det.loss(images, boxes, labels, np.random.default_rng(7), proposals=fixed)[0]])

    assert loss()[0] == first  # the fixed proposals are the RPN's own: the same loss
    det.zero_grad()
    dx = det.backward()
    params = dict(det.named_parameters())
    analytic = grads(det)
    errors = {}
    for i, (name, p) in enumerate(params.items()):  # every parameter, one random direction each
        errors[name] = directional_check(loss, p.data, analytic[name], np.ones(1), H_STEP,
                                         np.random.default_rng(i))
    for name in ("roi_head.cls_score.bias", "roi_head.bbox_pred.bias", "rpn.head.cls_logits.bias",
                 "rpn.fpn.layer_blocks.2.bias", "rpn.backbone.bn1.weight"):  # entry by entry
        assert np.abs(analytic[name]).max() > 0, f"{name} gets no gradient"
        errors[f"{name} (entries)"] = rel_error(
            analytic[name], numerical_gradient(loss, params[name].data, np.ones(1), H_STEP))
    for i in range(2):
        errors[f"images (direction {i})"] = directional_check(loss, images, dx, np.ones(1), H_STEP, rng)
    assert len(errors) == len(params) + 7
    assert max(errors.values()) < TOL, {k: v for k, v in errors.items() if v >= TOL}


@pytest.mark.parametrize("pooling", ["pyramid", "p2", "c4"])
def test_the_gradient_is_the_rpns_plus_fast_rcnns_through_the_pooled_levels(pooling, rng):
    """The RPN head gets exactly the RPN's gradient; Fast R-CNN adds its own only where its RoIs
    were pooled from: with pooling "p2", nothing of it reaches the P3..P5 output convs; with
    "c4", nothing of it reaches the FPN or the backbone's last stage (C5), which lie above C4."""
    det = tiny(pooling=pooling)
    assert det.pooler.levels == {"pyramid": (2, 3, 4, 5), "p2": (2,), "c4": (4,)}[pooling]
    images, boxes, labels = scene_batch(rng)
    det.loss(images, boxes, labels, np.random.default_rng(3))
    det.zero_grad()
    det.backward()
    both = grads(det)
    det.rpn.loss(images, boxes, labels, np.random.default_rng(3))  # the same anchors: the same seed
    det.zero_grad()
    det.rpn.backward()  # the one-stage Detector's backward: the RPN alone
    rpn = grads(det)
    for name in ("head.conv.weight", "head.cls_logits.weight", "head.bbox_pred.bias"):
        np.testing.assert_array_equal(both[f"rpn.{name}"], rpn[f"rpn.{name}"])
    assert not any(rpn[name].any() for name in rpn if name.startswith("roi_head."))
    if pooling == "c4":
        above_c4 = [name for name in rpn if name.startswith(("rpn.fpn.", "rpn.backbone.layer4."))]
        assert len(above_c4) > 8
        for name in above_c4:
            np.testing.assert_array_equal(both[name], rpn[name])
        for name in ("rpn.backbone.layer3.0.conv1.weight", "rpn.backbone.conv1.weight"):
            assert np.abs(both[name] - rpn[name]).max() > 1e-6, f"{name} misses Fast R-CNN's gradient"
        return
    assert np.abs(both["rpn.fpn.layer_blocks.0.weight"] - rpn["rpn.fpn.layer_blocks.0.weight"]).max() > 1e-6
    coarser = [f"rpn.fpn.layer_blocks.{i}.weight" for i in (1, 2, 3)]
    if pooling == "p2":
        for name in coarser:
            np.testing.assert_array_equal(both[name], rpn[name])
    else:  # RoIs of several sizes: some land above P2
        assert any(np.abs(both[name] - rpn[name]).max() > 1e-6 for name in coarser)


def test_backends_agree_on_loss_gradients_and_detections(backend, rng):
    images, boxes, labels = scene_batch(rng)
    reference, on_backend = tiny(), tiny().to(backend)
    results = []
    for det in (reference, on_backend):
        from minifpn.backend import to_device
        x = to_device(images, det.backend)
        loss, parts = det.loss(x, boxes, labels, np.random.default_rng(0))
        det.zero_grad()
        dx = det.backward()
        results.append((parts, to_numpy(dx), grads(det), det.predict(x)))
    (parts0, dx0, g0, det0), (parts1, dx1, g1, det1) = results
    for key in parts0:
        assert parts1[key] == pytest.approx(parts0[key], rel=1e-10, abs=1e-13), key
    np.testing.assert_allclose(dx1, dx0, rtol=1e-8, atol=1e-14)
    for name in g0:
        np.testing.assert_allclose(g1[name], g0[name], rtol=1e-8, atol=1e-12, err_msg=name)
    for a, b in zip(det0, det1):
        np.testing.assert_allclose(b["boxes"], a["boxes"], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(b["scores"], a["scores"], rtol=1e-8)
        np.testing.assert_array_equal(b["labels"], a["labels"])


# ---- the proposals ---------------------------------------------------------------------------

def test_rpn_proposals_by_hand():
    """Two levels, zero deltas (each proposal is its anchor): the top pre_nms_top_n per level,
    clipped, NMS at 0.7 over both levels, best post_nms_top_n first."""
    level_a = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [30, 30, 40, 40], [50, 50, 70, 70.0]])
    level_b = np.array([[0, 0, 10, 10.5], [20, 0, 40, 20.0]])
    p = np.array([0.9, 0.8, 0.3, 0.7, 0.85, 0.6])  # p(object) of the six anchors
    logits = np.stack([np.zeros(6), np.log(p / (1 - p))], axis=1)[None]  # softmax -> p
    deltas = np.zeros((1, 6, 4))
    out = rpn_proposals(logits, deltas, [level_a, level_b], (64, 64), pre_nms_top_n=3,
                        post_nms_top_n=10, nms_iou=0.7)
    # level a keeps 0.9, 0.8, 0.7 (not the 0.3 one); the 0.8 and 0.85 boxes overlap the 0.9 one
    # beyond 0.7; the 0.7 box is clipped to the 64 x 64 image
    np.testing.assert_allclose(out[0], [[0, 0, 10, 10], [50, 50, 64, 64], [20, 0, 40, 20]])
    assert box_iou(level_a[:1], level_a[1:2])[0, 0] > 0.7
    two = rpn_proposals(logits, deltas, [level_a, level_b], (64, 64), 3, 2, 0.7)
    np.testing.assert_allclose(two[0], out[0][:2])


def test_nms_top_keeps_what_nms_keeps_first(rng):
    centres = rng.random((300, 2)) * 60
    sizes = rng.random((300, 2)) * 20 + 2
    boxes = np.concatenate([centres, centres + sizes], axis=1)
    scores = rng.random(300)
    everything = nms(boxes, scores, 0.5)
    for count in (1, 7, 40, len(everything), 1000):
        np.testing.assert_array_equal(nms_top(boxes, scores, 0.5, count), everything[:count])


def test_rois_with_batch_index():
    rois = rois_with_batch_index([np.array([[1, 2, 3, 4.0]]), np.zeros((0, 4)), np.ones((2, 4))],
                                 np.float32, "numpy")
    assert rois.dtype == np.float32
    np.testing.assert_array_equal(rois, [[0, 1, 2, 3, 4], [2, 1, 1, 1, 1], [2, 1, 1, 1, 1]])


# ---- training and prediction -----------------------------------------------------------------

def test_a_few_sgd_steps_on_two_fixed_scenes_lower_the_loss():
    det = TwoStageDetector(widths=(8, 8, 16, 16), channels=8, hidden=32, anchors_per_image=64,
                           rois_per_image=64)
    images, boxes, labels = DigitScenes("train", 2, seed=3).batch(range(2))
    optimizer = SGD(det.named_parameters(), lr=0.02)
    rng = np.random.default_rng(0)
    losses, parts = [], []
    for _ in range(30):
        loss, step_parts = det.loss(images, boxes, labels, rng)
        optimizer.zero_grad()
        det.backward()
        optimizer.step()
        losses.append(loss)
        parts.append(step_parts)
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses  # measured: 3.27 -> 1.39
    for key in ("rpn_cls", "rpn_box", "rcnn_cls"):  # rcnn_box may grow: more positives appear
        assert parts[-1][key] < 0.9 * parts[0][key], (key, parts[0], parts[-1])


def test_predict_returns_valid_detections(rng):
    det = tiny()
    images = rng.random((3, 1, 64, 64))
    out = det.predict(images)
    assert len(out) == 3 and det.training  # predict leaves training mode as it found it
    assert [len(p) for p in det.proposals] == [20, 20, 20]  # post_nms_top_n_test
    for d in out:
        assert d["boxes"].dtype == np.float32 and d["boxes"].shape == (len(d["scores"]), 4)
        assert len(d["labels"]) == len(d["scores"]) <= 100 and len(d["scores"]) > 0
        assert d["labels"].dtype == np.int64 and ((d["labels"] >= 0) & (d["labels"] < 3)).all()
        assert (d["boxes"][:, :2] >= 0).all() and (d["boxes"][:, 2:] <= 64).all()
        assert (d["boxes"][:, 2:] > d["boxes"][:, :2]).all()
        assert (d["scores"] > 0.05).all() and (np.diff(d["scores"]) <= 0).all()
    assert det.predict(images[:0]) == []
    with pytest.raises(BackwardBeforeForward):
        det.backward()  # predict overwrote the layers' caches: there is no loss to backpropagate


def test_checkpoint_round_trip_rebuilds_the_two_stage_detector(tmp_path):
    det = TwoStageDetector(widths=(4, 4, 4, 4), channels=4, hidden=16)
    history = train(det, TrainConfig(iterations=2, batch_size=2, checkpoint_every=2), str(tmp_path),
                    progress=False)
    assert len(history["rcnn_cls"]) == len(history["rpn_box"]) == len(history["cls"]) == 2
    np.testing.assert_allclose(history["cls"], np.add(history["rpn_cls"], history["rcnn_cls"]))
    path = tmp_path / "checkpoint.npz"
    again, ckpt = detector_from_checkpoint(str(path))
    assert isinstance(again, TwoStageDetector) and ckpt["meta"]["detector"] == "two_stage"
    assert again.config == det.config and ckpt["meta"]["iteration"] == 2
    for name, value in det.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[name], value, err_msg=name)
    metrics, detections, _ = evaluate_detector(again, n=2)
    assert len(detections) == 2 and 0 <= metrics["AP50"] <= 1
    with pytest.raises(CheckpointError, match="holds a two_stage detector, not a one_stage one"):
        train(Detector(widths=(4, 4, 4, 4), channels=4), TrainConfig(iterations=3, batch_size=2),
              str(tmp_path), resume=True, progress=False)
    resumed = train(again, TrainConfig(iterations=3, batch_size=2, checkpoint_every=2), str(tmp_path),
                    resume=True, progress=False, allow_changes=True)
    assert resumed["iteration"] == [1, 2, 3] and len(resumed["rcnn_box"]) == 3
    assert resumed["rpn_cls"][:2] == history["rpn_cls"]


# ---- configuration and bad input -------------------------------------------------------------

def test_config_is_a_detector_config_plus_the_second_stage():
    c = TwoStageConfig(setting="c", num_classes=10)
    assert c.setting == "fpn" and c.pooling == "pyramid" and c.rois_per_image == 128
    rpn = c.rpn_config()
    assert type(rpn) is DetectorConfig and rpn.num_classes == 1 and rpn.widths == c.widths
    assert TwoStageConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    rpn = TwoStageDetector(c).rpn  # the one-stage detector as the paper's RPN, composed
    assert type(rpn) is Detector and rpn.config == c.rpn_config()


@pytest.mark.parametrize("overrides, message", [
    ({"setting": "c4"}, r"setting must be one of \('fpn', 'bottom_up', 'no_lateral'\).*got 'c4'"),
    ({"setting": "p2_only"}, "setting must be one of"),
    ({"pooling": "c5"}, r"pooling must be one of \('pyramid', 'p2', 'c4'\), got 'c5'"),
    ({"post_nms_top_n_train": 0}, "post_nms_top_n_train must be >= 1, got 0"),
    ({"rois_per_image": 2.5}, "rois_per_image must be an int"),
    ({"rpn_nms_iou": 1.5}, r"rpn_nms_iou must be a number in \(0, 1\], got 1.5"),
    ({"roi_positive_fraction": 0}, "roi_positive_fraction must be a number in"),
])
def test_bad_config_values_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        TwoStageConfig(**overrides)


def test_bad_detector_arguments(rng):
    with pytest.raises(TypeError, match="expected a TwoStageConfig, got DetectorConfig"):
        TwoStageDetector(DetectorConfig())
    ten = Detector(DetectorConfig(widths=(4, 4, 4, 4), channels=4))
    with pytest.raises(ValueError, match=r"proposals come from an RPN \(num_classes = 1\), got "
                                         r"num_classes = 10"):
        ten.proposals(ten.forward(np.zeros((1, 1, 64, 64), np.float32)), 10, 5)
    det = tiny()
    images, boxes, labels = scene_batch(rng)
    with pytest.raises(ValueError, match=r"labels of image 0 must lie in \[0, 3\)"):
        det.loss(images, boxes, [np.array([0, 3]), np.array([1])])
    with pytest.raises(ValueError, match="expected proposals for each of the 2 images, got 1"):
        det.loss(images, boxes, labels, proposals=[np.zeros((0, 4))])
    with pytest.raises(ValueError, match="the batch is empty"):
        det.loss(images[:0], [], [])
    with pytest.raises(BackwardBeforeForward):
        tiny().backward()


# ---- the command line ------------------------------------------------------------------------

CLI_TINY = ["--widths", "4,4,4,4", "--channels", "4", "--iterations", "2", "--batch-size", "2",
            "--eval-scenes", "2", "--quiet"]


def test_cli_pooling_and_rois_per_image_reach_the_config():
    args = cli.build_parser().parse_args(["train", "--detector", "two_stage", "--pooling", "p2",
                                          "--rois-per-image", "64"])
    config = cli._detector_config(args)
    assert isinstance(config, TwoStageConfig) and (config.pooling, config.rois_per_image) == ("p2", 64)
    assert TwoStageDetector(config).pooler.levels == (2,)


def test_cli_trains_and_evaluates_a_two_stage_detector(tmp_path, capsys):
    res = subprocess.run([sys.executable, "-m", "minifpn.cli", "train", "--detector", "two_stage",
                          *CLI_TINY, "--runs", str(tmp_path), "--name", "t"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "fpn (two_stage): 2 iterations (4 images)" in res.stdout and "AP@[.5:.95]" in res.stdout
    summary = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert summary["detector"] == "two_stage" and summary["detector_config"]["pooling"] == "pyramid"
    for name in ("checkpoint.npz", "loss_curve.png", "detections.png", "pyramid.png"):
        assert (tmp_path / "t" / name).stat().st_size > 0, name
    checkpoint = str(tmp_path / "t" / "checkpoint.npz")
    assert main(["evaluate", checkpoint, "--scenes", "2", "--json", "--detector", "two_stage"]) == 0
    out = capsys.readouterr().out
    assert "setting fpn (two_stage), trained 2 iterations" in out
    assert json.loads(out.strip().splitlines()[-1]) == summary["metrics"]  # the same 2 test scenes
    assert main(["evaluate", checkpoint, "--scenes", "2", "--detector", "one_stage"]) == 1
    assert capsys.readouterr().err == (f"minifpn evaluate: checkpoint {checkpoint} holds a two_stage "
                                       f"detector, not the one_stage one --detector asks for\n")


@pytest.mark.parametrize("argv, message", [
    (["train", "--detector", "three_stage"],
     "argument --detector: invalid choice: 'three_stage' (choose from 'one_stage', 'two_stage')"),
    (["evaluate", "some.npz", "--detector", "rpn"],
     "argument --detector: invalid choice: 'rpn' (choose from 'one_stage', 'two_stage')"),
    (["train", "--detector", "two_stage", "--setting", "a"],
     "--detector two_stage pools its RoIs from P2..P5: --setting must be one of fpn, bottom_up, "
     "no_lateral, got c4"),
    (["train", "--pooling", "p2"], "--pooling applies only with --detector two_stage"),
    (["train", "--rois-per-image", "64"], "--rois-per-image applies only with --detector two_stage"),
    (["train", "--detector", "two_stage", "--pooling", "c5"],
     "argument --pooling: invalid choice: 'c5' (choose from 'pyramid', 'p2', 'c4')"),
    (["train", "--detector", "two_stage", "--rois-per-image", "0"],
     "--rois-per-image must be a positive integer, got 0"),
])
def test_bad_detector_option_is_one_line(argv, message, tmp_path, capsys):
    runs = tmp_path / "runs"
    extra = ["--runs", str(runs)] if argv[0] == "train" else []
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *extra])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"minifpn {argv[0]}: error: {message}\n"
    assert not runs.exists()
