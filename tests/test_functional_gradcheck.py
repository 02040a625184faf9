"""Every functional op's hand-written backward against central differences, in float64.

Tolerance: max element-wise relative error < 1e-6 (minifpn.gradcheck explains the noise floor).
"""
import numpy as np
import pytest
from sweeps import BATCH_NORM_SHAPES, CONV_CASES, POOL_CASES, UPSAMPLE_CASES

from minifpn import functional as F
from minifpn.backend import to_numpy
from minifpn.gradcheck import check, distinct_values

TOL = 1e-6




@pytest.mark.parametrize("N,C,H,W,OC,k,s,p,bias", CONV_CASES)
def test_conv2d_gradients(N, C, H, W, OC, k, s, p, bias, make, rng):
    state = {}

    def forward(x, weight, b=None):
        out, state["cache"] = F.conv2d(x, weight, b, s, p)
        return out

    def backward(dout):
        dx, dw, db = F.conv2d_backward(dout, state["cache"])
        return {"x": dx, "weight": dw, **({"b": db} if bias else {})}

    inputs = {"x": make(rng.standard_normal((N, C, H, W))),
              "weight": make(rng.standard_normal((OC, C, k, k)))}
    if bias:
        inputs["b"] = make(rng.standard_normal(OC))
    result = check("conv2d", "", forward, backward, inputs, tol=TOL)
    assert set(result.errors) == set(inputs)
    assert result.max_error < TOL, result.errors


@pytest.mark.parametrize("shape,k,s,p", POOL_CASES)
def test_max_pool2d_gradients(shape, k, s, p, make, rng):
    state = {}

    def forward(x):
        out, state["cache"] = F.max_pool2d(x, k, s, p)
        return out

    result = check("max_pool2d", "", forward,
                   lambda d: {"x": F.max_pool2d_backward(d, state["cache"])},
                   {"x": make(distinct_values(rng, shape))}, tol=TOL)
    assert result.max_error < TOL, result.errors


@pytest.mark.parametrize("shape,size", UPSAMPLE_CASES)
def test_upsample_nearest_gradients(shape, size, make, rng):
    state = {}

    def forward(x):
        out, state["cache"] = F.upsample_nearest(x, size)
        return out

    result = check("upsample_nearest", "", forward,
                   lambda d: {"x": F.upsample_nearest_backward(d, state["cache"])},
                   {"x": make(rng.standard_normal(shape))}, tol=TOL)
    assert result.max_error < TOL, result.errors


@pytest.mark.parametrize("shape", BATCH_NORM_SHAPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_gradients(shape, training, make, rng):
    C = shape[1]
    running_mean = make(rng.standard_normal(C))
    running_var = make(rng.uniform(0.5, 2.0, C))
    state = {}

    def forward(x, gamma, beta):
        out, state["cache"] = F.batch_norm(x, gamma, beta, running_mean.copy(),
                                           running_var.copy(), training)
        return out

    def backward(dout):
        dx, dgamma, dbeta = F.batch_norm_backward(dout, state["cache"])
        return {"x": dx, "gamma": dgamma, "beta": dbeta}

    inputs = {"x": make(rng.standard_normal(shape) * 2 + 1),
              "gamma": make(rng.standard_normal(C)), "beta": make(rng.standard_normal(C))}
    result = check("batch_norm", "", forward, backward, inputs, tol=TOL)
    assert result.max_error < TOL, result.errors


def test_relu_gradient(make, rng):
    state = {}

    def forward(x):
        out, state["cache"] = F.relu(x)
        return out

    result = check("relu", "", forward, lambda d: {"x": F.relu_backward(d, state["cache"])},
                   {"x": make(distinct_values(rng, (2, 3, 5, 4)))}, tol=TOL)
    assert result.max_error < TOL, result.errors


def test_add_gradient(make, rng):
    def backward(dout):
        da, db = F.add_backward(dout)
        return {"a": da, "b": db}

    result = check("add", "", lambda a, b: F.add(a, b)[0], backward,
                   {"a": make(rng.standard_normal((2, 3, 4, 5))),
                    "b": make(rng.standard_normal((2, 3, 4, 5)))}, tol=TOL)
    assert result.max_error < TOL, result.errors


def test_backwards_never_change_dout(make, rng):
    x = make(rng.standard_normal((2, 3, 6, 6)))
    dout = make(rng.standard_normal((2, 3, 6, 6)))
    before = dout.copy()
    _, cache = F.relu(x)
    F.relu_backward(dout, cache)
    _, cache = F.batch_norm(x, make(np.ones(3)), make(np.zeros(3)), None, None, True)
    F.batch_norm_backward(dout, cache)
    F.add_backward(dout)
    np.testing.assert_array_equal(to_numpy(dout), to_numpy(before))


def test_upsample_2x_backward_sums_each_2x2_block(make):
    dout = make(np.arange(16.0).reshape(1, 1, 4, 4))
    _, cache = F.upsample_nearest(make(np.zeros((1, 1, 2, 2))), (4, 4))
    dx = F.upsample_nearest_backward(dout, cache)
    # block sums: [0+1+4+5, 2+3+6+7], [8+9+12+13, 10+11+14+15]
    np.testing.assert_array_equal(to_numpy(dx).reshape(2, 2), [[10, 18], [42, 50]])
