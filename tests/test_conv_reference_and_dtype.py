"""The fast im2col conv against the loop reference, and dtype discipline: float32 stays float32."""
import importlib

import numpy as np
import pytest
from sweeps import CONV_CASES

import minifpn.functional as F
from minifpn import backend as B
from minifpn.backend import to_device, to_numpy


@pytest.mark.parametrize("N,C,H,W,OC,k,s,p,bias", CONV_CASES)
def test_fast_conv_equals_naive_loops(N, C, H, W, OC, k, s, p, bias, make, rng):
    x = make(rng.standard_normal((N, C, H, W)))
    w = make(rng.standard_normal((OC, C, k, k)))
    b = make(rng.standard_normal(OC)) if bias else None
    fast, _ = F.conv2d(x, w, b, s, p)
    slow = F.conv2d_simple(x, w, b, s, p)
    assert fast.shape == slow.shape == (N, OC, F.conv_output_size(H, k, s, p),
                                        F.conv_output_size(W, k, s, p))
    np.testing.assert_allclose(to_numpy(fast), to_numpy(slow), rtol=1e-12, atol=1e-12)


def test_im2col_lays_out_receptive_fields(make):
    x = make(np.arange(16.0).reshape(1, 1, 4, 4))
    col = F.im2col(x, 3, stride=1, padding=0)  # (C, KH, KW, N, OH, OW)
    assert col.shape == (1, 3, 3, 1, 2, 2)
    # the receptive field of output (0, 1) is rows 0..2, columns 1..3
    np.testing.assert_array_equal(to_numpy(col[0, :, :, 0, 0, 1]),
                                  [[1, 2, 3], [5, 6, 7], [9, 10, 11]])


def test_col2im_is_the_adjoint_of_im2col(make, rng):
    """<im2col(x), c> == <x, col2im(c)> for any x and c: the defining property of the backward."""
    x = make(rng.standard_normal((2, 3, 7, 6)))
    col = F.im2col(x, (3, 2), stride=(2, 1), padding=(1, 1))
    c = make(rng.standard_normal(col.shape))
    lhs = float((col * c).sum())
    rhs = float((x * F.col2im(c, x.shape, stride=(2, 1), padding=(1, 1))).sum())
    assert abs(lhs - rhs) < 1e-10 * max(1.0, abs(lhs))


class Float64Guard:
    """An array module that refuses to create float64 arrays: wraps every function of xp."""

    def __init__(self, xp):
        self._xp = xp
        self.calls = 0

    def __getattr__(self, name):
        attr = getattr(self._xp, name)
        if not callable(attr) or isinstance(attr, type):
            return attr

        def guarded(*args, **kwargs):
            self.calls += 1
            out = attr(*args, **kwargs)
            for o in out if isinstance(out, tuple) else (out,):
                if getattr(o, "dtype", None) == self._xp.float64:
                    raise AssertionError(f"xp.{name} created a float64 array")
            return out
        return guarded


def arrays_in(obj):
    """Every array inside a (nested) cache tuple."""
    if hasattr(obj, "dtype") and hasattr(obj, "shape"):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from arrays_in(o)


def test_float32_in_float32_out_with_no_float64_buffer(monkeypatch, backend, rng):
    guard = Float64Guard(B.get_backend(backend))
    for name in ("conv", "pool", "upsample", "batch_norm", "elementwise"):
        module = importlib.import_module(f"minifpn.functional.{name}")
        monkeypatch.setattr(module, "get_array_module", lambda *a: guard)

    def f32(*shape):
        return to_device(rng.standard_normal(shape).astype(np.float32), backend)

    x = f32(2, 4, 9, 7)
    results = []
    out, cache = F.conv2d(x, f32(5, 4, 3, 3), f32(5), 2, 1)
    results += [out, *F.conv2d_backward(f32(*out.shape), cache), *arrays_in(cache)]
    out, cache = F.conv2d(x, f32(5, 4, 1, 1), None)
    results += [out, *F.conv2d_backward(f32(*out.shape), cache)[:2], *arrays_in(cache)]
    out, cache = F.max_pool2d(x, 3, 2, 1)
    results += [out, F.max_pool2d_backward(f32(*out.shape), cache)]
    out, cache = F.upsample_nearest(x, (13, 11))
    results += [out, F.upsample_nearest_backward(f32(*out.shape), cache)]
    mean, var = f32(4), f32(4) ** 2
    for training in (True, False):
        out, cache = F.batch_norm(x, f32(4), f32(4), mean, var, training)
        results += [out, *F.batch_norm_backward(f32(*out.shape), cache), *arrays_in(cache)]
    results += [mean, var]
    out, cache = F.relu(x)
    results += [out, F.relu_backward(f32(*out.shape), cache)]
    results += [F.add(x, x)[0]]
    assert guard.calls > 20, "the guard must actually see the ops' array calls"
    floats = [r for r in results if r.dtype.kind == "f"]
    assert len(floats) > 20
    assert all(r.dtype == np.float32 for r in floats), [r.dtype for r in floats]


def test_float64_guard_catches_a_float64_allocation():
    guard = Float64Guard(np)
    with pytest.raises(AssertionError, match="float64"):
        guard.zeros((2, 2))  # no dtype given: NumPy's silent float64
    assert guard.zeros((2, 2), dtype=np.float32).dtype == np.float32
