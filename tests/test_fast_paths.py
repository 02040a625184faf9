"""The fast paths of the training step against the plain versions they replace.

im2col_strided (one view, one copy) against the teaching im2col (one copy per kernel offset);
the stride-1 input gradient as a convolution with the flipped kernel against weight^T @ dout
followed by col2im; SGD over one flat buffer against the per-parameter rule; and the device
operations each of them makes on the strict CuPy stand-in.
"""
import numpy as np
import pytest
import strict_cupy

from minifpn import functional as F
from minifpn.backend import to_device, to_numpy
from minifpn.functional.conv import conv2d_input_grad
from minifpn.models.detector import Detector, DetectorConfig
from minifpn.nn.module import Parameter
from minifpn.optim import SGD

IM2COL_CASES = [  # (N, C, H, W, kernel, stride, padding)
    (2, 3, 7, 6, 3, 1, 1), (1, 2, 8, 8, 3, 2, 1), (2, 1, 9, 7, (3, 2), (2, 1), (1, 0)),
    (1, 4, 5, 5, 1, 2, 0), (3, 2, 6, 6, 5, 1, 2), (1, 1, 4, 4, 4, 1, 0), (2, 3, 10, 9, 7, 3, 3),
]


@pytest.mark.parametrize("N,C,H,W,k,s,p", IM2COL_CASES)
def test_im2col_strided_equals_the_loop(N, C, H, W, k, s, p, make, rng):
    x = make(rng.standard_normal((N, C, H, W)))
    np.testing.assert_array_equal(to_numpy(F.im2col_strided(x, k, s, p)), to_numpy(F.im2col(x, k, s, p)))


def test_im2col_strided_reads_a_non_contiguous_input(rng):
    """The strides are taken from a C-ordered copy, so a transposed input gives the same columns."""
    x = rng.standard_normal((3, 2, 6, 5)).transpose(1, 0, 2, 3)  # (2, 3, 6, 5), not C-ordered
    np.testing.assert_array_equal(F.im2col_strided(x, 3, 1, 1), F.im2col(np.ascontiguousarray(x), 3, 1, 1))


@pytest.mark.parametrize("k,p", [(3, 1), (3, 0), (3, 2), (5, 2), (1, 0), ((3, 1), (1, 0)), (2, 1)])
def test_input_grad_as_flipped_convolution_equals_col2im(k, p, make, rng):
    """dx = conv(dout padded by K-1-P, flipped kernel) is exactly weight^T @ dout then col2im."""
    kh, kw = (k, k) if isinstance(k, int) else k
    ph, pw = (p, p) if isinstance(p, int) else p
    x = rng.standard_normal((2, 3, 6, 7))
    weight = make(rng.standard_normal((4, 3, kh, kw)))
    out, _ = F.conv2d(make(x), weight, None, 1, (ph, pw))
    dout = make(rng.standard_normal(out.shape))
    N, OC, OH, OW = out.shape
    dout_mat = dout.reshape(N, OC, OH * OW).transpose(1, 0, 2).reshape(OC, N * OH * OW)
    dcols = weight.reshape(OC, -1).T @ dout_mat
    expected = F.col2im(dcols.reshape(3, kh, kw, N, OH, OW), x.shape, 1, (ph, pw))
    got = conv2d_input_grad(dout, weight, (ph, pw))
    assert got.shape == x.shape
    np.testing.assert_allclose(to_numpy(got), to_numpy(expected), rtol=1e-12, atol=1e-12)


# ---- SGD over one flat buffer ------------------------------------------------------------------

def test_sgd_packs_parameters_into_views_of_one_buffer():
    a, b = Parameter(np.ones((2, 3))), Parameter(np.arange(4.0))
    opt = SGD([("a", a), ("b", b)], lr=0.1)
    assert opt.data.shape == (10,)
    assert np.shares_memory(a.data, opt.data) and np.shares_memory(b.grad, opt.grad)
    np.testing.assert_array_equal(b.data, [0, 1, 2, 3])  # values kept by the packing
    b.grad[...] = 1.0
    opt.zero_grad()
    assert float(np.abs(opt.grad).sum()) == 0.0


def test_flat_sgd_equals_the_per_parameter_rule(rng):
    """Three steps of the flat update against the rule written per parameter (optim's docstring)."""
    values = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    params = {k: Parameter(v.copy()) for k, v in values.items()}
    opt = SGD(list(params.items()), lr=0.05, momentum=0.9, weight_decay=1e-3)
    velocity = {}
    for _ in range(3):
        grads = {k: rng.standard_normal(v.shape) for k, v in values.items()}
        for k in values:
            params[k].grad[...] = grads[k]
            g = grads[k] + 1e-3 * values[k]
            velocity[k] = g if k not in velocity else 0.9 * velocity[k] + g
            values[k] = values[k] - 0.05 * velocity[k]
        opt.step()
    for k in values:
        np.testing.assert_array_equal(params[k].data, values[k])
    state = opt.state_dict()
    np.testing.assert_array_equal(state["w"], velocity["w"])


def test_sgd_repacks_after_a_parameter_array_is_replaced():
    """load_state_dict gives a parameter a new array; the next step still updates it, and its
    momentum is the one it had."""
    det = Detector(DetectorConfig(widths=(4, 4, 4, 4), channels=4))
    opt = SGD(det.named_parameters(), lr=0.1)
    name = "head.cls_logits.bias"
    param = dict(det.named_parameters())[name]
    param.grad[...] = 1.0
    opt.step()
    det.load_state_dict({name: np.full(param.shape, 5.0, np.float32)}, strict=False)
    assert not np.shares_memory(dict(det.named_parameters())[name].data, opt.data)
    opt.zero_grad()  # re-packs: the new array is now a view of the buffer
    param.grad[...] = 1.0
    opt.step()
    # v = 0.9 * (1 + 1e-4 * b0) + (1 + 1e-4 * 5), where b0 = 0 was the bias before the first step
    v = 0.9 * 1.0 + (1.0 + 1e-4 * 5.0)
    np.testing.assert_allclose(param.data, 5.0 - 0.1 * v, rtol=1e-6)
    assert np.shares_memory(param.data, opt.data)


def test_sgd_refuses_a_parameter_listed_twice_and_mixed_dtypes():
    p = Parameter(np.zeros(3))
    with pytest.raises(ValueError, match="appears under two names"):
        SGD([("a", p), ("b", p)], lr=0.1)
    with pytest.raises(ValueError, match="one dtype and backend"):
        SGD([("a", p), ("b", Parameter(np.zeros(3, np.float32)))], lr=0.1)


def test_sgd_load_state_dict_checks_names_and_shapes():
    opt = SGD([("a", Parameter(np.zeros(3)))], lr=0.1)
    with pytest.raises(KeyError, match="no parameter named 'b'"):
        opt.load_state_dict({"b": np.zeros(3)})
    with pytest.raises(ValueError, match=r"a has momentum of shape \(2,\)"):
        opt.load_state_dict({"a": np.zeros(2)})
    opt.load_state_dict({"a": np.array([1.0, 2.0, 3.0])})
    np.testing.assert_array_equal(opt.state_dict()["a"], [1.0, 2.0, 3.0])


# ---- device operations on the strict CuPy stand-in ---------------------------------------------

def test_im2col_strided_is_one_copy_and_sgd_a_handful_of_operations(stand_in):
    x = to_device(np.ones((2, 3, 8, 8)), "cupy")
    strict_cupy.reset_launch_count()
    F.im2col_strided(x, 3, 1, 0)  # no padding, already C-ordered: the one copy of the windows
    assert strict_cupy.launch_count() == 1
    strict_cupy.reset_launch_count()
    F.im2col_strided(x, 3, 1, 1)  # the padded map (a fill and a write) and the copy: 3, not 9
    assert strict_cupy.launch_count() == 3
    det = Detector(DetectorConfig(widths=(4, 4, 4, 4), channels=4)).to("cupy")
    opt = SGD(det.named_parameters(), lr=0.1)
    opt.zero_grad()
    opt.step()  # first step: the velocity is the decayed gradient itself
    strict_cupy.reset_launch_count()
    opt.zero_grad()
    opt.step()
    # zero_grad 1; decay 2 (times, plus); momentum 2 (times, plus, in place); update 2
    assert strict_cupy.launch_count() == 7, "SGD's operations must not grow with the parameter count"
    assert len(list(det.parameters())) > 7
