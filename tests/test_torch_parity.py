"""Every op's forward and every gradient against torch.nn.functional, in float32 and float64,
over the same sweep as the gradient checks. Skipped, with a reason, where torch is missing."""
import numpy as np
import pytest
from sweeps import BATCH_NORM_SHAPES, CONV_CASES, POOL_CASES, UPSAMPLE_CASES
from torch_helpers import assert_matches, tensor, torch

from minifpn import functional as F
from minifpn.backend import to_device, to_numpy

TF = torch.nn.functional
DTYPES = [np.float32, np.float64]


def draw(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("N,C,H,W,OC,k,s,p,bias", CONV_CASES)
def test_conv2d_matches_torch(N, C, H, W, OC, k, s, p, bias, dtype, backend, rng):
    x, w = draw(rng, (N, C, H, W), dtype), draw(rng, (OC, C, k, k), dtype)
    b = draw(rng, (OC,), dtype) if bias else None
    out, cache = F.conv2d(to_device(x, backend), to_device(w, backend),
                          None if b is None else to_device(b, backend), s, p)
    dout = draw(rng, out.shape, dtype)
    dx, dw, db = F.conv2d_backward(to_device(dout, backend), cache)

    tx, tw = tensor(x, True), tensor(w, True)
    tb = tensor(b, True) if bias else None
    t_out = TF.conv2d(tx, tw, tb, stride=s, padding=p)
    t_out.backward(tensor(dout))
    assert_matches(out, t_out, dtype, "out")
    assert_matches(dx, tx.grad, dtype, "dx")
    assert_matches(dw, tw.grad, dtype, "dweight")
    if bias:
        assert_matches(db, tb.grad, dtype, "dbias")
    else:
        assert db is None


def pool_both(x, k, s, p, dtype, backend, rng):
    """max_pool2d forward and backward (random upstream gradient) here and in torch:
    returns (out, dx, torch out, torch input whose .grad is torch's dx)."""
    out, cache = F.max_pool2d(to_device(x, backend), k, s, p)
    dout = draw(rng, out.shape, dtype)
    dx = F.max_pool2d_backward(to_device(dout, backend), cache)
    tx = tensor(x, True)
    t_out = TF.max_pool2d(tx, k, s, p)
    t_out.backward(tensor(dout))
    return out, dx, t_out, tx


@pytest.mark.parametrize("shape,k,s,p", POOL_CASES)
def test_max_pool2d_matches_torch(shape, k, s, p, dtype, backend, rng):
    out, dx, t_out, tx = pool_both(draw(rng, shape, dtype), k, s, p, dtype, backend, rng)
    assert_matches(out, t_out, dtype, "out")
    assert_matches(dx, tx.grad, dtype, "dx")


def test_max_pool2d_ties_go_to_the_first_entry_as_in_torch(backend):
    x = np.array([[[[1.0, 1.0], [1.0, 0.0]]]], dtype=np.float32)  # three tied maxima
    out, cache = F.max_pool2d(to_device(x, backend), 2, 2)
    dx = F.max_pool2d_backward(to_device(np.ones((1, 1, 1, 1), np.float32), backend), cache)
    tx = tensor(x, True)
    TF.max_pool2d(tx, 2, 2).backward(torch.ones(1, 1, 1, 1))
    assert_matches(dx, tx.grad, np.float32, "dx")
    np.testing.assert_array_equal(to_numpy(dx).ravel(), [1, 0, 0, 0])


@pytest.mark.parametrize("shape,size", UPSAMPLE_CASES)
def test_upsample_nearest_matches_torch(shape, size, dtype, backend, rng):
    x = draw(rng, shape, dtype)
    out, cache = F.upsample_nearest(to_device(x, backend), size)
    dout = draw(rng, out.shape, dtype)
    dx = F.upsample_nearest_backward(to_device(dout, backend), cache)
    tx = tensor(x, True)
    t_out = TF.interpolate(tx, size=size, mode="nearest")
    t_out.backward(tensor(dout))
    assert_matches(out, t_out, dtype, "out")
    assert_matches(dx, tx.grad, dtype, "dx")


def test_upsample_indices_match_torch_for_every_small_size(backend):
    """Sizes 1..40 -> 1..100, where the float32 rule and exact integer floor(dst*in/out)
    disagree (e.g. 2 -> 82): our indices must be torch's, not the exact quotient's."""
    mismatches = []
    for n_in in range(1, 41):
        x = np.arange(n_in, dtype=np.float32).reshape(1, 1, 1, n_in)
        for n_out in range(1, 101):
            ours, _ = F.upsample_nearest(to_device(x, backend), (1, n_out))
            theirs = TF.interpolate(tensor(x), size=(1, n_out), mode="nearest").numpy()
            if not np.array_equal(to_numpy(ours), theirs):
                mismatches.append((n_in, n_out))
    assert mismatches == []
    exact = np.floor(np.arange(82) * 2 / 82)
    theirs = TF.interpolate(torch.arange(2.0).reshape(1, 1, 1, 2), size=(1, 82)).numpy().ravel()
    assert not np.array_equal(exact, theirs), "the float32 subtlety this test guards is real"


@pytest.mark.parametrize("shape", BATCH_NORM_SHAPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_matches_torch(shape, training, dtype, backend, rng):
    C = shape[1]
    x = (draw(rng, shape, dtype) * 3 + 2).astype(dtype)
    gamma, beta = draw(rng, (C,), dtype), draw(rng, (C,), dtype)
    running_mean = draw(rng, (C,), dtype)
    running_var = rng.uniform(0.5, 2.0, C).astype(dtype)
    t_mean, t_var = tensor(running_mean), tensor(running_var)
    our_mean = to_device(running_mean.copy(), backend)  # updated in place in training mode
    our_var = to_device(running_var.copy(), backend)

    out, cache = F.batch_norm(to_device(x, backend), to_device(gamma, backend),
                              to_device(beta, backend), our_mean, our_var, training, 0.1, 1e-5)
    dout = draw(rng, shape, dtype)
    dx, dgamma, dbeta = F.batch_norm_backward(to_device(dout, backend), cache)

    tx, tg, tb = tensor(x, True), tensor(gamma, True), tensor(beta, True)
    t_out = TF.batch_norm(tx, t_mean, t_var, tg, tb, training=training, momentum=0.1, eps=1e-5)
    t_out.backward(tensor(dout))
    assert_matches(out, t_out, dtype, "out")
    assert_matches(dx, tx.grad, dtype, "dx")
    assert_matches(dgamma, tg.grad, dtype, "dgamma")
    assert_matches(dbeta, tb.grad, dtype, "dbeta")
    assert_matches(our_mean, t_mean, dtype, "running_mean")
    assert_matches(our_var, t_var, dtype, "running_var")
    if training:
        assert not np.allclose(to_numpy(our_mean), running_mean), "training moves the running mean"
    else:
        np.testing.assert_array_equal(to_numpy(our_mean), running_mean)


def test_relu_and_add_match_torch(dtype, backend, rng):
    a, b = draw(rng, (2, 3, 5, 4), dtype), draw(rng, (2, 3, 5, 4), dtype)
    s, _ = F.add(to_device(a, backend), to_device(b, backend))
    out, cache = F.relu(s)
    dout = draw(rng, out.shape, dtype)
    ds = F.relu_backward(to_device(dout, backend), cache)
    da, db = F.add_backward(ds)
    ta, tb = tensor(a, True), tensor(b, True)
    t_out = TF.relu(ta + tb)
    t_out.backward(tensor(dout))
    assert_matches(out, t_out, dtype, "out")
    assert_matches(da, ta.grad, dtype, "da")
    assert_matches(db, tb.grad, dtype, "db")


@pytest.mark.parametrize("shape,k,s,p", POOL_CASES)
@pytest.mark.parametrize("nan_fraction", [0.05, 0.2], ids=["few-nan", "more-nan"])
def test_max_pool2d_nan_matches_torch(shape, k, s, p, nan_fraction, dtype, backend, rng):
    """NaN at random positions (windows with one NaN, with several, with none): the same
    outputs (NaN where torch has NaN) and the gradient on the same entry as torch."""
    x = draw(rng, shape, dtype)
    x[rng.random(shape) < nan_fraction] = np.nan
    out, dx, t_out, tx = pool_both(x, k, s, p, dtype, backend, rng)
    t_nan = np.isnan(t_out.detach().numpy())
    assert t_nan.any() and not t_nan.all(), "the draw should give windows with and without NaN"
    np.testing.assert_array_equal(np.isnan(to_numpy(out)), t_nan)
    assert_matches(out, t_out, dtype, "out")  # assert_allclose treats NaN == NaN
    assert_matches(dx, tx.grad, dtype, "dx")


@pytest.mark.parametrize("values,expected_grad", [
    ([1.0, np.nan, np.nan, 0.0], [0, 0, 1, 0]),  # two NaN: the last in scan order wins
    ([np.nan, 5.0, 2.0, 0.0], [1, 0, 0, 0]),  # a NaN beats a larger number
    ([3.0, 3.0, np.nan, 3.0], [0, 0, 1, 0]),  # a NaN beats tied maxima
    ([2.0, 7.0, 7.0, 1.0], [0, 1, 0, 0]),  # no NaN: the first of tied maxima wins
], ids=["two-nan", "nan-first", "nan-among-ties", "ties"])
def test_max_pool2d_which_entry_wins_as_in_torch(values, expected_grad, backend):
    x = np.array(values, dtype=np.float64).reshape(1, 1, 2, 2)
    out, cache = F.max_pool2d(to_device(x, backend), 2, 2)
    dx = F.max_pool2d_backward(to_device(np.ones((1, 1, 1, 1)), backend), cache)
    tx = tensor(x, True)
    t_out = TF.max_pool2d(tx, 2, 2)
    t_out.backward(torch.ones(1, 1, 1, 1, dtype=torch.float64))
    assert_matches(out, t_out, np.float64, "out")
    assert_matches(dx, tx.grad, np.float64, "dx")
    np.testing.assert_array_equal(to_numpy(dx).ravel(), expected_grad)


def test_max_pool2d_window_of_minus_inf_sends_its_gradient_to_the_first_real_entry(backend):
    """Padding is -inf too; a window whose real entries are all -inf still gives its gradient
    to the image (its first real entry), as torch does, not to the padding."""
    x = np.full((1, 1, 3, 3), -np.inf)
    out, cache = F.max_pool2d(to_device(x, backend), 3, 1, 1)
    dout = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    dx = F.max_pool2d_backward(to_device(dout, backend), cache)
    tx = tensor(x, True)
    TF.max_pool2d(tx, 3, 1, 1).backward(tensor(dout))
    assert_matches(dx, tx.grad, np.float64, "dx")
    assert float(to_numpy(dx).sum()) == 45.0, "every window's gradient reaches the image"
