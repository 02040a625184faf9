"""The fully connected layer: F.linear / F.linear_backward and nn.Linear. Gradient checks in
float64 (TOL = 1e-6, as every op), parity with torch.nn.functional.linear and torch.nn.Linear
(forward and every gradient, float32 and float64), PyTorch's default initialisation, errors,
and N = 0 rows (an image whose RoIs were all dropped)."""
import math

import numpy as np
import pytest

from minifpn import functional as F
from minifpn import nn
from minifpn.backend import to_device, to_numpy
from minifpn.gradcheck import check, check_module

TOL = 1e-6
SHAPES = [(5, 6, 4), (1, 3, 1), (7, 12, 9)]  # (N, in_features, out_features)


# ---- gradient checks ------------------------------------------------------------------------
@pytest.mark.parametrize("N,IN,OUT", SHAPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_linear_gradients(N, IN, OUT, bias, make, rng):
    state = {}

    def forward(x, weight, b=None):
        out, state["cache"] = F.linear(x, weight, b)
        return out

    def backward(dout):
        dx, dw, db = F.linear_backward(dout, state["cache"])
        assert (db is None) == (not bias)
        return {"x": dx, "weight": dw, **({"b": db} if bias else {})}

    inputs = {"x": make(rng.standard_normal((N, IN))), "weight": make(rng.standard_normal((OUT, IN)))}
    if bias:
        inputs["b"] = make(rng.standard_normal(OUT))
    result = check("linear", "", forward, backward, inputs, tol=TOL)
    assert set(result.errors) == set(inputs)
    assert result.max_error < TOL, result.errors


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_linear_module_gradients(bias, backend, rng):
    layer = nn.Linear(6, 4, bias=bias, rng=rng).to(backend, dtype=np.float64)
    result = check_module("Linear", "(5, 6)", layer, to_device(rng.standard_normal((5, 6)), backend),
                          tol=TOL)
    assert set(result.errors) == {"input", "weight"} | ({"bias"} if bias else set())
    assert result.max_error < TOL, result.errors


def test_linear_by_hand(make):
    # out[k, o] = sum_i x[k, i] w[o, i] + b[o]
    x = make(np.array([[1.0, 2.0], [3.0, -1.0]]))
    w = make(np.array([[1.0, 0.0], [2.0, 1.0], [0.0, -1.0]]))
    b = make(np.array([0.5, 0.0, -0.5]))
    out, cache = F.linear(x, w, b)
    np.testing.assert_array_equal(to_numpy(out), [[1.5, 4.0, -2.5], [3.5, 5.0, 0.5]])
    dout = make(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]))
    before = dout.copy()
    dx, dw, db = F.linear_backward(dout, cache)
    np.testing.assert_array_equal(to_numpy(dx), [[1.0, 0.0], [2.0, 0.0]])  # rows of w, summed
    np.testing.assert_array_equal(to_numpy(dw), [[1.0, 2.0], [3.0, -1.0], [3.0, -1.0]])
    np.testing.assert_array_equal(to_numpy(db), [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(to_numpy(dout), to_numpy(before))  # backward is pure


# ---- N = 0 rows ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_rows(dtype, make):
    x = make(np.zeros((0, 5), dtype))
    w = make(np.ones((3, 5), dtype))
    b = make(np.ones(3, dtype))
    out, cache = F.linear(x, w, b)
    assert out.shape == (0, 3) and out.dtype == dtype
    dx, dw, db = F.linear_backward(make(np.zeros((0, 3), dtype)), cache)
    assert dx.shape == (0, 5) and dx.dtype == dtype
    assert dw.dtype == db.dtype == dtype
    np.testing.assert_array_equal(to_numpy(dw), np.zeros((3, 5)))  # an empty sum
    np.testing.assert_array_equal(to_numpy(db), np.zeros(3))


def test_module_zero_rows_adds_nothing(backend):
    layer = nn.Linear(5, 3, rng=np.random.default_rng(0)).to(backend)
    out = layer(to_device(np.zeros((0, 5), np.float32), backend))
    assert out.shape == (0, 3)
    dx = layer.backward(to_device(np.zeros((0, 3), np.float32), backend))
    assert dx.shape == (0, 5)
    assert not to_numpy(layer.weight.grad).any() and not to_numpy(layer.bias.grad).any()


# ---- initialisation ---------------------------------------------------------------------------
def test_default_init_is_pytorchs_uniform_bound():
    IN, OUT = 400, 300
    layer = nn.Linear(IN, OUT, rng=np.random.default_rng(0))
    bound = 1 / math.sqrt(IN)
    w, b = layer.weight.data, layer.bias.data
    assert w.shape == (OUT, IN) and b.shape == (OUT,)
    assert w.dtype == b.dtype == np.float32
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    assert np.abs(b).max() <= bound and np.abs(b).max() > 0.95 * bound
    # U(-a, a) has standard deviation a / sqrt(3); 120,000 draws pin it within 1%
    assert abs(w.std() - bound / math.sqrt(3)) < 0.01 * bound / math.sqrt(3)
    again = nn.Linear(IN, OUT, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(again.weight.data, w)
    np.testing.assert_array_equal(again.bias.data, b)


def test_no_bias_and_names():
    layer = nn.Linear(3, 2, bias=False, rng=np.random.default_rng(0))
    assert layer.bias is None
    assert list(layer.state_dict()) == ["weight"]
    assert list(nn.Linear(3, 2).state_dict()) == ["weight", "bias"]
    assert repr(layer) == "Linear(in_features=3, out_features=2, bias=False)"


# ---- errors -------------------------------------------------------------------------------------
def test_errors_name_what_was_expected():
    w, b = np.zeros((3, 4)), np.zeros(3)
    with pytest.raises(ValueError, match=r"input of shape \(N, in_features\) \(2 dims\), got shape "
                                         r"\(2, 4, 1\)"):
        F.linear(np.zeros((2, 4, 1)), w, b)
    with pytest.raises(ValueError, match=r"input of shape \(N, in_features\).*got shape \(4,\)"):
        F.linear(np.zeros(4), w, b)
    with pytest.raises(ValueError, match=r"input has 5 features per row but weight .* = \(3, 4\) "
                                         r"expects in_features = 4"):
        F.linear(np.zeros((2, 5)), w, b)
    with pytest.raises(ValueError, match=r"weight of shape \(out_features, in_features\)"):
        F.linear(np.zeros((2, 4)), np.zeros((3, 4, 1)), b)
    with pytest.raises(ValueError, match=r"bias of shape \(out_features,\) = \(3,\), got \(4,\)"):
        F.linear(np.zeros((2, 4)), w, np.zeros(4))
    with pytest.raises(TypeError, match="input=float32, weight=float64"):
        F.linear(np.zeros((2, 4), np.float32), w, b)
    with pytest.raises(TypeError, match="input must be a floating-point array.*int64"):
        F.linear(np.zeros((2, 4), np.int64), w.astype(np.int64), None)
    with pytest.raises(ValueError, match="Linear: in_features must be >= 1, got 0"):
        nn.Linear(0, 3)
    with pytest.raises(ValueError, match="Linear: out_features must be an int"):
        nn.Linear(3, 2.5)
    layer = nn.Linear(4, 3)
    with pytest.raises(nn.BackwardBeforeForward, match="Linear.backward called before forward"):
        layer.backward(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="input has 5 features per row"):
        layer(np.zeros((2, 5), np.float32))
    with pytest.raises(TypeError, match="input=float64, weight=float32"):
        layer(np.zeros((2, 4)))


# ---- parity with PyTorch --------------------------------------------------------------------
@pytest.mark.parametrize("N,IN,OUT", SHAPES + [(0, 4, 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_linear_matches_torch(N, IN, OUT, dtype, backend, rng):
    pytest.importorskip("torch", reason="PyTorch is not installed: parity tests need it "
                        "(pip install -e .[parity])")
    from torch_helpers import assert_matches, tensor, torch

    x, w, b = (rng.standard_normal(s).astype(dtype) for s in ((N, IN), (OUT, IN), (OUT,)))
    out, cache = F.linear(*(to_device(a, backend) for a in (x, w, b)))
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx, dw, db = F.linear_backward(to_device(dout, backend), cache)
    tx, tw, tb = tensor(x, True), tensor(w, True), tensor(b, True)
    t_out = torch.nn.functional.linear(tx, tw, tb)
    t_out.backward(tensor(dout))
    assert_matches(out, t_out, dtype, "out")
    assert_matches(dx, tx.grad, dtype, "dx")
    assert_matches(dw, tw.grad, dtype, "dweight")
    assert_matches(db, tb.grad, dtype, "dbias")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_linear_module_loads_torch_weights_and_matches(dtype, backend, rng):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed: parity tests need it")
    theirs = torch.nn.Linear(12, 5).to(torch.float64 if dtype == np.float64 else torch.float32)
    ours = nn.Linear(12, 5, dtype=dtype)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    ours.to(backend)
    x = rng.standard_normal((7, 12)).astype(dtype)
    tx = torch.tensor(x, requires_grad=True)
    out, t_out = ours(to_device(x, backend)), theirs(tx)
    dout = rng.standard_normal((7, 5)).astype(dtype)
    dx = ours.backward(to_device(dout, backend))
    t_out.backward(torch.tensor(dout))
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_numpy(out), t_out.detach().numpy(), **tol)
    np.testing.assert_allclose(to_numpy(dx), tx.grad.numpy(), **tol)
    np.testing.assert_allclose(to_numpy(ours.weight.grad), theirs.weight.grad.numpy(), **tol)
    np.testing.assert_allclose(to_numpy(ours.bias.grad), theirs.bias.grad.numpy(), **tol)


def test_default_init_matches_torchs_distribution():
    torch = pytest.importorskip("torch", reason="PyTorch is not installed: parity tests need it")
    torch.manual_seed(0)
    theirs = torch.nn.Linear(256, 200)
    ours = nn.Linear(256, 200, rng=np.random.default_rng(0))
    for name in ("weight", "bias"):
        t = theirs.state_dict()[name].numpy()
        o = getattr(ours, name).data
        # same support [-1/16, 1/16]; same spread (std of U(-a, a) is a / sqrt(3))
        assert abs(np.abs(o).max() - np.abs(t).max()) < 0.005
        assert abs(o.std() - t.std()) < 0.15 * t.std()
