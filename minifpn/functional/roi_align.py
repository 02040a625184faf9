"""RoIAlign (He et al., Mask R-CNN, 2017), as ``torchvision.ops.roi_align``: each region of
interest (RoI) is cut into OH x OW bins, and each bin is the average of bilinearly interpolated
samples. The paper's two-stage detector (Sec. 4.2) pools every RoI this way, from the pyramid
level that Eq. (1) assigns it, into the 7x7 map its Fast R-CNN head reads.

Glossary (N, C, H, W as in conv.py):
    K RoIs, each a row (batch_index, x1, y1, x2, y2) in image coordinates;
    OH, OW the output size, in bins;
    GH, GW the sample grid inside one bin: ``sampling_ratio`` when it is > 0, else
        GH = ceil(roi_height / OH) and GW = ceil(roi_width / OW), per RoI, in feature-map cells;
    count = max(GH * GW, 1), the number of samples one bin averages.
A sample at (y, x) in feature-map cells reads 0 when y < -1, y > H, x < -1 or x > W; otherwise
y and x are clamped to [0, H - 1] and [0, W - 1] and it reads the bilinear mix of its four
neighbouring cells. The backward (a scatter-add of the bilinear weights) is derived in
docs/derivations.md.
"""
from __future__ import annotations

import math
import numbers

from ..backend import get_array_module, to_numpy
from ._checks import check_float, check_nchw, is_int, pair


def _check_roi_align_args(features, boxes, output_size, spatial_scale, sampling_ratio, aligned, op):
    """Check every argument of roi_align; return (OH, OW) as Python ints."""
    check_nchw(features, op, "features")
    if not hasattr(boxes, "ndim") or boxes.ndim != 2 or boxes.shape[1] != 5:
        raise ValueError(f"{op}: expected boxes of shape (K, 5), rows (batch_index, x1, y1, x2, y2), "
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


def _check_rois(boxes, N: int, op: str) -> None:
    """Require finite boxes whose batch index is an integer in [0, N - 1] (one device sync)."""
    xp = get_array_module(boxes)
    index = boxes[:, 0]
    bad = (~xp.isfinite(boxes).all(axis=1) | (index < 0) | (index > N - 1)
           | (index != xp.floor(index)))
    if bool(bad.any()):  # a device -> host synchronisation, one per call
        row = int(xp.argmax(bad))
        raise ValueError(f"{op}: boxes[{row}] = {to_numpy(boxes[row]).tolist()} is not a valid RoI: "
                         f"its batch index must be an integer in [0, {N - 1}] (features hold {N} "
                         f"images) and its coordinates finite")


def _bins(start, end, pooled: int, sampling_ratio: int, aligned: bool):
    """Bin size (K,) along one axis, and the samples per bin: a host int, or (K,) when adaptive.

    start, end: (K,) the RoI's edges in feature-map cells; pooled: OH (or OW)."""
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

    start, bin_size: (K,) in feature-map cells; grid: samples per bin, a host int or (K,);
    G: the padded grid; pooled: OH (or OW); size: H (or W).
    Returns low, high: (K, pooled, G) int64 neighbouring rows (columns), in [0, size - 1];
    w_low, w_high: (K, pooled, G) their bilinear weights, 0 for a sample outside the map or past
    its RoI's own grid (the padding up to G); and grid, for the count.
    """
    xp = get_array_module(start)
    adaptive = not is_int(grid)
    bins = xp.arange(pooled, dtype=start.dtype)[None, :, None]
    steps = xp.arange(G, dtype=start.dtype)[None, None, :]
    per_bin = xp.maximum(grid, 1)[:, None, None] if adaptive else grid  # no 0/0 for an empty grid
    start, bin_size = start[:, None, None], bin_size[:, None, None]
    # torchvision's order of operations, so that float32 rounds the same way
    coord = start + bins * bin_size + (steps + 0.5) * bin_size / per_bin  # (K, pooled, G)
    used = (coord >= -1.0) & (coord <= size)  # farther out, a sample reads 0
    if adaptive:
        used &= steps < grid[:, None, None]  # the padding past this RoI's own grid
    coord = xp.clip(coord, 0, size - 1)
    low = coord.astype(xp.int64)  # floor, since coord >= 0
    high = xp.minimum(low + 1, size - 1)
    frac = coord - low.astype(coord.dtype)
    w_low = xp.where(used, 1.0 - frac, 0.0).astype(coord.dtype, copy=False)
    w_high = xp.where(used, frac, 0.0).astype(coord.dtype, copy=False)
    return low, high, w_low, w_high, grid


def _corners(batch, y_axis, x_axis, H: int, W: int):
    """The four bilinear corners of every sample, one at a time: (index, weight) pairs.

    index: (K, OH, OW, GH, GW) int64, the row of the (N*H*W, C) feature matrix the corner reads;
    weight: (K, OH, OW, GH, GW), the product of the row and column weights (0 for unused samples).
    """
    y_low, y_high, wy_low, wy_high, _ = y_axis
    x_low, x_high, wx_low, wx_high, _ = x_axis
    n = batch[:, None, None, None, None]
    for y, wy in ((y_low, wy_low), (y_high, wy_high)):
        for x, wx in ((x_low, wx_low), (x_high, wx_high)):
            index = (n * H + y[:, :, None, :, None]) * W + x[:, None, :, None, :]
            yield index, wy[:, :, None, :, None] * wx[:, None, :, None, :]


def _count(y_axis, x_axis):
    """Samples each bin averages, max(GH * GW, 1): a host int, or (K, 1, 1, 1) for an adaptive grid."""
    grid_h, grid_w = y_axis[4], x_axis[4]
    count = grid_h * grid_w
    if is_int(count):
        return max(count, 1)
    xp = get_array_module(count)
    return xp.maximum(count, 1).reshape(-1, 1, 1, 1)


def roi_align(features, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True):
    """Pool each RoI into OH x OW bins, each the mean of GH x GW bilinear samples.

    features: (N, C, H, W); boxes: (K, 5), rows (batch_index, x1, y1, x2, y2) in image pixels,
    same dtype as features; output_size: (OH, OW) (an int means square); spatial_scale: feature
    cells per image pixel (1 / stride); sampling_ratio: GH = GW when > 0, adaptive when <= 0;
    aligned: shift the box by -0.5 cell so that a cell's centre is at its index + 0.5 (Detectron2),
    else torchvision's legacy RoIAlign (no shift, and every RoI at least 1 x 1 cell).
    Returns out: (K, C, OH, OW) and a cache for ``roi_align_backward``. Vectorised over RoIs, bins
    and samples: one gather per bilinear corner. An adaptive grid is padded to the largest GH x GW
    of the batch (weight-0 samples), so one very large RoI makes every RoI pay for its grid.
    """
    OH, OW = _check_roi_align_args(features, boxes, output_size, spatial_scale, sampling_ratio,
                                   aligned, "roi_align")
    xp = get_array_module(features)
    N, C, H, W = features.shape
    _check_rois(boxes, N, "roi_align")
    scale = features.dtype.type(spatial_scale)  # in the features' dtype, as torchvision's kernel
    offset = 0.5 if aligned else 0.0
    roi = boxes[:, 1:] * scale - offset  # (K, 4): x1, y1, x2, y2 in feature-map cells
    batch = boxes[:, 0].astype(xp.int64)
    bin_h, grid_h = _bins(roi[:, 1], roi[:, 3], OH, sampling_ratio, aligned)
    bin_w, grid_w = _bins(roi[:, 0], roi[:, 2], OW, sampling_ratio, aligned)
    GH, GW = _largest_grid(grid_h, grid_w)
    y_axis = _axis_samples(roi[:, 1], bin_h, grid_h, GH, OH, H)
    x_axis = _axis_samples(roi[:, 0], bin_w, grid_w, GW, OW, W)
    rows = features.transpose(0, 2, 3, 1).reshape(N * H * W, C)  # one row of C channels per cell
    K, bins = boxes.shape[0], boxes.shape[0] * OH * OW
    total = xp.zeros((bins, 1, C), dtype=features.dtype)
    for index, weight in _corners(batch, y_axis, x_axis, H, W):
        samples = index.shape[3] * index.shape[4]  # GH * GW
        values = xp.take(rows, index.reshape(-1), axis=0).reshape(bins, samples, C)
        total += xp.matmul(weight.reshape(bins, 1, samples), values)  # weighted sum over samples
    total = total.reshape(K, OH, OW, C) / _count(y_axis, x_axis)
    out = xp.ascontiguousarray(total.transpose(0, 3, 1, 2))
    return out, (features.shape, batch, y_axis, x_axis)


def roi_align_backward(dout, cache):
    """Gradient of ``roi_align`` with respect to the features only.

    dout: (K, C, OH, OW) -> dfeatures: (N, C, H, W). Every sample sends dout / count, times each
    corner's bilinear weight, back to the cell that corner read; xp.add.at accumulates, because
    many samples (of one bin, of neighbouring bins, of overlapping RoIs) share cells.
    The boxes get no gradient: the RoIs are constants here, as in Faster R-CNN's "approximate
    joint training" (Ren et al., 2015), and as in torchvision, whose roi_align has none either.
    """
    (N, C, H, W), batch, y_axis, x_axis = cache
    K, OH, OW = batch.shape[0], y_axis[0].shape[1], x_axis[0].shape[1]
    if tuple(dout.shape) != (K, C, OH, OW):
        raise ValueError(f"roi_align_backward: expected dout of shape (K, C, OH, OW) = "
                         f"{(K, C, OH, OW)}, got {tuple(dout.shape)}")
    xp = get_array_module(dout)
    share = (dout / _count(y_axis, x_axis))[:, :, :, :, None, None]  # (K, C, OH, OW, 1, 1)
    corners = list(_corners(batch, y_axis, x_axis, H, W))
    index = xp.concatenate([i.reshape(-1) for i, _ in corners])  # the four corners, one after another
    weight = xp.stack([w for _, w in corners])  # (4, K, OH, OW, GH, GW), in the same order
    d_maps = xp.zeros((C, N * H * W), dtype=dout.dtype)  # one flat map per channel
    for c in range(C):  # NumPy's add.at is about 5x faster on 1-d arrays than on rows of C
        # unbuffered: a cell hit several times gets every addition (d[index] += keeps one)
        xp.add.at(d_maps[c], index, (weight * share[:, c]).reshape(-1))
    return xp.ascontiguousarray(d_maps.reshape(C, N, H, W).transpose(1, 0, 2, 3))


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

    Same arguments and shapes as ``roi_align``; returns only out: (K, C, OH, OW).
    """
    OH, OW = _check_roi_align_args(features, boxes, output_size, spatial_scale, sampling_ratio,
                                   aligned, "roi_align_simple")
    xp = get_array_module(features)
    _check_rois(boxes, features.shape[0], "roi_align_simple")
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
