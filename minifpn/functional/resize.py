"""Bilinear resizing to a target size, as ``F.interpolate(x, size, mode="bilinear",
align_corners=False)`` (without ``antialias``): the resize of a featurized image pyramid (the
paper's Figure 1(a)), which runs one detector on the image at several scales.

PyTorch's rule along one axis (``compute_source_index_and_lambda`` in ATen's UpSample.h), for an
input length ``in`` and an output length ``out``, in the tensor's precision (float32 arithmetic
for float32 tensors, float64 for float64):

    out == in:  output index dst copies input index dst (weights 1 and 0);
    otherwise:  ratio = in / out,  src = max(ratio * (dst + 0.5) - 0.5, 0),
                low = min(floor(float32(src)), in - 1),  high = low + 1 if low < in - 1 else low,
                lambda_high = clamp(src - low, 0, 1),  lambda_low = 1 - lambda_high,

and output dst = lambda_low * x[low] + lambda_high * x[high]. ``float32(src)`` is C's ``floorf``
on a double: for float64 tensors the floor is taken of src rounded to float32, as PyTorch's CPU
kernel does. Downscaling uses the same rule: two neighbours per output, whatever the ratio (no
averaging over the pixels in between; that is ``antialias=True``, which this is not).

Each output row mixes two input rows, so the resize along one axis is a matrix
A (out, in) with two nonzeros per row, and the 2-d resize of each (n, c) map is

    out = A_h @ x @ A_w^T      (OH, H) x (H, W) x (W, OW) -> (OH, OW),

whose backward is the transpose (docs/derivations.md, section 13):

    dx = A_h^T @ dout @ A_w    (H, OH) x (OH, OW) x (OW, W) -> (H, W).

An axis whose size does not change is the identity and is skipped. The inputs must be finite: a
matrix product adds 0 * x over the whole row, so an inf anywhere in a row or column of x makes
that whole line of the output NaN (PyTorch's local formula keeps it to its neighbours).
``resize_bilinear_simple`` computes the same output with a loop over output pixels, in plain
float64 coordinates; the tests compare the two, and both with PyTorch.
"""
from __future__ import annotations

import functools
import math
import struct
from fractions import Fraction

from ..backend import get_array_module
from .checks import check_nchw, pair


def _round_to_float32(value: float) -> float:
    """``value`` rounded to the nearest float32 (C's cast of a double to a float)."""
    return struct.unpack("f", struct.pack("f", value))[0]


@functools.lru_cache(maxsize=512)
def bilinear_table(in_size: int, out_size: int, ftype) -> tuple[tuple, tuple, tuple, tuple]:
    """PyTorch's two neighbours of each output index and their weights, along one axis.

    ``ftype`` is the array's scalar type (``x.dtype.type``: NumPy's float32 or float64, in NumPy and
    CuPy alike), so the coordinates round as PyTorch's kernel does for that dtype. Returns host
    tuples of length out_size: low, high (ints in [0, in_size - 1], high = low + 1 except at the
    last input index), w_low, w_high (floats, w_low + w_high = 1). A function of the sizes only:
    computed once on the host, never read back from a device.
    """
    if out_size == in_size:  # PyTorch copies: the identity
        index = tuple(range(out_size))
        return index, index, (1.0,) * out_size, (0.0,) * out_size
    ratio = Fraction(float(ftype(in_size) / ftype(out_size)))  # the quotient, rounded to ftype
    zero, one = ftype(0.0), ftype(1.0)
    low, high, w_low, w_high = [], [], [], []
    for dst in range(out_size):
        # ratio * (dst + 0.5) - 0.5 rounded once, as the fused multiply-add PyTorch's compiled
        # kernels use: exact in Fraction, then to a double (exact for float32's 24-bit ratio: the
        # value needs <= 48 bits once it is >= 0), then to ftype
        src = max(ftype(float(ratio * (2 * dst + 1) / 2 - Fraction(1, 2))), zero)
        i = min(math.floor(_round_to_float32(float(src))), in_size - 1)
        lam = min(max(src - ftype(i), zero), one)
        low.append(i)
        high.append(i + 1 if i < in_size - 1 else i)
        w_low.append(float(one - lam))
        w_high.append(float(lam))
    return tuple(low), tuple(high), tuple(w_low), tuple(w_high)


def interpolation_matrix(in_size: int, out_size: int, dtype, xp):
    """The resize along one axis as a matrix A: (out_size, in_size) of ``dtype`` on xp's device.

    Row dst holds w_low[dst] in column low[dst] and w_high[dst] in column high[dst] (their sum
    where the two coincide, at the last input index), zeros elsewhere; so A @ v resizes a vector
    v (in_size,) and every row of A sums to 1.
    """
    low, high, w_low, w_high = bilinear_table(in_size, out_size, xp.dtype(dtype).type)
    columns = xp.arange(in_size, dtype=xp.int64)[None, :]  # (1, in_size)
    at_low = columns == xp.asarray(low, dtype=xp.int64)[:, None]  # (out_size, in_size) bool
    at_high = columns == xp.asarray(high, dtype=xp.int64)[:, None]
    return (xp.asarray(w_low, dtype=dtype)[:, None] * at_low
            + xp.asarray(w_high, dtype=dtype)[:, None] * at_high)


def _check_resize_args(x, size, op: str) -> tuple[int, int]:
    """x a floating (N, C, H, W) array with H, W >= 1; size two ints >= 1. Returns (OH, OW)."""
    check_nchw(x, op)
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{op}: input has an empty side, shape {tuple(x.shape)}; H and W must be >= 1")
    return pair(size, "size (OH, OW)", op, 1)


def _rows_then_columns(x, A_rows, A_cols):
    """out = A_rows @ x @ A_cols^T for each (n, c) map; a None matrix is the identity (skipped).

    x: (N, C, H, W); A_rows: (OH, H) or None; A_cols: (OW, W) or None -> (N, C, OH, OW).
    The columns are one GEMM over all N*C*H rows; the rows a matmul broadcast over N*C."""
    xp = get_array_module(x)
    N, C, H, W = x.shape
    out = x
    if A_cols is not None:  # (N*C*H, W) @ (W, OW): every row of every map at once
        out = xp.matmul(out.reshape(N * C * H, W), A_cols.T).reshape(N, C, H, A_cols.shape[0])
    if A_rows is not None:  # (OH, H) @ (N*C, H, OW) -> (N*C, OH, OW)
        width = out.shape[3]
        out = xp.matmul(A_rows, out.reshape(N * C, H, width)).reshape(N, C, A_rows.shape[0], width)
    return out


def resize_bilinear(x, size):
    """Resize ``x`` to ``size`` by bilinear interpolation, as PyTorch's
    ``F.interpolate(x, size=size, mode="bilinear", align_corners=False)``.

    x: (N, C, H, W) floating; size: (OH, OW), positive ints -> out: (N, C, OH, OW), x's dtype.
    out = A_h @ x @ A_w^T with A_h = ``interpolation_matrix(H, OH)``, A_w = ``interpolation_matrix(W, OW)``
    (the module docstring gives PyTorch's rule). Returns out and a cache for
    ``resize_bilinear_backward``. With size == (H, W) out is a copy of x.
    """
    OH, OW = _check_resize_args(x, size, "resize_bilinear")
    xp = get_array_module(x)
    N, C, H, W = x.shape
    A_h = None if OH == H else interpolation_matrix(H, OH, x.dtype, xp)
    A_w = None if OW == W else interpolation_matrix(W, OW, x.dtype, xp)
    out = _rows_then_columns(x, A_h, A_w)
    return (x.copy() if out is x else out), (tuple(x.shape), A_h, A_w)


def resize_bilinear_backward(dout, cache):
    """Gradient of ``resize_bilinear``: the transpose of each axis's matrix.

    dout: (N, C, OH, OW) -> dx: (N, C, H, W), dx = A_h^T @ dout @ A_w: each input pixel
    collects the upstream gradient of every output that read it, times the weight it was read with.
    """
    (N, C, H, W), A_h, A_w = cache
    dx = _rows_then_columns(dout, None if A_h is None else A_h.T, None if A_w is None else A_w.T)
    return dout.copy() if dx is dout else dx


def _source(dst: int, in_size: int, out_size: int) -> tuple[int, int, float]:
    """PyTorch's neighbours and weight of output index ``dst``, in float64: (low, high, lambda_high)."""
    if out_size == in_size:
        return dst, dst, 0.0
    src = max((dst + 0.5) * in_size / out_size - 0.5, 0.0)
    low = min(math.floor(src), in_size - 1)
    return low, min(low + 1, in_size - 1), min(max(src - low, 0.0), 1.0)


def resize_bilinear_simple(x, size):
    """The loop reference of ``resize_bilinear``: every output pixel from its four neighbours.

    x: (N, C, H, W); size: (OH, OW) -> out: (N, C, OH, OW). For output (oh, ow) with rows
    (y0, y1, ly) and columns (x0, x1, lx) from ``_source``, out = (1 - ly) * ((1 - lx) * x[y0, x0]
    + lx * x[y0, x1]) + ly * ((1 - lx) * x[y1, x0] + lx * x[y1, x1]), PyTorch's order of terms.
    Coordinates in float64 whatever x's dtype; slow (OH * OW steps): for tests and reading.
    """
    OH, OW = _check_resize_args(x, size, "resize_bilinear_simple")
    xp = get_array_module(x)
    N, C, H, W = x.shape
    out = xp.zeros((N, C, OH, OW), dtype=x.dtype)
    for oh in range(OH):
        y0, y1, ly = _source(oh, H, OH)
        for ow in range(OW):
            x0, x1, lx = _source(ow, W, OW)
            top = (1 - lx) * x[:, :, y0, x0] + lx * x[:, :, y0, x1]
            bottom = (1 - lx) * x[:, :, y1, x0] + lx * x[:, :, y1, x1]
            out[:, :, oh, ow] = (1 - ly) * top + ly * bottom
    return out
