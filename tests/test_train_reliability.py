"""Training reliability: divergence stops before it can reach a checkpoint, the default recipe is
stable at every batch size, Ctrl-C keeps the last completed step, resume refuses silent changes,
and a checkpoint that disagrees with its own configuration is named as such."""
import json
import math

import numpy as np
import pytest

import minifpn.train as train_module
from minifpn.data import DigitScenes
from minifpn.models.detector import Detector, DetectorConfig
from minifpn.optim import SGD
from minifpn.train import (
    CheckpointError,
    TrainConfig,
    TrainingDiverged,
    TrainingInterrupted,
    detector_from_checkpoint,
    evaluate_detector,
    load_checkpoint,
    train,
    weight_norms,
)


def tiny_detector():
    return Detector(DetectorConfig(widths=(4, 4, 4, 4), channels=4, anchors_per_image=32))


def tiny(iterations, **kw):
    return TrainConfig(**{"iterations": iterations, "batch_size": 2, "lr": 0.01, "warmup": 2,
                          "checkpoint_every": 1, **kw})


def norm_of(state: dict) -> float:
    return math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for k, v in state.items()
                         if v.dtype.kind == "f" and "running" not in k))


# ---- the linear scaling rule ---------------------------------------------------------------------

def test_default_lr_follows_the_linear_scaling_rule():
    assert TrainConfig().lr is None
    assert TrainConfig().peak_lr() == pytest.approx(0.05)  # tuned at batch 8
    assert TrainConfig(batch_size=1).peak_lr() == pytest.approx(0.00625)
    assert TrainConfig(batch_size=2).peak_lr() == pytest.approx(0.0125)
    assert TrainConfig(batch_size=16).peak_lr() == pytest.approx(0.1)
    assert TrainConfig(batch_size=2, lr=0.3).peak_lr() == 0.3  # an explicit lr wins


def test_training_uses_the_scaled_lr(tmp_path):
    history = train(tiny_detector(), tiny(3, lr=None, warmup=0, batch_size=1, milestones=()), str(tmp_path),
                    progress=False)
    assert history["lr"] == [pytest.approx(0.05 / 8)] * 3
    assert load_checkpoint(tmp_path / "checkpoint.npz")["meta"]["peak_lr"] == pytest.approx(0.05 / 8)


@pytest.mark.slow
def test_default_recipe_does_not_diverge_at_batch_1_2_16(tmp_path):
    """The demo detector (DetectorConfig() defaults) with TrainConfig's defaults: 300 steps at
    batch 1, 2 and 16, all with the divergence checks on (about 3 minutes on one core with one
    BLAS thread, most of it batch 16). Measured in docs/results.md."""
    for batch_size, steps in ((1, 300), (2, 300), (16, 300)):
        config = TrainConfig(iterations=steps, batch_size=batch_size, checkpoint_every=10 ** 6)
        history = train(Detector(DetectorConfig()), config, str(tmp_path / f"b{batch_size}"),
                        progress=False)
        loss = np.asarray(history["loss"])
        assert len(loss) == steps, batch_size  # no stop, no divergence
        assert loss[-20:].mean() < 0.5 * loss[:10].mean(), (batch_size, loss[:10].mean(), loss[-20:].mean())
        assert max(history["lr"]) == pytest.approx(0.05 * batch_size / 8)
        # the margin under the explosion check: measured at most 2.7x (batch 1), checked at 10x
        worst = max(loss[i] / np.median(loss[max(0, i - 50):i]) for i in range(20, steps))
        assert worst < 5, (batch_size, worst)


# ---- divergence ------------------------------------------------------------------------------------

def test_divergence_leaves_a_checkpoint_that_evaluates_and_resumes(tmp_path):
    run = str(tmp_path)
    det = tiny_detector()
    train(det, tiny(3), run, progress=False)  # three good steps, each checkpointed
    good_norm = norm_of(det.state_dict())
    with pytest.raises(TrainingDiverged) as caught:
        train(det, tiny(10, lr=1e4), run, resume=True, allow_changes=True, progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert "the weight norm jumped from" in message and "in one step at iteration 3 (lr 10000)" in message
    assert "last good checkpoint" in message and "(iteration 3), was left as it was" in message
    assert "Try a smaller --lr" in message

    ckpt = load_checkpoint(tmp_path / "checkpoint.npz")
    assert ckpt["meta"]["iteration"] == 3
    assert all(np.isfinite(v).all() for v in ckpt["model"].values())
    assert norm_of(ckpt["model"]) == pytest.approx(good_norm, rel=1e-6)  # nothing of lr 1e4 in it

    rebuilt, _ = detector_from_checkpoint(tmp_path / "checkpoint.npz")
    metrics, detections, _ = evaluate_detector(rebuilt, "test", n=2, batch_size=2)
    assert len(detections) == 2 and 0.0 <= metrics["AP50"] <= 1.0

    resumed = tiny_detector()
    history = train(resumed, tiny(5), run, resume=True, allow_changes=True, progress=False)
    assert history["iteration"] == [1, 2, 3, 4, 5]
    assert np.isfinite(history["loss"]).all()
    assert norm_of(resumed.state_dict()) < 2 * good_norm


def test_divergence_at_the_first_step_still_leaves_the_initial_weights(tmp_path):
    det = tiny_detector()
    initial = det.state_dict()
    with pytest.raises(TrainingDiverged, match=r"at iteration 0 \(lr 10000\);.*\(iteration 0\)"):
        train(det, tiny(5, lr=1e4, warmup=0), str(tmp_path), progress=False)
    rebuilt, ckpt = detector_from_checkpoint(tmp_path / "checkpoint.npz")
    assert ckpt["meta"]["iteration"] == 0
    for name, value in rebuilt.state_dict().items():
        np.testing.assert_array_equal(value, initial[name], err_msg=name)


def test_exploding_loss_stops_before_its_step(tmp_path, monkeypatch):
    real_loss = Detector.loss
    calls = {"n": 0}

    def spike_at_step_25(self, *args, **kwargs):
        calls["n"] += 1
        loss, parts = real_loss(self, *args, **kwargs)
        return (loss * 100, parts) if calls["n"] == 26 else (loss, parts)

    monkeypatch.setattr(Detector, "loss", spike_at_step_25)
    with pytest.raises(TrainingDiverged, match=r"the loss exploded to \S+, over 10x its median \S+ over "
                                               r"the last 25 steps at iteration 25"):
        train(tiny_detector(), tiny(30, checkpoint_every=5), str(tmp_path), progress=False)
    assert load_checkpoint(tmp_path / "checkpoint.npz")["meta"]["iteration"] == 25


def test_a_loss_spike_of_a_few_x_is_not_divergence(tmp_path, monkeypatch):
    real_loss = Detector.loss
    calls = {"n": 0}

    def spike_3x(self, *args, **kwargs):
        calls["n"] += 1
        loss, parts = real_loss(self, *args, **kwargs)
        return (loss * 3, parts) if calls["n"] == 23 else (loss, parts)

    monkeypatch.setattr(Detector, "loss", spike_3x)
    history = train(tiny_detector(), tiny(24, checkpoint_every=24), str(tmp_path), progress=False)
    assert len(history["loss"]) == 24


def test_weight_norms_is_one_batched_check(monkeypatch):
    det = tiny_detector()
    transfers = []
    real = train_module.to_numpy
    monkeypatch.setattr(train_module, "to_numpy", lambda a: transfers.append(a.shape) or real(a))
    params, buffers = weight_norms(det)
    assert transfers == [(2,)]  # one transfer of two sums for all 94 arrays
    state = det.state_dict()
    assert params == pytest.approx(norm_of(state), rel=1e-12)
    assert buffers == pytest.approx(math.sqrt(sum(float((v.astype(np.float64) ** 2).sum())
                                                  for k, v in state.items() if "running" in k)))
    dict(det.named_parameters())["head.cls_logits.bias"].data[3] = np.nan
    assert math.isnan(weight_norms(det)[0])
    dict(det.named_parameters())["head.cls_logits.bias"].data[3] = 0
    dict(det.named_buffers())["backbone.bn1.running_var"][0] = np.inf
    assert math.isfinite(weight_norms(det)[0]) and math.isinf(weight_norms(det)[1])


def test_a_non_finite_running_statistic_is_divergence(tmp_path, monkeypatch):
    real_step = SGD.step

    def poison_running_var(self):
        real_step(self)
        det_buffers["backbone.bn1.running_var"][0] = np.inf

    det = tiny_detector()
    det_buffers = dict(det.named_buffers())
    monkeypatch.setattr(SGD, "step", poison_running_var)
    with pytest.raises(TrainingDiverged, match="a weight became NaN or infinite at iteration 0"):
        train(det, tiny(3), str(tmp_path), progress=False)


# ---- Ctrl-C ----------------------------------------------------------------------------------------

def test_ctrl_c_checkpoints_the_last_completed_step_and_resumes_exactly(tmp_path, monkeypatch):
    straight = tiny_detector()
    train(straight, tiny(5, checkpoint_every=100), str(tmp_path / "a"), progress=False)

    real_loss = Detector.loss
    calls = {"n": 0}

    def ctrl_c_at_step_3(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_loss(self, *args, **kwargs)

    monkeypatch.setattr(Detector, "loss", ctrl_c_at_step_3)
    run = tmp_path / "b"
    with pytest.raises(TrainingInterrupted) as caught:
        train(tiny_detector(), tiny(5, checkpoint_every=100), str(run), progress=True)
    path = str(run / "checkpoint.npz")
    assert caught.value.iteration == 2 and caught.value.path == path
    assert str(caught.value) == f"interrupted at step 2; checkpoint saved to {path}"
    meta = load_checkpoint(path)["meta"]
    assert meta["iteration"] == 2 and meta["images_seen"] == 4 and meta["history"]["iteration"] == [1, 2]
    monkeypatch.undo()

    resumed = tiny_detector()
    history = train(resumed, tiny(5, checkpoint_every=100), str(run), resume=True, progress=False)
    assert history["iteration"] == [1, 2, 3, 4, 5] and history["images_seen"] == [2, 4, 6, 8, 10]
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=name)


def test_ctrl_c_during_the_update_keeps_the_checkpoint_on_disk(tmp_path, monkeypatch):
    real_step = SGD.step
    calls = {"n": 0}

    def ctrl_c_in_third_update(self):
        calls["n"] += 1
        if calls["n"] == 3:
            next(iter(self.params.values())).data[...] = 7.0  # half-written weights
            raise KeyboardInterrupt
        real_step(self)

    monkeypatch.setattr(SGD, "step", ctrl_c_in_third_update)
    with pytest.raises(TrainingInterrupted, match="interrupted at step 0; checkpoint saved to"):
        train(tiny_detector(), tiny(5, checkpoint_every=100), str(tmp_path), progress=False)
    ckpt = load_checkpoint(tmp_path / "checkpoint.npz")
    assert ckpt["meta"]["iteration"] == 0 and not (ckpt["model"]["backbone.conv1.weight"] == 7.0).any()


def test_a_stale_temporary_checkpoint_is_removed(tmp_path):
    stale = tmp_path / "checkpoint.npz.tmp"
    stale.write_bytes(b"half a zip")
    lines = []
    train(tiny_detector(), tiny(1), str(tmp_path), progress=False, log=lines.append)
    assert not stale.exists()
    assert lines == [f"removed {stale}, left by a checkpoint write that was killed; "
                     f"{tmp_path / 'checkpoint.npz'} was not touched"]


# ---- resume refuses silent changes -------------------------------------------------------------

def test_resume_with_another_schedule_names_each_difference(tmp_path):
    train(tiny_detector(), tiny(2), str(tmp_path), progress=False)
    with pytest.raises(CheckpointError, match=(
            r"another schedule: --lr: checkpoint 0\.01, now 0\.1; --batch-size: checkpoint 2, now 4; "
            r"--warmup: checkpoint 2, now 5; --milestones: checkpoint \[0\.75, 0\.9\], now \[0\.5\]; "
            r"resume with the same values, or allow the change explicitly")):
        train(tiny_detector(), tiny(2, lr=0.1, batch_size=4, warmup=5, milestones=(0.5,)), str(tmp_path),
              resume=True, progress=False)
    with pytest.raises(CheckpointError, match=r"--iterations: checkpoint 2, now 3; resume"):
        train(tiny_detector(), tiny(3), str(tmp_path), resume=True, progress=False)
    # the default lr follows the batch size, so a new batch size alone changes it too
    train(tiny_detector(), tiny(2, lr=None), str(tmp_path / "d"), progress=False)
    with pytest.raises(CheckpointError, match=r"--lr: checkpoint 0\.0125, now 0\.025; --batch-size: "
                                              r"checkpoint 2, now 4"):
        train(tiny_detector(), tiny(2, lr=None, batch_size=4), str(tmp_path / "d"), resume=True,
              progress=False)


def test_allowed_changes_are_recorded_and_no_scene_is_seen_twice(tmp_path, monkeypatch):
    train(tiny_detector(), tiny(4), str(tmp_path), progress=False, time_limit=0)  # stops at step 1
    scenes_seen = []
    real_batch = DigitScenes.batch
    monkeypatch.setattr(DigitScenes, "batch", lambda self, idx: scenes_seen.append(list(idx))
                        or real_batch(self, idx))
    history = train(tiny_detector(), tiny(4, batch_size=4, lr=0.02), str(tmp_path), resume=True,
                    allow_changes=True, progress=False, log=lambda line: None)
    assert scenes_seen == [[2, 3, 4, 5], [6, 7, 8, 9], [10, 11, 12, 13]]  # after scenes 0 and 1
    assert history["images_seen"] == [2, 6, 10, 14]
    meta = load_checkpoint(tmp_path / "checkpoint.npz")["meta"]
    assert meta["images_seen"] == 14 and meta["iteration"] == 4
    assert meta["changes"] == [{"at_iteration": 1,
                                "changed": {"--lr": [0.01, 0.02], "--batch-size": [2, 4]}}]


# ---- a checkpoint that disagrees with its own configuration --------------------------------------

def rewrite(path, edit_meta=None, drop=(), add=None):
    """Hand-edit a checkpoint file the way a user (or another program) might."""
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["meta"]))
    if edit_meta:
        edit_meta(meta)
    arrays["meta"] = np.array(json.dumps(meta))
    for key in drop:
        del arrays[key]
    arrays.update(add or {})
    np.savez(path, **arrays)


def test_a_checkpoint_whose_configuration_disagrees_with_its_arrays(tmp_path):
    train(tiny_detector(), tiny(1), str(tmp_path), progress=False)
    path = tmp_path / "checkpoint.npz"
    rewrite(path, edit_meta=lambda m: m["detector_config"].update(widths=[8, 8, 8, 8]))
    with pytest.raises(CheckpointError, match=(
            rf"checkpoint {path}: array backbone\.conv1\.weight has shape \(4, 1, 3, 3\) but its "
            r"configuration \(setting='fpn', widths=\(8, 8, 8, 8\), blocks=\(1, 1, 1, 1\), channels=4, "
            r"num_classes=10, in_channels=1\) expects \(8, 1, 3, 3\); .* \(and \d+ more\)$")):
        detector_from_checkpoint(path)


def test_a_checkpoint_with_missing_or_unexpected_arrays(tmp_path):
    train(tiny_detector(), tiny(1), str(tmp_path), progress=False)
    path = tmp_path / "checkpoint.npz"
    rewrite(path, drop=["model/head.conv.weight"], add={"model/extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match=r"array head\.conv\.weight is missing; array extra\.weight "
                                              r"is unexpected$"):
        detector_from_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"array head\.conv\.weight is missing"):
        train(tiny_detector(), tiny(2), str(tmp_path), resume=True, progress=False)


def test_a_checkpoint_with_a_foreign_configuration(tmp_path):
    train(tiny_detector(), tiny(1), str(tmp_path), progress=False)
    path = tmp_path / "checkpoint.npz"
    rewrite(path, edit_meta=lambda m: m["detector_config"].update(depth=50))
    with pytest.raises(CheckpointError, match=r"has no usable detector configuration \(TypeError: .*depth"):
        detector_from_checkpoint(path)
