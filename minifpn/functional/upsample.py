"""Nearest-neighbour resizing to a target size, as ``F.interpolate(x, size, mode="nearest")``.

The FPN's top-down pathway upsamples each coarser map to the size of the lateral map below it.
Output pixel ``dst`` copies input pixel ``floor(dst * in / out)`` (clipped to ``in - 1``); the
quotient ``in / out`` is formed in float32, as PyTorch does for float32 tensors, so the indices
agree exactly there (for float64 tensors PyTorch's CPU kernel differs on rare odd ratios such
as 2 -> 164; every FPN size, out = 2*in, 2*in - 1 or 2*in + 1, agrees in both; docs/derivations.md).
"""
from __future__ import annotations

from ..backend import get_array_module
from ._checks import check_nchw, pair


def nearest_source_index(in_size: int, out_size: int, xp):
    """Index of the input pixel each output pixel copies: (out_size,) int64, non-decreasing."""
    if out_size == in_size:
        return xp.arange(out_size)
    if out_size == 2 * in_size:
        return xp.arange(out_size) // 2  # the FPN's case: exact integer arithmetic
    scale = xp.float32(in_size) / xp.float32(out_size)
    src = xp.floor(xp.arange(out_size, dtype=xp.float32) * scale).astype(xp.int64)
    return xp.minimum(src, in_size - 1)


def upsample_nearest(x, size):
    """Resize ``x`` to ``size`` by copying nearest pixels.

    x: (N, C, H, W); size: (OH, OW) (an int means square) -> out: (N, C, OH, OW).
    Returns out and a cache for ``upsample_nearest_backward``.
    """
    check_nchw(x, "upsample_nearest")
    OH, OW = pair(size, "size", "upsample_nearest", None)  # Python ints (np.int64 too); sign below
    if OH <= 0 or OW <= 0:
        raise ValueError(f"upsample_nearest: target size must be positive (OH, OW), got {size!r}")
    xp = get_array_module(x)
    N, C, H, W = x.shape
    rows = nearest_source_index(H, OH, xp)
    cols = nearest_source_index(W, OW, xp)
    out = xp.take(xp.take(x, rows, axis=2), cols, axis=3)
    return out, (x.shape, rows, cols)


def _sum_runs(g, src, in_size: int, axis: int):
    """Add up, along ``axis``, the entries of ``g`` that were copied from the same input index.

    g has length out_size on ``axis``; src (out_size,) maps each entry to its input index.
    The copies of one input index form a run; the loop goes over positions within a run
    (k = 0, 1, ... like kernel offsets), so a 2x upsample sums pairs: each 2x2 block in 2-d.
    """
    xp = get_array_module(g)
    out_size = g.shape[axis]
    counts = xp.bincount(src, minlength=in_size)  # run length of each input index
    starts = xp.cumsum(counts) - counts
    shape = [1] * g.ndim
    shape[axis] = in_size
    total = None
    for k in range(int(counts.max())):  # one host sync per call, not per element
        picked = xp.take(g, xp.minimum(starts + k, out_size - 1), axis=axis)
        picked = xp.where((k < counts).reshape(shape), picked, 0)
        total = picked if total is None else total + picked
    if total is None:  # out_size == 0 cannot happen, but keep the shape right
        total = xp.zeros(g.shape[:axis] + (in_size,) + g.shape[axis + 1:], dtype=g.dtype)
    return total


def upsample_nearest_backward(dout, cache):
    """Gradient of ``upsample_nearest``: every input pixel gets the sum over its copies.

    dout: (N, C, OH, OW) -> dx: (N, C, H, W).
    """
    x_shape, rows, cols = cache
    N, C, H, W = x_shape
    return _sum_runs(_sum_runs(dout, cols, W, axis=3), rows, H, axis=2)
