"""Nearest-neighbour resizing to a target size, as ``F.interpolate(x, size, mode="nearest")``.

The FPN's top-down pathway upsamples each coarser map to the size of the lateral map below it.
Output pixel ``dst`` copies input pixel ``floor(dst * in / out)`` (clipped to ``in - 1``); the
quotient ``in / out`` is formed in float32, as PyTorch does for float32 tensors, so the indices
agree exactly there (for float64 tensors PyTorch's CPU kernel differs on rare odd ratios such
as 2 -> 164; every FPN size, out = 2*in, 2*in - 1 or 2*in + 1, agrees in both; docs/derivations.md).
"""
from __future__ import annotations

import functools
import itertools
import math

from ..backend import get_array_module
from .checks import check_nchw, pair


@functools.lru_cache(maxsize=512)
def source_table(in_size: int, out_size: int, float32) -> tuple[int, ...]:
    """The input pixel each output pixel copies, as host Python ints (out_size,), non-decreasing.

    A function of the two sizes only, so it is computed once on the host and never read back
    from a device: the backward's run lengths come from it without a synchronisation. ``float32``
    is ``xp.float32`` (NumPy's scalar type in both NumPy and CuPy): host float32 arithmetic,
    so ``floor(dst * (in / out))`` rounds as PyTorch's float32 kernel does."""
    if out_size == in_size:
        return tuple(range(out_size))
    if out_size == 2 * in_size:
        return tuple(dst // 2 for dst in range(out_size))  # the FPN's case: exact integers
    scale = float32(in_size) / float32(out_size)
    return tuple(min(math.floor(float32(dst) * scale), in_size - 1) for dst in range(out_size))


def nearest_source_index(in_size: int, out_size: int, xp):
    """Index of the input pixel each output pixel copies: (out_size,) int64 on xp's device."""
    return xp.asarray(source_table(in_size, out_size, xp.float32), dtype=xp.int64)


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


def _sum_runs(g, table, in_size: int, axis: int):
    """Add up, along ``axis``, the entries of ``g`` that were copied from the same input index.

    g has length out_size on ``axis``; table (out_size,) host ints maps each entry to its input
    index. The copies of one input index form a run; the loop goes over positions within a run
    (k = 0, 1, ... like kernel offsets), so a 2x upsample sums pairs: each 2x2 block in 2-d.
    Run lengths and starts are host integers from the table: no device -> host synchronisation.
    """
    xp = get_array_module(g)
    out_size = g.shape[axis]
    counts = [0] * in_size  # run length of each input index
    for src in table:
        counts[src] += 1
    starts = list(itertools.accumulate(counts, initial=0))[:-1]  # where each run begins
    shape = [1] * g.ndim
    shape[axis] = in_size
    total = None
    for k in range(max(counts)):
        index = xp.asarray([min(start + k, out_size - 1) for start in starts], dtype=xp.int64)
        picked = xp.take(g, index, axis=axis)
        if min(counts) <= k:  # some runs are shorter than k + 1: their k-th entry adds nothing
            in_run = xp.asarray([k < c for c in counts]).reshape(shape)
            picked = xp.where(in_run, picked, 0)
        total = picked if total is None else total + picked
    return total


def upsample_nearest_backward(dout, cache):
    """Gradient of ``upsample_nearest``: every input pixel gets the sum over its copies.

    dout: (N, C, OH, OW) -> dx: (N, C, H, W).
    """
    x_shape, rows, cols = cache
    N, C, H, W = x_shape
    OH, OW = dout.shape[2:]
    xp = get_array_module(dout)
    rows, cols = source_table(H, OH, xp.float32), source_table(W, OW, xp.float32)  # host ints
    return _sum_runs(_sum_runs(dout, cols, W, axis=3), rows, H, axis=2)
