"""Training: optimizer, schedule, checkpoints that survive a crash, exact resume, divergence."""
import os

import numpy as np
import pytest

from minifpn.models.detector import Detector, DetectorConfig
from minifpn.nn import Parameter
from minifpn.optim import SGD, learning_rate
from minifpn.train import (
    CheckpointError,
    TrainConfig,
    TrainingDiverged,
    detector_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
    train,
)


def small_detector(**kw):
    return Detector(DetectorConfig(**{"widths": (4, 8, 8, 16), "channels": 8,
                                      "anchors_per_image": 64, **kw}))


def quick(iterations, **kw):
    return TrainConfig(**{"iterations": iterations, "batch_size": 2, "lr": 0.01, "warmup": 2,
                          "checkpoint_every": 2, **kw})


def test_sgd_matches_pytorch_rule():
    p = Parameter(np.array([1.0, -2.0]))
    opt = SGD([("p", p)], lr=0.1, momentum=0.9, weight_decay=0.01)
    p.grad[...] = [0.5, 0.5]
    opt.step()  # v = g + wd*p = [0.51, 0.48]; p -= 0.1 v
    np.testing.assert_allclose(p.data, [1 - 0.051, -2 - 0.048])
    p.grad[...] = [0.0, 0.0]
    opt.step()  # v = 0.9 v + wd * p
    v = 0.9 * np.array([0.51, 0.48]) + 0.01 * np.array([0.949, -2.048])
    np.testing.assert_allclose(p.data, np.array([0.949, -2.048]) - 0.1 * v)


def test_sgd_matches_torch_optim(rng):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    w = rng.standard_normal(5)
    ours = Parameter(w.copy())
    theirs = torch.tensor(w.copy(), requires_grad=True)
    opt = SGD([("w", ours)], lr=0.05, momentum=0.9, weight_decay=1e-3)
    t_opt = torch.optim.SGD([theirs], lr=0.05, momentum=0.9, weight_decay=1e-3)
    for _ in range(4):
        g = rng.standard_normal(5)
        ours.grad[...] = g
        theirs.grad = torch.tensor(g)
        opt.step()
        t_opt.step()
    np.testing.assert_allclose(ours.data, theirs.detach().numpy(), rtol=1e-12)


def test_learning_rate_warmup_then_steps():
    assert learning_rate(0, 0.02, 1000, warmup=100) == pytest.approx(0.02 * 0.001)
    assert learning_rate(50, 0.02, 1000, warmup=100) == pytest.approx(0.02 * (0.0005 + 0.5))
    assert learning_rate(100, 0.02, 1000, warmup=100) == pytest.approx(0.02)
    assert learning_rate(750, 0.02, 1000, warmup=100) == pytest.approx(0.002)
    assert learning_rate(900, 0.02, 1000, warmup=100) == pytest.approx(0.0002)


def test_training_lowers_the_loss(tmp_path):
    det = small_detector()
    history = train(det, quick(30, lr=0.02, checkpoint_every=30), str(tmp_path), progress=False)
    first, last = np.mean(history["loss"][:5]), np.mean(history["loss"][-5:])
    assert len(history["loss"]) == 30 and last < 0.8 * first, (first, last)


def test_resume_continues_the_same_run(tmp_path):
    straight = small_detector()
    train(straight, quick(6), str(tmp_path / "a"), progress=False)
    stopped = small_detector()
    train(stopped, quick(6), str(tmp_path / "b"), progress=False, time_limit=0)  # stops at 1
    assert load_checkpoint(tmp_path / "b" / "checkpoint.npz")["meta"]["iteration"] == 1
    resumed = small_detector()
    for p in resumed.parameters():  # scrambled weights: everything must come from the file
        p.data[...] = 0.5
    history = train(resumed, quick(6), str(tmp_path / "b"), resume=True, progress=False)
    assert history["iteration"] == list(range(1, 7))
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=name)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    det = small_detector()
    train(det, quick(2), str(tmp_path), progress=False)
    path = tmp_path / "checkpoint.npz"
    good = path.read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed in the middle of writing")

    monkeypatch.setattr(np, "savez", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(path), det, SGD(det.named_parameters(), 0.1), {"iteration": 99})
    assert path.read_bytes() == good  # the previous checkpoint is untouched
    monkeypatch.undo()
    assert load_checkpoint(path)["meta"]["iteration"] == 2


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    det = small_detector()
    train(det, quick(2), str(tmp_path), progress=False)
    path = tmp_path / "checkpoint.npz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.npz")


def test_checkpoint_from_another_configuration_is_refused(tmp_path):
    train(small_detector(), quick(2), str(tmp_path), progress=False)
    other = small_detector(setting="c4")
    with pytest.raises(CheckpointError,
                       match="another configuration: setting: checkpoint 'fpn' vs detector 'c4'"):
        train(other, quick(4), str(tmp_path), resume=True, progress=False)
    rebuilt, ckpt = detector_from_checkpoint(tmp_path / "checkpoint.npz")
    assert rebuilt.config.setting == "fpn" and ckpt["meta"]["iteration"] == 2


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    det = small_detector()
    train(det, quick(2), str(tmp_path), progress=False)
    good = (tmp_path / "checkpoint.npz").read_bytes()
    real_loss = Detector.loss
    calls = {"n": 0}

    def nan_on_second_call(self, *args, **kwargs):
        calls["n"] += 1
        loss, parts = real_loss(self, *args, **kwargs)
        return (float("nan"), parts) if calls["n"] == 2 else (loss, parts)

    monkeypatch.setattr(Detector, "loss", nan_on_second_call)
    with pytest.raises(TrainingDiverged, match="the loss became nan at iteration 3.*last good checkpoint"):
        train(det, quick(8), str(tmp_path), resume=True, progress=False, allow_changes=True)
    assert (tmp_path / "checkpoint.npz").read_bytes() == good
    assert not os.path.exists(tmp_path / "checkpoint.npz.tmp")
