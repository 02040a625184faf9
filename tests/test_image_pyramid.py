"""The featurized image pyramid (the paper's Figure 1(a)): predict_image_pyramid and ImagePyramid on a
tiny detector of Table 1's setting (a) c4, scale_jitter for training, and `minifpn evaluate
--image-pyramid` on a tiny checkpoint."""
import json

import numpy as np
import pytest

from minifpn import functional as F
from minifpn.backend import to_device, to_numpy
from minifpn.cli import main
from minifpn.data import DigitScenes, scale_jitter
from minifpn.detection.boxes import box_iou
from minifpn.detection.image_pyramid import (
    ImagePyramid,
    boxes_to_original,
    predict_image_pyramid,
    resize_for_scale,
    scaled_size,
)
from minifpn.models.detector import Detector, DetectorConfig
from minifpn.models.two_stage import TwoStageConfig, TwoStageDetector
from minifpn.train import detector_from_checkpoint, evaluate_detector

SCALES = (0.5, 1, 2)


def tiny_c4(backend="numpy"):
    return Detector(DetectorConfig(setting="c4", widths=(4, 4, 4, 4), channels=4)).to(backend)


@pytest.fixture(scope="module")
def scenes():
    """Two 128 x 128 test scenes: images (2, 1, 128, 128) float32, boxes, labels."""
    return DigitScenes("test", n=2, seed=0).batch(range(2))


def assert_same_detections(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert set(a) == set(b) == {"boxes", "scores", "labels"}
        for key in a:
            assert a[key].dtype == b[key].dtype, key
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ---- predict_image_pyramid ----------------------------------------------------------------------

def test_one_scale_of_one_is_the_detectors_own_predict(scenes):
    detector = tiny_c4()
    images = scenes[0]
    theirs = detector.predict(images)
    assert sum(len(d["boxes"]) for d in theirs) > 0  # an untrained detector still finds boxes
    assert_same_detections(predict_image_pyramid(detector, images, (1,)), theirs)
    assert_same_detections(ImagePyramid(detector, [1.0]).predict(images), theirs)


def test_every_merged_box_is_a_scales_box_mapped_back(scenes):
    """Scales 0.5, 1, 2 of 128 x 128 scenes: the merged boxes lie in the image, each is one
    scale's detection divided by its scale (exactly: the factors are 2, 1 and 1/2), at most 100,
    best first, and no two of one label overlap by more than the NMS threshold 0.5."""
    detector = tiny_c4()
    images = scenes[0]
    merged = predict_image_pyramid(detector, images, SCALES)
    per_scale = {s: detector.predict(resize_for_scale(images, s)[0]) for s in SCALES}
    assert resize_for_scale(images, 2)[0].shape == (2, 1, 256, 256)
    from_scale = {s: 0 for s in SCALES}
    for n, found in enumerate(merged):
        boxes, scores, labels = found["boxes"], found["scores"], found["labels"]
        assert 0 < len(boxes) <= 100 and boxes.dtype == np.float32 and labels.dtype == np.int64
        assert (boxes >= 0).all() and (boxes[:, 2:] <= 128).all()
        assert (np.diff(scores) <= 0).all()
        for label in np.unique(labels):
            same = boxes[labels == label]
            iou = box_iou(same, same) - np.eye(len(same))
            assert (iou <= 0.5).all()
        for box, score, label in zip(boxes, scores, labels):
            sources = [s for s in SCALES for d in [per_scale[s][n]]
                       for i in np.flatnonzero((d["scores"] == score) & (d["labels"] == label))
                       if (d["boxes"][i] / s == box).all()]
            assert sources, (box, score, label)
            from_scale[sources[0]] += 1
    assert all(count > 0 for count in from_scale.values()), from_scale  # every scale contributes


def test_boxes_map_back_by_the_inverse_of_the_resize():
    boxes = np.array([[10.0, 20.0, 30.0, 44.0], [0.0, 0.0, 256.0, 256.0]], np.float32)
    np.testing.assert_array_equal(boxes_to_original(boxes, (256, 256), (128, 128)), boxes / 2)
    np.testing.assert_array_equal(boxes_to_original(boxes, (64, 64), (128, 128))[:1], boxes[:1] * 2)
    odd = boxes_to_original(boxes[:1], (77, 45), (50, 30))  # x * 30 / 45, y * 50 / 77
    np.testing.assert_allclose(odd, [[10 * 30 / 45, 20 * 50 / 77, 30 * 30 / 45, 44 * 50 / 77]], rtol=1e-6)
    assert scaled_size(128, 96, 0.75) == (96, 72) and scaled_size(50, 30, 1.5) == (75, 45)


def test_any_image_size_is_padded_for_each_scale(rng):
    images = rng.random((1, 1, 50, 70), dtype=np.float32)
    merged = predict_image_pyramid(tiny_c4(), images, (0.5, 1, 1.5))
    boxes = merged[0]["boxes"]
    assert len(boxes) > 0 and (boxes >= 0).all()
    assert (boxes[:, 0::2] <= 70).all() and (boxes[:, 1::2] <= 50).all()
    assert predict_image_pyramid(tiny_c4(), images[:0], SCALES) == []


def test_on_every_backend_the_pyramid_equals_numpys(backend, scenes):
    images = scenes[0][:1]
    ours = predict_image_pyramid(tiny_c4(backend), to_device(images, backend), (0.5, 2))
    theirs = predict_image_pyramid(tiny_c4(), images, (0.5, 2))
    assert [len(d["boxes"]) for d in ours] == [len(d["boxes"]) for d in theirs]
    for a, b in zip(ours, theirs):
        assert all(isinstance(v, np.ndarray) for v in a.values())
        np.testing.assert_allclose(a["boxes"], b["boxes"], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("scales", [(), [], (0,), (0.5, -1), (float("nan"),), (float("inf"),), "1",
                                    None, (True,), ("1",), 2.0])
def test_bad_scales_are_refused_with_a_clear_error(scales, scenes):
    with pytest.raises(ValueError, match="image pyramid: .*(non-empty list|finite number > 0)"):
        predict_image_pyramid(tiny_c4(), scenes[0], scales)
    with pytest.raises(ValueError, match="image pyramid"):
        ImagePyramid(tiny_c4(), scales)


def test_a_scale_that_makes_a_side_vanish_is_refused(scenes):
    with pytest.raises(ValueError, match="scale 0.001 makes the 128x128 images 0x0"):
        predict_image_pyramid(tiny_c4(), scenes[0], (1, 0.001))


@pytest.mark.parametrize("make,words", [
    (lambda: Detector(DetectorConfig(setting="fpn", widths=(4, 4, 4, 4), channels=4)),
     "got a one_stage detector of setting (c) fpn"),
    (lambda: Detector(DetectorConfig(setting="b", widths=(4, 4, 4, 4), channels=4)),
     "got a one_stage detector of setting (b) c5"),
    (lambda: TwoStageDetector(TwoStageConfig(widths=(4, 4, 4, 4), channels=4, pooling="c4")),
     "got a two_stage detector of setting (c) fpn"),
])
def test_only_setting_a_runs_as_an_image_pyramid(make, words, scenes):
    detector = make()
    for run in (lambda: predict_image_pyramid(detector, scenes[0], SCALES),
                lambda: ImagePyramid(detector, SCALES)):
        with pytest.raises(ValueError) as e:
            run()
        message = str(e.value)
        assert "\n" not in message and message.endswith(words)
        assert message.startswith("image pyramid: needs a single-scale one-stage detector of "
                                  "Table 1's setting (a) c4")


def test_an_image_pyramid_evaluates_like_a_detector(scenes):
    """ImagePyramid has what evaluate_detector reads: predict, config, backend."""
    detector = tiny_c4()
    metrics, detections, _ = evaluate_detector(ImagePyramid(detector, SCALES), "test", 2)
    assert 0 <= metrics["AP50"] <= 1
    assert_same_detections(detections, predict_image_pyramid(detector, scenes[0], SCALES))


# ---- scale_jitter ---------------------------------------------------------------------------------

@pytest.mark.parametrize("scale,side", [(2, 256), (0.5, 64), (0.75, 96), (0.6, 77), (1.3, 166)])
def test_scale_jitter_resizes_the_images_and_scales_the_boxes(scale, side, scenes):
    images, boxes, labels = scenes
    jittered, scaled = scale_jitter(images, boxes, scale)
    padded = -(-side // 32) * 32
    assert jittered.shape == (2, 1, padded, padded) and jittered.dtype == np.float32
    resized, _ = F.resize_bilinear(images, (side, side))
    np.testing.assert_array_equal(jittered[:, :, :side, :side], resized)
    assert (jittered[:, :, side:] == 0).all() and (jittered[:, :, :, side:] == 0).all()
    factor = side / 128
    for b, s in zip(boxes, scaled):
        assert s.dtype == np.float32 and s.shape == b.shape
        np.testing.assert_array_equal(s, (b.astype(np.float64) * factor).astype(np.float32))
        assert (s >= 0).all() and (s <= side).all()
    if scale in (2, 0.5):
        np.testing.assert_array_equal(scaled[0], boxes[0] * scale)  # exact: a power of two
    loss, _ = tiny_c4().loss(jittered, scaled, labels, np.random.default_rng(0))  # a valid batch
    assert np.isfinite(loss)


def test_scale_jitter_without_padding_and_on_a_device(backend, scenes):
    images, boxes, _ = scenes
    jittered, scaled = scale_jitter(to_device(images, backend), boxes, 0.6, multiple=1)
    assert jittered.shape == (2, 1, 77, 77)
    expected, _ = F.resize_bilinear(images, (77, 77))
    np.testing.assert_allclose(to_numpy(jittered), expected, rtol=1e-6)
    assert all(isinstance(s, np.ndarray) for s in scaled)


def test_scale_jitter_refuses_bad_arguments(scenes):
    images, boxes, _ = scenes
    with pytest.raises(ValueError, match="finite number > 0"):
        scale_jitter(images, boxes, 0)
    with pytest.raises(ValueError, match="one box array per image"):
        scale_jitter(images, boxes[:1], 2)
    with pytest.raises(ValueError, match=r"shape \(N, C, H, W\)"):
        scale_jitter(images[0], boxes, 2)
    with pytest.raises(ValueError, match="multiple must be >= 1"):
        scale_jitter(images, boxes, 2, multiple=0)


# ---- minifpn evaluate --image-pyramid -------------------------------------------------------------

TINY = ["--widths", "4,8,8,16", "--channels", "8", "--iterations", "2", "--batch-size", "2",
        "--eval-scenes", "4", "--quiet", "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def c4_checkpoint(tmp_path_factory):
    """A tiny checkpoint of setting (a) c4, two steps."""
    runs = tmp_path_factory.mktemp("pyramid_runs")
    assert main(["train", "--setting", "c4", *TINY, "--runs", str(runs), "--name", "c4"]) == 0
    return str(runs / "c4" / "checkpoint.npz")


def test_evaluate_an_image_pyramid(c4_checkpoint, capsys):
    capsys.readouterr()
    assert main(["evaluate", c4_checkpoint, "--scenes", "4", "--image-pyramid", "0.5,1,2", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].endswith("setting c4, trained 2 iterations; test split, 4 scenes, "
                           "image pyramid at scales 0.5, 1, 2:")
    assert any("AP@[.5:.95]" in line for line in out) and any("small" in line for line in out)
    timing = [line for line in out if line.startswith("time per image: ")]
    assert len(timing) == 1 and timing[0].endswith(" ms (0.5, 1, 2)")
    detector, _ = detector_from_checkpoint(c4_checkpoint)
    metrics, _, _ = evaluate_detector(ImagePyramid(detector, SCALES), "test", 4)
    assert json.loads(out[-1]) == metrics


def test_evaluate_an_image_pyramid_of_one_scale_is_plain_evaluate(c4_checkpoint, capsys):
    assert main(["evaluate", c4_checkpoint, "--scenes", "4", "--json"]) == 0
    plain = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("time per image: ") and line.endswith(" ms (single scale)") for line in plain)
    assert main(["evaluate", c4_checkpoint, "--scenes", "4", "--json", "--image-pyramid", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(plain[-1])


@pytest.mark.parametrize("text", ["0.5,,2", "a", "0", "-1", "", "1,nan", "0.5;1", "1,inf", "2,0"])
def test_evaluate_refuses_a_malformed_list_of_scales(text, c4_checkpoint, capsys):
    with pytest.raises(SystemExit) as e:
        main(["evaluate", c4_checkpoint, "--image-pyramid", text])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"minifpn evaluate: error: --image-pyramid must be image scales > 0 separated by "
                       f"commas (e.g. 0.5,1,2), got {text!r}")


def test_evaluate_refuses_an_image_pyramid_of_another_setting(capsys):
    assert main(["evaluate", "--reference", "fpn", "--scenes", "2", "--image-pyramid", "0.5,1"]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert err == ["minifpn evaluate: --image-pyramid needs a single-scale one-stage detector of Table 1's "
                   "setting (a) c4; got a one_stage detector of setting (c) fpn"]
    assert "AP@" not in captured.out


# ---- training with scale jitter (TrainConfig.scale_jitter, minifpn train --scale-jitter) ----------

def jitter_config(iterations, **kw):
    from minifpn.train import TrainConfig
    return TrainConfig(**{"iterations": iterations, "batch_size": 2, "lr": 0.01, "warmup": 2,
                          "checkpoint_every": 100, "scale_jitter": (0.5, 1, 2), **kw})


def spy_on_loss(monkeypatch, stop_at=None):
    """Record the image sides of every Detector.loss call; Ctrl-C at call ``stop_at``."""
    real, sides = Detector.loss, []

    def spy(self, images, *args, **kwargs):
        if len(sides) + 1 == stop_at:
            raise KeyboardInterrupt
        sides.append(images.shape[2:])
        return real(self, images, *args, **kwargs)

    monkeypatch.setattr(Detector, "loss", spy)
    return sides


def test_without_scale_jitter_a_step_draws_nothing_from_the_runs_rng():
    """The default () takes no draw, so a run without jitter is the run it was before the option."""
    from minifpn.train import TrainConfig
    assert TrainConfig().scale_jitter == ()
    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    assert TrainConfig().jitter_scale(rng) is None and rng.bit_generator.state == before
    drawn = [jitter_config(1).jitter_scale(rng) for _ in range(60)]
    assert set(drawn) == {0.5, 1.0, 2.0} and rng.bit_generator.state != before


def test_each_step_trains_at_a_drawn_scale_and_resume_is_exact(tmp_path, monkeypatch):
    """Sides 64, 128 or 256 per step; a run stopped by Ctrl-C at step 3 and resumed draws the
    scales of the uninterrupted run and ends with its weights."""
    from minifpn.train import TrainingInterrupted, load_checkpoint, train
    sides = spy_on_loss(monkeypatch)
    straight = tiny_c4()
    train(straight, jitter_config(6), str(tmp_path / "a"), progress=False)
    assert {s[0] for s in sides} <= {64, 128, 256} and len({s[0] for s in sides}) > 1, sides
    straight_sides = list(sides)
    monkeypatch.undo()

    stopped = spy_on_loss(monkeypatch, stop_at=3)
    with pytest.raises(TrainingInterrupted):
        train(tiny_c4(), jitter_config(6), str(tmp_path / "b"), progress=False)
    monkeypatch.undo()
    meta = load_checkpoint(tmp_path / "b" / "checkpoint.npz")["meta"]
    assert meta["iteration"] == 2 and meta["train_config"]["scale_jitter"] == [0.5, 1.0, 2.0]
    resumed_sides = spy_on_loss(monkeypatch)
    resumed = tiny_c4()
    train(resumed, jitter_config(6), str(tmp_path / "b"), resume=True, progress=False)
    assert stopped + resumed_sides == straight_sides
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=name)


def test_a_resume_with_other_scales_is_refused(tmp_path):
    from minifpn.train import CheckpointError, train
    train(tiny_c4(), jitter_config(1), str(tmp_path), progress=False)
    with pytest.raises(CheckpointError, match=r"--scale-jitter: checkpoint \[0.5, 1.0, 2.0\], now \[\]"):
        train(tiny_c4(), jitter_config(1, scale_jitter=()), str(tmp_path), resume=True, progress=False)


@pytest.mark.parametrize("scales", [(0,), (1, -2), (float("nan"),), "1,2", 2.0, (True,)])
def test_train_config_refuses_bad_scales(scales):
    with pytest.raises(ValueError, match=r"TrainConfig: scale_jitter must be image scales > 0"):
        jitter_config(1, scale_jitter=scales)


def test_train_with_scale_jitter_on_the_command_line(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["train", "--setting", "c4", *TINY, "--runs", str(runs), "--name", "j",
                 "--scale-jitter", "0.5,2"]) == 0
    summary = json.loads((runs / "j" / "metrics.json").read_text())
    assert summary["iterations"] == 2 and 0 <= summary["metrics"]["AP50"] <= 1
    from minifpn.train import load_checkpoint
    stored = load_checkpoint(runs / "j" / "checkpoint.npz")["meta"]["train_config"]
    assert stored["scale_jitter"] == [0.5, 2.0]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["train", "--setting", "c4", *TINY, "--runs", str(runs), "--scale-jitter", "0.5,0"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "minifpn train: error: --scale-jitter must be image scales > 0 separated by commas "
        "(e.g. 0.5,1,2), got '0.5,0'")
