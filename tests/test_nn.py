"""Modules: gradient checks of every layer, PyTorch-style names and state dicts, modes, init."""
import math

import numpy as np
import pytest

from minifpn import nn
from minifpn.backend import BackendError, _cupy, to_device, to_numpy
from minifpn.gradcheck import check_module, distinct_values

TOL = 1e-6




LAYERS = {
    "conv3x3_s1_p1": (lambda r: nn.Conv2d(3, 4, 3, 1, 1, rng=r), (2, 3, 7, 6)),
    "conv3x3_s2_p1_odd": (lambda r: nn.Conv2d(2, 3, 3, 2, 1, rng=r), (2, 2, 9, 7)),
    "conv1x1_lateral": (lambda r: nn.Conv2d(5, 3, 1, rng=r), (2, 5, 4, 5)),
    "conv1x1_s2_projection": (lambda r: nn.Conv2d(3, 4, 1, 2, bias=False, rng=r), (2, 3, 7, 7)),
    "conv7x7_s2_p3_stem": (lambda r: nn.Conv2d(1, 2, 7, 2, 3, bias=False, rng=r), (1, 1, 11, 9)),
    "batchnorm": (lambda r: nn.BatchNorm2d(3), (3, 3, 4, 5)),
    "relu": (lambda r: nn.ReLU(), (2, 3, 4, 4)),
    "maxpool3_s2_p1": (lambda r: nn.MaxPool2d(3, 2, 1), (2, 2, 9, 8)),
    "maxpool1_s2_p6": (lambda r: nn.MaxPool2d(1, 2), (2, 2, 5, 5)),
    "upsample2x": (lambda r: nn.Upsample(2), (2, 3, 3, 4)),
    "sequential": (lambda r: nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1, bias=False, rng=r),
                                           nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(3, 2, 1)),
                   (2, 3, 10, 9)),
}


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layer_gradients(name, training, backend, rng):
    build, shape = LAYERS[name]
    module = build(rng).to(backend, dtype=np.float64).train(training)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):  # make scale, shift and running stats non-trivial
            m.weight.data[...] = to_device(rng.standard_normal(m.num_features), backend)
            m.bias.data[...] = to_device(rng.standard_normal(m.num_features), backend)
            m.running_mean[...] = to_device(rng.standard_normal(m.num_features), backend)
            m.running_var[...] = to_device(rng.uniform(0.5, 2, m.num_features), backend)
    pool_or_relu = any(isinstance(m, (nn.ReLU, nn.MaxPool2d)) for m in module.modules())
    x = distinct_values(rng, shape) if pool_or_relu and name != "sequential" else rng.standard_normal(shape)
    # conv-bn-relu-pool in training mode: batch statistics couple every input, and the smallest
    # input gradients sit at h = 1e-5's rounding floor (eps |f| / h: 1.04e-6 relative, falling as
    # 1/h); the conv weight meets a max-pool switch within 1e-4. So each gets its own step:
    # measured input 6.4e-8 at h = 1e-4, weights 6.1e-9 at h = 1e-5.
    h = {"input": 1e-4} if name == "sequential" and training else 1e-5
    result = check_module(name, str(shape), module, to_device(x, backend), tol=TOL, h=h)
    assert set(result.errors) == {"input"} | {n for n, _ in module.named_parameters()}
    assert result.max_error < TOL, result.errors


def test_parameter_gradients_accumulate_until_zero_grad(rng):
    conv = nn.Conv2d(2, 3, 3, padding=1, rng=rng).to(dtype=np.float64)
    x = rng.standard_normal((1, 2, 5, 5))
    dout = rng.standard_normal((1, 3, 5, 5))
    conv(x)
    conv.backward(dout)
    once = conv.weight.grad.copy()
    conv(x)
    conv.backward(dout)  # a shared layer used twice gets both contributions
    np.testing.assert_allclose(conv.weight.grad, 2 * once)
    conv.zero_grad()
    assert not conv.weight.grad.any() and not conv.bias.grad.any()


def test_train_and_eval_reach_every_module():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.BatchNorm2d(2), nn.ReLU()))
    assert all(m.training for m in net.modules())
    net.eval()
    assert not any(m.training for m in net.modules())
    assert net.train() is net and all(m.training for m in net.modules())


def test_batchnorm_eval_uses_running_statistics(rng):
    bn = nn.BatchNorm2d(2).to(dtype=np.float64)
    bn.running_mean[...] = [1.0, -2.0]
    bn.running_var[...] = [4.0, 0.25]
    x = rng.standard_normal((3, 2, 4, 4))
    out = bn.eval()(x)
    expected = (x - np.array([1.0, -2.0]).reshape(1, 2, 1, 1)) / np.sqrt(
        np.array([4.0, 0.25]).reshape(1, 2, 1, 1) + 1e-5)
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    assert int(bn.num_batches_tracked) == 0
    bn.train()(x)
    assert int(bn.num_batches_tracked) == 1


def test_state_dict_names_are_dotted_like_pytorch():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Sequential(nn.Conv2d(4, 2, 1)))
    assert list(net.state_dict()) == [
        "0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var",
        "1.num_batches_tracked", "3.0.weight", "3.0.bias"]
    assert [n for n, _ in net.named_parameters()] == [
        "0.weight", "1.weight", "1.bias", "3.0.weight", "3.0.bias"]


def test_state_dict_round_trip_and_is_a_snapshot(rng):
    a = nn.Sequential(nn.Conv2d(3, 4, 3, rng=rng), nn.BatchNorm2d(4))
    b = nn.Sequential(nn.Conv2d(3, 4, 3, rng=np.random.default_rng(99)), nn.BatchNorm2d(4))
    a[1].running_mean[...] = 0.5
    state = a.state_dict()
    b.load_state_dict(state)
    for (name, value) in b.state_dict().items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)
    a[0].weight.data[...] = 0  # changing a afterwards must not change the snapshot
    assert state["0.weight"].any()
    assert b[0].weight.data.dtype == np.float32


def test_load_state_dict_names_the_bad_key():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    state = net.state_dict()
    with pytest.raises(KeyError, match=r"missing keys \['0.bias'\]"):
        net.load_state_dict({k: v for k, v in state.items() if k != "0.bias"})
    with pytest.raises(KeyError, match=r"unexpected keys \['2.weight'\]"):
        net.load_state_dict({**state, "2.weight": np.zeros(1)})
    with pytest.raises(ValueError,
                       match=r"0.weight has shape \(4, 3, 1, 1\) in the state dict but \(4, 3, 3, 3\)"):
        net.load_state_dict({**state, "0.weight": np.zeros((4, 3, 1, 1), np.float32)})


def test_to_changes_dtype_of_parameters_grads_and_buffers():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).to(dtype=np.float64)
    assert all(p.data.dtype == p.grad.dtype == np.float64 for p in net.parameters())
    assert net[1].running_mean.dtype == np.float64
    assert net[1].num_batches_tracked.dtype == np.int64  # integers are not cast


@pytest.mark.skipif(_cupy is not None, reason="CuPy is installed here")
def test_moving_to_missing_cupy_is_a_clear_error():
    with pytest.raises(BackendError, match="CuPy is not installed"):
        nn.Conv2d(1, 2, 3).to("cupy")


def test_kaiming_uniform_a1_bound_and_zero_bias():
    conv = nn.Conv2d(64, 256, 1, rng=np.random.default_rng(0))
    bound = math.sqrt(3 / 64)  # gain 1 for a = 1: U(-sqrt(3/fan_in), sqrt(3/fan_in))
    w = to_numpy(conv.weight.data)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    assert abs(w.std() - bound / math.sqrt(3)) < 0.01 * bound
    assert not conv.bias.data.any()


def test_he_normal_std_and_seeds_reproduce():
    a, b = nn.Conv2d(32, 64, 3, bias=False), nn.Conv2d(32, 64, 3, bias=False)
    nn.init.he_normal_(a.weight, rng=np.random.default_rng(5))
    nn.init.he_normal_(b.weight, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(a.weight.data, b.weight.data)
    assert abs(a.weight.data.std() - math.sqrt(2 / (64 * 9))) < 0.02 * math.sqrt(2 / (64 * 9))
    assert a.weight.data.dtype == np.float32


def test_modules_match_torch_modules_by_name(rng):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    ours = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1), nn.Conv2d(4, 5, 1))
    theirs = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, 2, 1, bias=False),
                                 torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                 torch.nn.MaxPool2d(3, 2, 1), torch.nn.Conv2d(4, 5, 1))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    for mode in ("train", "eval"):
        getattr(ours, mode)(), getattr(theirs, mode)()
        x = rng.standard_normal((2, 3, 13, 11)).astype(np.float32)
        tx = torch.tensor(x, requires_grad=True)
        out, t_out = ours(x), theirs(tx)
        dout = rng.standard_normal(out.shape).astype(np.float32)
        ours.zero_grad()
        theirs.zero_grad()
        dx = ours.backward(dout)
        t_out.backward(torch.tensor(dout))
        np.testing.assert_allclose(out, t_out.detach().numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-4, atol=1e-5)
        for (name, p), (t_name, tp) in zip(ours.named_parameters(), theirs.named_parameters()):
            assert name == t_name
            np.testing.assert_allclose(p.grad, tp.grad.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
        for name, value in theirs.state_dict().items():  # running statistics included
            np.testing.assert_allclose(ours.state_dict()[name], value.numpy(), rtol=1e-5,
                                       atol=1e-6, err_msg=name)


def test_evaluating_runs_a_block_in_eval_mode_and_restores_the_mode():
    from minifpn.nn import BatchNorm2d
    bn = BatchNorm2d(2)
    with bn.evaluating():
        assert not bn.training
    assert bn.training
    bn.eval()
    with pytest.raises(RuntimeError, match="inside"), bn.evaluating():
        raise RuntimeError("inside")
    assert not bn.training  # it was in eval mode before the block, and is again
    bn.train()
    with pytest.raises(RuntimeError), bn.evaluating():
        assert not bn.training
        raise RuntimeError("inside")
    assert bn.training
