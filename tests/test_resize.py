"""resize_bilinear: its gradient against central differences (float64), its output against the loop
reference, and both passes against ``torch.nn.functional.interpolate(mode="bilinear",
align_corners=False)`` in float32 and float64, on every backend (the strict CuPy stand-in included).

Tolerances: the gradient check's max element-wise relative error < 1e-6 (minifpn.gradcheck); torch
parity within torch_helpers.TOLERANCES (float32 rtol 1e-4 / atol 1e-5, float64 1e-10 / 1e-12); the
loop reference within 1e-12 in float64 (its coordinates are exact where ours round as torch's do).
"""
import numpy as np
import pytest

from minifpn import functional as F
from minifpn.backend import to_device, to_numpy
from minifpn.gradcheck import check

TOL = 1e-6
DTYPES = [np.float32, np.float64]

# (shape, size): odd sizes, scale factors below and above 1, one axis unchanged, 1-pixel sides
RESIZE_CASES = [
    ((2, 3, 7, 5), (3, 11)), ((1, 2, 13, 13), (26, 26)), ((1, 1, 32, 32), (16, 16)),
    ((2, 1, 5, 9), (5, 4)), ((1, 2, 1, 6), (4, 1)), ((1, 1, 6, 4), (23, 17)), ((1, 2, 9, 8), (2, 3)),
]


def torch_both(th, x, size, dout):
    """torch's interpolate forward and input gradient for a host x and upstream dout."""
    tx = th.tensor(x, True)
    t_out = th.torch.nn.functional.interpolate(tx, size=size, mode="bilinear", align_corners=False)
    t_out.backward(th.tensor(dout))
    return t_out, tx.grad


# ---- the gradient --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,size", RESIZE_CASES)
def test_resize_bilinear_gradients(shape, size, make, rng):
    state = {}

    def forward(x):
        out, state["cache"] = F.resize_bilinear(x, size)
        return out

    result = check("resize_bilinear", f"{shape} -> {size}", forward,
                   lambda d: {"x": F.resize_bilinear_backward(d, state["cache"])},
                   {"x": make(rng.standard_normal(shape))}, tol=TOL)
    assert result.max_error < TOL, result.errors


def test_backward_is_the_transpose_of_the_forward(make, rng):
    """<resize(x), dout> = <x, resize_backward(dout)> for every x and dout: the adjoint identity."""
    x, dout = rng.standard_normal((2, 3, 7, 5)), rng.standard_normal((2, 3, 3, 11))
    out, cache = F.resize_bilinear(make(x), (3, 11))
    dx = F.resize_bilinear_backward(make(dout), cache)
    np.testing.assert_allclose((to_numpy(out) * dout).sum(), (x * to_numpy(dx)).sum(), rtol=1e-12)


# ---- the loop reference ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape,size", RESIZE_CASES)
def test_resize_bilinear_equals_the_loop_reference(shape, size, dtype, backend, rng):
    x = to_device(rng.standard_normal(shape).astype(dtype), backend)
    out, _ = F.resize_bilinear(x, size)
    reference = F.resize_bilinear_simple(x, size)
    assert out.dtype == reference.dtype == dtype and out.shape == reference.shape == shape[:2] + size
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_numpy(out), to_numpy(reference), **tol)


# ---- PyTorch -------------------------------------------------------------------------------------

@pytest.mark.torch
@pytest.mark.parametrize("shape,size", RESIZE_CASES)
def test_resize_bilinear_matches_torch(shape, size, dtype, backend, rng, th):
    x = rng.standard_normal(shape).astype(dtype)
    out, cache = F.resize_bilinear(to_device(x, backend), size)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx = F.resize_bilinear_backward(to_device(dout, backend), cache)
    t_out, t_dx = torch_both(th, x, size, dout)
    th.assert_matches(out, t_out, dtype, "out")
    th.assert_matches(dx, t_dx, dtype, "dx")


@pytest.mark.torch
def test_interpolation_weights_equal_torchs_bit_for_bit(th):
    """Every pair of lengths 1..30 -> 1..70, in float32 and float64: our matrix A (out, in) is
    torch's resize of the identity, to the last bit. This pins the rounding: the source coordinate
    as one fused multiply-add, and floorf's rounding to float32 for float64 (e.g. 2 -> 6, row 4:
    src = 0.9999999999999999 reads input 1 with weight 1, not input 0)."""
    mismatches = []
    for dtype in DTYPES:
        for n_in in range(1, 31):
            eye = th.tensor(np.eye(n_in, dtype=dtype).reshape(n_in, 1, n_in, 1))
            for n_out in range(1, 71):
                theirs = th.torch.nn.functional.interpolate(eye, size=(n_out, 1), mode="bilinear",
                                                            align_corners=False)
                ours = F.interpolation_matrix(n_in, n_out, dtype, np)
                if not np.array_equal(ours, theirs[:, 0, :, 0].numpy().T):
                    mismatches.append((dtype.__name__, n_in, n_out))
    assert mismatches == []
    np.testing.assert_array_equal(F.interpolation_matrix(2, 6, np.float64, np)[4], [0.0, 1.0])


# ---- what bilinear resizing does ------------------------------------------------------------------

def test_each_row_has_two_nonzero_weights_summing_to_one():
    for n_in, n_out in [(7, 3), (13, 26), (32, 16), (1, 5), (5, 1)]:
        A = F.interpolation_matrix(n_in, n_out, np.float64, np)
        assert A.shape == (n_out, n_in)
        assert ((A != 0).sum(axis=1) <= 2).all()
        np.testing.assert_allclose(A.sum(axis=1), 1.0, rtol=1e-15)


def test_downscaling_by_two_averages_pairs_and_by_four_skips_pixels(backend, rng):
    """Without antialiasing, 2x down averages each 2x2 block; 4x down reads only the middle two
    of each four rows and columns, so the others get no gradient (torch's plain bilinear)."""
    x = rng.standard_normal((1, 2, 16, 16))
    half, _ = F.resize_bilinear(to_device(x, backend), (8, 8))
    np.testing.assert_allclose(to_numpy(half), x.reshape(1, 2, 8, 2, 8, 2).mean(axis=(3, 5)), rtol=1e-12)
    quarter, cache = F.resize_bilinear(to_device(x, backend), (4, 4))
    middle = x.reshape(1, 2, 4, 4, 4, 4)[:, :, :, 1:3, :, 1:3].mean(axis=(3, 5))
    np.testing.assert_allclose(to_numpy(quarter), middle, rtol=1e-12)
    dx = to_numpy(F.resize_bilinear_backward(to_device(np.ones((1, 2, 4, 4)), backend), cache))
    read = np.zeros(16, bool)
    read[[1, 2, 5, 6, 9, 10, 13, 14]] = True
    assert (dx[:, :, ~read, :] == 0).all() and (dx[:, :, :, ~read] == 0).all()
    np.testing.assert_allclose(dx[:, :, read][:, :, :, read], 0.25)


def test_the_same_size_is_a_copy(backend, rng):
    x = to_device(rng.standard_normal((2, 3, 5, 7)).astype(np.float32), backend)
    out, cache = F.resize_bilinear(x, (5, 7))
    assert out is not x and (to_numpy(out) == to_numpy(x)).all()
    dout = to_device(rng.standard_normal((2, 3, 5, 7)).astype(np.float32), backend)
    dx = F.resize_bilinear_backward(dout, cache)
    assert dx is not dout and (to_numpy(dx) == to_numpy(dout)).all()


def test_resize_reads_nothing_back_from_the_device(stand_in, rng):
    """The weights are host tables of the sizes: forward and backward run without a sync."""
    x = to_device(rng.standard_normal((2, 3, 7, 5)), "cupy")
    stand_in.reset_sync_count()
    out, cache = F.resize_bilinear(x, (3, 11))
    dx = F.resize_bilinear_backward(out, cache)
    assert stand_in.sync_count() == 0
    assert isinstance(out, stand_in.ndarray) and isinstance(dx, stand_in.ndarray)


# ---- input checks --------------------------------------------------------------------------------

@pytest.mark.parametrize("x,error,words", [
    (np.zeros((3, 4, 5)), ValueError, r"shape \(N, C, H, W\)"),
    (np.zeros((1, 1, 4, 5), dtype=np.int64), TypeError, "floating-point"),
    (np.zeros((1, 1, 0, 5)), ValueError, "empty side"),
    ([[[[1.0]]]], ValueError, r"shape \(N, C, H, W\)"),
])
def test_bad_inputs_are_refused_with_a_clear_error(x, error, words):
    for op in (F.resize_bilinear, F.resize_bilinear_simple):
        with pytest.raises(error, match=words):
            op(x, (2, 2))


@pytest.mark.parametrize("size", [(0, 3), (3, -1), (2.5, 3), (True, 3), (2, 3, 4), "ab", None, 0])
def test_bad_sizes_are_refused_with_a_clear_error(size):
    with pytest.raises(ValueError, match="resize_bilinear: size"):
        F.resize_bilinear(np.zeros((1, 1, 4, 4)), size)


def test_a_single_int_size_means_square_and_numpy_ints_are_fine():
    out, _ = F.resize_bilinear(np.zeros((1, 1, 4, 6)), 3)
    assert out.shape == (1, 1, 3, 3)
    out, _ = F.resize_bilinear(np.zeros((1, 1, 4, 6)), (np.int64(2), np.int32(5)))
    assert out.shape == (1, 1, 2, 5)
