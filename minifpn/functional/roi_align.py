"""RoIAlign (He et al., Mask R-CNN, 2017), as ``torchvision.ops.roi_align``: each region of
interest (RoI) is cut into OH x OW bins, and each bin is the average of bilinearly interpolated
samples. The paper's two-stage detector (Sec. 4.2) pools every RoI this way, from the pyramid
level that Eq. (1) assigns it, into the 7x7 map its Fast R-CNN head reads.

Glossary (N, C, H, W as in conv.py):
    R RoIs, each a row (batch_index, x1, y1, x2, y2) in image coordinates;
    OH, OW the output size, in bins;
    GH, GW the sample grid inside one bin: ``sampling_ratio`` when it is > 0, else
        GH = ceil(roi_height / OH) and GW = ceil(roi_width / OW), per RoI, in feature-map cells;
    count = max(GH * GW, 1), the number of samples one bin averages;
    SH, SW the window: the block of cells that an RoI's samples read (its span), padded to the
        largest span among the (up to CHUNK) RoIs it is computed with.
A sample at (y, x) in feature-map cells reads 0 when y < -1, y > H, x < -1 or x > W; otherwise
y and x are clamped to [0, H - 1] and [0, W - 1] and it reads the bilinear mix of its four
neighbouring cells. The weights separate into a row part and a column part, so each RoI's
output is A F B^T of its window F; this, and the backward (the transpose, then a scatter-add
of the windows), is derived in docs/derivations.md.
"""
from __future__ import annotations

import math
import numbers

from ..backend import get_array_module, to_numpy
from .checks import check_float, check_nchw, is_int, pair

CHUNK = 64  # RoIs per batched matmul; sorted by window size, so each pads to windows like its own


def _check_roi_align_args(features, boxes, output_size, spatial_scale, sampling_ratio, aligned, op):
    """Check every argument of roi_align; return (OH, OW) as Python ints."""
    check_nchw(features, op, "features")
    if not hasattr(boxes, "ndim") or boxes.ndim != 2 or boxes.shape[1] != 5:
        raise ValueError(f"{op}: expected boxes of shape (R, 5), rows (batch_index, x1, y1, x2, y2), "
                         f"got shape {getattr(boxes, 'shape', type(boxes).__name__)}")
    check_float(features, boxes, op=op, names=("features", "boxes"))
    OH, OW = pair(output_size, "output_size", op, 1)
    if (not isinstance(spatial_scale, numbers.Real) or isinstance(spatial_scale, bool)
            or not 0 < spatial_scale < float("inf")):
        raise ValueError(f"{op}: spatial_scale must be a positive number (feature-map cells per image "
                         f"pixel, e.g. 0.25 for a stride-4 map), got {spatial_scale!r}")
    if not is_int(sampling_ratio):
        raise ValueError(f"{op}: sampling_ratio must be an int (<= 0: adaptive), got {sampling_ratio!r}")
    if not isinstance(aligned, bool):
        raise ValueError(f"{op}: aligned must be True or False, got {aligned!r}")
    return OH, OW


def _invalid_rois(boxes, N: int):
    """(R,) bool, on the device: True for a row whose batch index is not an integer in
    [0, N - 1] or whose coordinates are not all finite. No sync: the caller reads it."""
    xp = get_array_module(boxes)
    index = boxes[:, 0]
    return (~xp.isfinite(boxes).all(axis=1) | (index < 0) | (index > N - 1)
            | (index != xp.floor(index)))


def _refuse(boxes, bad, N: int, op: str):
    """Raise for the first invalid RoI (bad: (R,) bool with at least one True)."""
    row = int(get_array_module(bad).argmax(bad))
    raise ValueError(f"{op}: boxes[{row}] = {to_numpy(boxes[row]).tolist()} is not a valid RoI: "
                     f"its batch index must be an integer in [0, {N - 1}] (features hold {N} "
                     f"images) and its coordinates finite")


def _bins(start, end, pooled: int, sampling_ratio: int, aligned: bool):
    """Bin size (R,) along one axis, and the samples per bin: a host int, or (R,) when adaptive.

    start, end: (R,) the RoI's edges in feature-map cells; pooled: OH (or OW)."""
    xp = get_array_module(start)
    length = end - start
    if not aligned:
        length = xp.maximum(length, 1.0)  # the legacy RoIAlign forces a malformed RoI to 1 cell
    bin_size = length / pooled
    grid = sampling_ratio if sampling_ratio > 0 else xp.ceil(bin_size)  # adaptive: >= 1 per cell
    return bin_size, grid


def _largest_grid(grid_h, grid_w) -> tuple[int, int]:
    """(GH, GW): the grid every RoI's samples are padded to (at least 1), as host ints."""
    if is_int(grid_h):
        return grid_h, grid_w
    if grid_h.size == 0:
        return 1, 1
    xp = get_array_module(grid_h)
    GH, GW = to_numpy(xp.stack([grid_h.max(), grid_w.max()])).tolist()  # one sync: sets shapes
    return max(int(GH), 1), max(int(GW), 1)


def _axis_samples(start, bin_size, grid, G: int, pooled: int, size: int):
    """Where the samples of every bin lie along one axis (y or x), and their two neighbours.

    start, bin_size: (R,) in feature-map cells; grid: samples per bin, a host int or (R,);
    G: the padded grid; pooled: OH (or OW); size: H (or W).
    Returns low, high: (R, pooled, G) int64 neighbouring rows (columns), in [0, size - 1];
    w_low, w_high: (R, pooled, G) their bilinear weights, 0 for a sample outside the map or past
    its RoI's own grid (the padding up to G); grid, for the count; and first, span: (R,) int64,
    the first row (column) any used sample reads and how many rows from there they read (>= 1).
    """
    xp = get_array_module(start)
    adaptive = not is_int(grid)
    bins = xp.arange(pooled, dtype=start.dtype)[None, :, None]
    steps = xp.arange(G, dtype=start.dtype)[None, None, :]
    per_bin = xp.maximum(grid, 1)[:, None, None] if adaptive else grid  # no 0/0 for an empty grid
    start, bin_size = start[:, None, None], bin_size[:, None, None]
    # torchvision's order of operations, so that float32 rounds the same way
    coord = start + bins * bin_size + (steps + 0.5) * bin_size / per_bin  # (R, pooled, G)
    used = (coord >= -1.0) & (coord <= size)  # farther out, a sample reads 0
    if adaptive:
        used &= steps < grid[:, None, None]  # the padding past this RoI's own grid
    coord = xp.clip(coord, 0, size - 1)
    low = coord.astype(xp.int64)  # floor, since coord >= 0
    high = xp.minimum(low + 1, size - 1)
    frac = coord - low.astype(coord.dtype)
    w_low = xp.where(used, 1.0 - frac, 0.0).astype(coord.dtype, copy=False)
    w_high = xp.where(used, frac, 0.0).astype(coord.dtype, copy=False)
    first = xp.where(used, low, size - 1).min(axis=(1, 2))  # unused samples (padding) do not count
    span = xp.maximum(xp.where(used, high, 0).max(axis=(1, 2)) - first + 1, 1)
    return low, high, w_low, w_high, grid, first, span


def _chunks(boxes, bad, y_axis, x_axis, N: int, op: str):
    """Split the RoIs into chunks of up to CHUNK with windows of similar size, and read each
    chunk's window size (its largest span on each axis) with the validity flags, in one
    device -> host transfer (an invalid RoI is refused there).

    Returns a list of (index, SH, SW): index (R_c,) int64, the chunk's RoIs; SH, SW host ints.
    """
    R = bad.shape[0]
    if R == 0:
        return []
    xp = get_array_module(bad)
    span_h, span_w = y_axis[6], x_axis[6]
    order = xp.argsort(span_h * span_w, kind="stable")  # small windows first
    count = -(-R // CHUNK)
    spans = xp.ones((2, count * CHUNK), dtype=span_h.dtype)  # past the last RoI: span 1
    spans[:, :R] = xp.stack([span_h[order], span_w[order]])
    largest = spans.reshape(2, count, CHUNK).max(axis=2).reshape(-1)  # SH of each chunk, then SW
    host = to_numpy(xp.concatenate([bad.any().reshape(1).astype(largest.dtype), largest])).tolist()
    if host[0]:  # the one sync of a fixed grid
        _refuse(boxes, bad, N, op)
    return [(order[c * CHUNK:(c + 1) * CHUNK], int(host[1 + c]), int(host[1 + count + c]))
            for c in range(count)]


def _window_weights(axis, index, S: int, size: int):
    """One axis of the bilinear weights of the RoIs ``index`` (R_c,), cut to windows of S cells.

    axis: ``_axis_samples``' result; size: H (or W). Returns weights: (R_c, pooled, S), entry
    [r, i, a] the summed weights that bin i's samples put on cell first_r + a (A, or B, of
    docs/derivations.md, without the cells outside the window, where they are all 0); and
    first: (R_c,) int64, the window's first cell, moved back where needed to keep it in the map.
    """
    low, high, w_low, w_high = (a[index] for a in axis[:4])  # (R_c, pooled, G)
    xp = get_array_module(low)
    first = xp.minimum(axis[5][index], size - S)  # S >= the RoI's span: still holds every sample
    cells = xp.arange(S)
    at_low = (low - first[:, None, None])[..., None] == cells  # (R_c, pooled, G, S): one-hot
    at_high = (high - first[:, None, None])[..., None] == cells
    weights = (at_low * w_low[..., None] + at_high * w_high[..., None]).sum(axis=2)
    return weights, first


def _chunk_windows(batch, y_axis, x_axis, index, SH: int, SW: int, H: int, W: int):
    """A: (R_c, OH, SH), B: (R_c, OW, SW), and cells: (R_c, SH, SW) int64, the rows of the
    (N*H*W, C) cell matrix that each RoI's window covers."""
    xp = get_array_module(batch)
    A, first_h = _window_weights(y_axis, index, SH, H)
    B, first_w = _window_weights(x_axis, index, SW, W)
    top = batch[index] * H + first_h  # (R_c,) the window's first row, counted over the batch
    cells = ((top[:, None, None] + xp.arange(SH)[:, None]) * W
             + first_w[:, None, None] + xp.arange(SW))
    return A, B, cells


def _count(y_axis, x_axis):
    """Samples each bin averages, max(GH * GW, 1): a host int, or (R, 1, 1, 1) for an adaptive grid."""
    grid_h, grid_w = y_axis[4], x_axis[4]
    count = grid_h * grid_w
    if is_int(count):
        return max(count, 1)
    xp = get_array_module(count)
    return xp.maximum(count, 1).reshape(-1, 1, 1, 1)


def roi_align(features, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True):
    """Pool each RoI into OH x OW bins, each the mean of GH x GW bilinear samples.

    features: (N, C, H, W); boxes: (R, 5), rows (batch_index, x1, y1, x2, y2) in image pixels,
    same dtype as features; output_size: (OH, OW) (an int means square); spatial_scale: feature
    cells per image pixel (1 / stride); sampling_ratio: GH = GW when > 0, adaptive when <= 0;
    aligned: shift the box by -0.5 cell so that a cell's centre is at its index + 0.5 (Detectron2),
    else torchvision's legacy RoIAlign (no shift, and every RoI at least 1 x 1 cell).
    Returns out: (R, C, OH, OW) and a cache for ``roi_align_backward``.

    Separable: out_k = A_k F_k B_k^T per channel, with F_k the SH x SW window of cells that RoI
    k's samples read, and A_k (OH, SH), B_k (OW, SW) the bilinear weights summed per bin (zero
    padding included). The RoIs are sorted by window size and taken CHUNK at a time: per chunk
    one gather of the windows and two batched matmuls, so a small RoI pays only for the windows
    of RoIs like it. An adaptive grid is padded to the largest GH x GW of the batch (weight-0
    samples). Device -> host syncs: one (the validity flags with every chunk's window size), two
    with an adaptive grid (its size first).
    """
    OH, OW = _check_roi_align_args(features, boxes, output_size, spatial_scale, sampling_ratio,
                                   aligned, "roi_align")
    xp = get_array_module(features)
    N, C, H, W = features.shape
    bad = _invalid_rois(boxes, N)  # read, and refused, with the window sizes in _chunks
    safe = xp.where(bad[:, None], 0.0, boxes).astype(boxes.dtype, copy=False)  # harmless till then
    scale = features.dtype.type(spatial_scale)  # in the features' dtype, as torchvision's kernel
    offset = 0.5 if aligned else 0.0
    roi = safe[:, 1:] * scale - offset  # (R, 4): x1, y1, x2, y2 in feature-map cells
    batch = safe[:, 0].astype(xp.int64)
    bin_h, grid_h = _bins(roi[:, 1], roi[:, 3], OH, sampling_ratio, aligned)
    bin_w, grid_w = _bins(roi[:, 0], roi[:, 2], OW, sampling_ratio, aligned)
    GH, GW = _largest_grid(grid_h, grid_w)
    y_axis = _axis_samples(roi[:, 1], bin_h, grid_h, GH, OH, H)
    x_axis = _axis_samples(roi[:, 0], bin_w, grid_w, GW, OW, W)
    rows = features.transpose(0, 2, 3, 1).reshape(N * H * W, C)  # one row of C channels per cell
    total = xp.empty((boxes.shape[0], OH, OW, C), dtype=features.dtype)
    chunks = []
    for index, SH, SW in _chunks(boxes, bad, y_axis, x_axis, N, "roi_align"):
        A, B, cells = _chunk_windows(batch, y_axis, x_axis, index, SH, SW, H, W)
        window = xp.take(rows, cells.reshape(-1), axis=0).reshape(-1, SH, SW * C)  # F, all channels
        bin_rows = xp.matmul(A, window).reshape(-1, OH, SW, C)  # A F: (R_c, OH, SW, C)
        total[index] = xp.matmul(B[:, None], bin_rows)  # (A F) B^T: (R_c, OH, OW, C)
        chunks.append((index, A, B, cells))
    out = xp.ascontiguousarray((total / _count(y_axis, x_axis)).transpose(0, 3, 1, 2))
    return out, (features.shape, batch, y_axis, x_axis, chunks)


def roi_align_backward(dout, cache):
    """Gradient of ``roi_align`` with respect to the features only.

    dout: (R, C, OH, OW) -> dfeatures: (N, C, H, W). The transpose of the forward, per RoI and
    channel: dF_k = A_k^T (dout_k / count) B_k, two batched matmuls per chunk; then every window
    is added back onto the cells it was gathered from. The windows of one image's RoIs overlap,
    so a (cell, channel) pair, numbered cell * C + channel, gets several terms: ``xp.add.at``
    adds them all (unbuffered), where ``d[index] += values`` would keep only one. One call per
    chunk, over its R_c * SH * SW * C window terms, not the 16 corner terms of every bin; on a
    1-d float array NumPy's add.at is as fast as bincount (which would sum in float64) and, unlike
    CuPy's bincount, needs no device sync.
    The boxes get no gradient: the RoIs are constants here, as in Faster R-CNN's "approximate
    joint training" (Ren et al., 2015), and as in torchvision, whose roi_align has none either.
    """
    (N, C, H, W), batch, y_axis, x_axis, chunks = cache
    R, OH, OW = batch.shape[0], y_axis[0].shape[1], x_axis[0].shape[1]
    if tuple(dout.shape) != (R, C, OH, OW):
        raise ValueError(f"roi_align_backward: expected dout of shape (R, C, OH, OW) = "
                         f"{(R, C, OH, OW)}, got {tuple(dout.shape)}")
    xp = get_array_module(dout)
    share = (dout / _count(y_axis, x_axis)).transpose(0, 2, 3, 1)  # (R, OH, OW, C): the bin average's
    d_rows = xp.zeros(N * H * W * C, dtype=dout.dtype)  # (cell, channel) pairs: cell * C + channel
    for index, A, B, cells in chunks:
        SH, SW = cells.shape[1:]
        d_bin_rows = xp.matmul(B.transpose(0, 2, 1)[:, None], share[index])  # (R_c, OH, SW, C)
        d_window = xp.matmul(A.transpose(0, 2, 1), d_bin_rows.reshape(-1, OH, SW * C))  # (R_c, SH, SW*C)
        # unbuffered: a pair in several windows (overlapping RoIs of one image) gets every term
        xp.add.at(d_rows, (cells[..., None] * C + xp.arange(C)).reshape(-1), d_window.reshape(-1))
    return xp.ascontiguousarray(d_rows.reshape(N, H, W, C).transpose(0, 3, 1, 2))


# ---- the reference: torchvision's CPU kernel, loop for loop -----------------------------------

def _bilinear_simple(fmap, y: float, x: float):
    """One sample of fmap (C, H, W) at (y, x), as torchvision's kernel reads it: (C,)."""
    C, H, W = fmap.shape
    if y < -1.0 or y > H or x < -1.0 or x > W:
        return fmap[:, 0, 0] * 0
    y, x = min(max(y, 0.0), H - 1.0), min(max(x, 0.0), W - 1.0)
    y0, x0 = int(y), int(x)
    y1, x1 = min(y0 + 1, H - 1), min(x0 + 1, W - 1)
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * fmap[:, y0, x0] + (1 - ly) * lx * fmap[:, y0, x1]
            + ly * (1 - lx) * fmap[:, y1, x0] + ly * lx * fmap[:, y1, x1])


def roi_align_simple(features, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True):
    """The reference: loops over RoIs, bins and samples, in Python floats. Slow, obviously right.

    Same arguments and shapes as ``roi_align``; returns only out: (R, C, OH, OW).
    """
    OH, OW = _check_roi_align_args(features, boxes, output_size, spatial_scale, sampling_ratio,
                                   aligned, "roi_align_simple")
    xp = get_array_module(features)
    bad = _invalid_rois(boxes, features.shape[0])
    if bool(bad.any()):
        _refuse(boxes, bad, features.shape[0], "roi_align_simple")
    out = xp.zeros((boxes.shape[0], features.shape[1], OH, OW), dtype=features.dtype)
    offset = 0.5 if aligned else 0.0
    for k, (n, x1, y1, x2, y2) in enumerate(to_numpy(boxes).tolist()):  # host floats
        x1, y1, x2, y2 = (v * spatial_scale - offset for v in (x1, y1, x2, y2))
        roi_h, roi_w = (y2 - y1, x2 - x1) if aligned else (max(y2 - y1, 1.0), max(x2 - x1, 1.0))
        bin_h, bin_w = roi_h / OH, roi_w / OW
        GH = sampling_ratio if sampling_ratio > 0 else math.ceil(bin_h)
        GW = sampling_ratio if sampling_ratio > 0 else math.ceil(bin_w)
        for i in range(OH):
            for j in range(OW):
                for s in range(GH):
                    for t in range(GW):
                        y = y1 + i * bin_h + (s + 0.5) * bin_h / GH
                        x = x1 + j * bin_w + (t + 0.5) * bin_w / GW
                        out[k, :, i, j] += _bilinear_simple(features[int(n)], y, x)
                out[k, :, i, j] /= max(GH * GW, 1)
    return out
