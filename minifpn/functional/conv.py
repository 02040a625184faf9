"""2-d convolution (cross-correlation, as in PyTorch) by im2col and one GEMM for the whole batch.

Glossary, used in every docstring of this package:
    N batch, C input channels, H, W input height and width,
    OC output channels, KH, KW kernel size, SH, SW stride, PH, PW padding,
    OH = (H + 2*PH - KH) // SH + 1,  OW = (W + 2*PW - KW) // SW + 1,
    L = OH * OW output positions, C*KH*KW numbers in one receptive field (in detection code K
    counts classes and R RoIs).
The derivation of the backward pass is in docs/derivations.md.
"""
from __future__ import annotations

from ..backend import get_array_module
from .checks import check_float, check_nchw, pair


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution along one axis: (size + 2*padding - kernel) // stride + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def pad2d(x, padding: tuple[int, int], value=0.0):
    """Pad the last two axes of (N, C, H, W) ``x`` with ``value``: -> (N, C, H + 2*PH, W + 2*PW)."""
    PH, PW = padding
    if PH == 0 and PW == 0:
        return x
    xp = get_array_module(x)
    N, C, H, W = x.shape
    out = xp.full((N, C, H + 2 * PH, W + 2 * PW), value, dtype=x.dtype)
    out[:, :, PH:PH + H, PW:PW + W] = x
    return out


def _window(offset: int, stride: int, count: int) -> slice:
    """Rows (or columns) that kernel offset ``offset`` touches: offset, offset+stride, ... (count of them)."""
    return slice(offset, offset + stride * (count - 1) + 1, stride)


def im2col(x, kernel_size, stride=1, padding=0):
    """Lay out every receptive field of ``x`` as a column.

    x: (N, C, H, W)  ->  col: (C, KH, KW, N, OH, OW), where
    col[c, i, j, n, oh, ow] = x_padded[n, c, oh*SH + i, ow*SW + j].
    Built with one strided-slice copy per kernel offset (i, j): KH*KW copies in all.
    Reshaped to (C*KH*KW, N*OH*OW) it is the right-hand side of the convolution's
    GEMM: one column per output position of every image, so the whole batch is one product.
    """
    KH, KW = pair(kernel_size, "kernel_size", "im2col", 1)
    SH, SW = pair(stride, "stride", "im2col", 1)
    PH, PW = pair(padding, "padding", "im2col", 0)
    xp = get_array_module(x)
    N, C, H, W = x.shape
    OH = conv_output_size(H, KH, SH, PH)
    OW = conv_output_size(W, KW, SW, PW)
    x_padded = pad2d(x, (PH, PW)).transpose(1, 0, 2, 3)  # (C, N, Hp, Wp), a view
    col = xp.empty((C, KH, KW, N, OH, OW), dtype=x.dtype)
    for i in range(KH):
        for j in range(KW):
            col[:, i, j] = x_padded[:, :, _window(i, SH, OH), _window(j, SW, OW)]
    return col


def im2col_strided(x, kernel_size, stride=1, padding=0):
    """The same columns as ``im2col``, from one strided view and one copy (what ``conv2d`` uses).

    x: (N, C, H, W)  ->  col: (C, KH, KW, N, OH, OW), equal to ``im2col(x, ...)`` entry for entry.
    The view's six strides walk the padded input: a step along i or oh moves one row (times SH
    for oh), a step along j or ow one column (times SW for ow), so col[c, i, j, n, oh, ow] is
    read at x_padded[n, c, oh*SH + i, ow*SW + j] without any data being moved; the copy then
    lays all KH*KW offsets out at once. One copy instead of KH*KW is what a GPU wants (one
    kernel launch, not nine); on the CPU the two take about the same time.
    """
    KH, KW = pair(kernel_size, "kernel_size", "im2col_strided", 1)
    SH, SW = pair(stride, "stride", "im2col_strided", 1)
    PH, PW = pair(padding, "padding", "im2col_strided", 0)
    xp = get_array_module(x)
    N, C, H, W = x.shape
    OH = conv_output_size(H, KH, SH, PH)
    OW = conv_output_size(W, KW, SW, PW)
    x_padded = xp.ascontiguousarray(pad2d(x, (PH, PW)))  # the strides below assume C order
    sN, sC, sH, sW = x_padded.strides  # in bytes
    windows = xp.lib.stride_tricks.as_strided(
        x_padded, shape=(C, KH, KW, N, OH, OW), strides=(sC, sH, sW, sN, sH * SH, sW * SW))
    return windows.copy()


def col2im(col, x_shape, stride=1, padding=0):
    """The adjoint of ``im2col``: add every column entry back where it was read from.

    col: (C, KH, KW, N, OH, OW)  ->  (N, C, H, W) with H, W from ``x_shape``.
    Where receptive fields overlap, the contributions add up (one strided-slice add per kernel
    offset); the padding border is cropped off at the end.
    """
    SH, SW = pair(stride, "stride", "col2im", 1)
    PH, PW = pair(padding, "padding", "col2im", 0)
    xp = get_array_module(col)
    C, KH, KW, N, OH, OW = col.shape
    H, W = x_shape[2], x_shape[3]
    dx_padded = xp.zeros((N, C, H + 2 * PH, W + 2 * PW), dtype=col.dtype)
    dx_view = dx_padded.transpose(1, 0, 2, 3)  # (C, N, Hp, Wp), writes land in dx_padded
    for i in range(KH):
        for j in range(KW):
            window = dx_view[:, :, _window(i, SH, OH), _window(j, SW, OW)]  # a view
            xp.add(window, col[:, i, j], out=window)  # in place: `+=` on a slice copies it back
    if PH == 0 and PW == 0:
        return dx_padded
    return xp.ascontiguousarray(dx_padded[:, :, PH:PH + H, PW:PW + W])


def _check_conv_args(x, weight, bias, stride, padding, op="conv2d"):
    check_nchw(x, op, "input")
    if not hasattr(weight, "ndim") or weight.ndim != 4:
        raise ValueError(f"{op}: expected weight of shape (OC, IC, KH, KW) (4 dims), "
                         f"got shape {getattr(weight, 'shape', None)}")
    check_float(x, weight, bias, op=op, names=("input", "weight", "bias"))
    SH, SW = pair(stride, "stride", op, 1)
    PH, PW = pair(padding, "padding", op, 0)
    N, C, H, W = x.shape
    OC, IC, KH, KW = weight.shape
    if C != IC:
        raise ValueError(f"{op}: input has {C} channels but weight of shape (OC, IC, KH, KW) = "
                         f"{tuple(weight.shape)} expects IC = {IC}")
    if bias is not None and tuple(bias.shape) != (OC,):
        raise ValueError(f"{op}: expected bias of shape (OC,) = ({OC},), got {tuple(bias.shape)}")
    if KH > H + 2 * PH or KW > W + 2 * PW:
        raise ValueError(f"{op}: kernel {KH}x{KW} is larger than the padded input "
                         f"{H + 2 * PH}x{W + 2 * PW} (input {H}x{W}, padding {PH},{PW})")
    return (SH, SW), (PH, PW)


def conv2d(x, weight, bias=None, stride=1, padding=0):
    """Convolve (cross-correlate) ``x`` with ``weight``, as ``torch.nn.functional.conv2d``.

    x: (N, C, H, W); weight: (OC, C, KH, KW); bias: (OC,) or None.
    Returns out: (N, OC, OH, OW) and a cache for ``conv2d_backward``.
    One GEMM for the whole batch: (OC, C*KH*KW) @ (C*KH*KW, N*L) -> (OC, N*L), then an (OC, N) -> (N, OC)
    transpose of the result (KH*KW times smaller than the columns). A 1x1 conv at stride 1
    needs no columns: the pixels of each image already are its receptive fields.
    """
    stride, padding = _check_conv_args(x, weight, bias, stride, padding)
    out, cols, pointwise = _conv_gemm(x, weight, stride, padding)
    if bias is not None:
        out += bias.reshape(1, -1, 1, 1)
    cache = (x.shape, cols, weight, bias is not None, stride, padding, pointwise)
    return out, cache


def _conv_gemm(x, weight, stride, padding):
    """The convolution itself, without checks or bias: returns out (N, OC, OH, OW), the columns
    it multiplied (kept for the weight gradient), and whether it was the 1x1 fast path."""
    xp = get_array_module(x)
    N, C, H, W = x.shape
    OC, _, KH, KW = weight.shape
    (SH, SW), (PH, PW) = stride, padding
    OH = conv_output_size(H, KH, SH, PH)
    OW = conv_output_size(W, KW, SW, PW)
    w_mat = weight.reshape(OC, C * KH * KW)
    if (KH, KW, SH, SW, PH, PW) == (1, 1, 1, 1, 0, 0):
        cols = x.reshape(N, C, H * W)
        out = xp.matmul(w_mat, cols)  # (OC, C) @ (N, C, L) -> (N, OC, L), one GEMM per image
        return out.reshape(N, OC, OH, OW), cols, True
    cols = im2col_strided(x, (KH, KW), (SH, SW), (PH, PW)).reshape(C * KH * KW, N * OH * OW)
    out_t = w_mat @ cols  # (OC, C*KH*KW) @ (C*KH*KW, N*L) -> (OC, N*L)
    out = xp.ascontiguousarray(out_t.reshape(OC, N, OH * OW).transpose(1, 0, 2))
    return out.reshape(N, OC, OH, OW), cols, False


def conv2d_backward(dout, cache, input_grad: bool = True):
    """Gradients of ``conv2d``.

    dout: (N, OC, OH, OW), the gradient of the loss with respect to ``out``.
    Returns dx: (N, C, H, W), dweight: (OC, C, KH, KW), dbias: (OC,) or None.
    ``input_grad=False`` skips dx (returned as None): for an input that is a constant to the
    loss, such as a frozen backbone's output (PyTorch skips it for an input without requires_grad).
        dweight = dout_mat @ col^T        (OC, N*L) @ (N*L, C*KH*KW)
        dcol    = weight^T @ dout_mat     (C*KH*KW, OC) @ (OC, N*L), then col2im -> dx
        dbias   = dout summed over N, OH, OW
    where dout_mat is dout laid out as (OC, N*L), like the forward's product. At stride 1 the
    last two steps are one convolution instead: see ``conv2d_input_grad``.
    """
    x_shape, cols, weight, has_bias, stride, padding, pointwise = cache
    xp = get_array_module(dout)
    N, C, H, W = x_shape
    OC, _, KH, KW = weight.shape
    OH, OW = dout.shape[2], dout.shape[3]
    dbias = dout.sum(axis=(0, 2, 3)) if has_bias else None
    if pointwise:  # the 1x1 fast path: per-image products, no col2im
        dout_n = dout.reshape(N, OC, OH * OW)
        dweight = xp.matmul(dout_n, cols.transpose(0, 2, 1)).sum(axis=0).reshape(weight.shape)
        dx = xp.matmul(weight.reshape(OC, C).T, dout_n).reshape(x_shape) if input_grad else None
        return dx, dweight, dbias
    dout_mat = dout.reshape(N, OC, OH * OW).transpose(1, 0, 2).reshape(OC, N * OH * OW)
    dweight = (dout_mat @ cols.T).reshape(weight.shape)
    if not input_grad:
        return None, dweight, dbias
    if stride == (1, 1) and padding[0] < KH and padding[1] < KW:
        dx = conv2d_input_grad(dout, weight, padding)
    else:
        dcols = weight.reshape(OC, C * KH * KW).T @ dout_mat  # (C*KH*KW, N*L)
        dx = col2im(dcols.reshape(C, KH, KW, N, OH, OW), x_shape, stride, padding)
    return dx, dweight, dbias


def conv2d_input_grad(dout, weight, padding):
    """dx of a stride-1 convolution, as a "full" convolution of dout with the flipped kernel.

    dout: (N, OC, OH, OW); weight: (OC, C, KH, KW); padding (PH, PW) of the forward, each
    smaller than the kernel. Returns dx: (N, C, H, W), H = OH + KH - 1 - 2*PH (likewise W).
    Input pixel (h, w) fed output (h - i + PH, w - j + PW) through weight[:, :, i, j], so
        dx[n, c, h, w] = sum over o, i, j of dout[n, o, h - i + PH, w - j + PW] * weight[o, c, i, j],
    a cross-correlation of dout, padded by (KH - 1 - PH, KW - 1 - PW), with the kernel turned
    by 180 degrees and its channel axes swapped (docs/derivations.md derives it). It equals
    ``weight^T @ dout_mat`` followed by ``col2im``, with a copy in place of col2im's adds.
    """
    PH, PW = padding
    KH, KW = weight.shape[2], weight.shape[3]
    xp = get_array_module(dout)
    w_flipped = xp.ascontiguousarray(weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))  # (C, OC, KH, KW)
    dx, _, _ = _conv_gemm(dout, w_flipped, (1, 1), (KH - 1 - PH, KW - 1 - PW))
    return dx


def conv2d_simple(x, weight, bias=None, stride=1, padding=0):
    """The reference: a convolution written as loops over output positions. Slow, obviously right.

    Same shapes as ``conv2d``; returns only out: (N, OC, OH, OW).
    """
    (SH, SW), (PH, PW) = _check_conv_args(x, weight, bias, stride, padding, op="conv2d_simple")
    xp = get_array_module(x)
    N, C, H, W = x.shape
    OC, _, KH, KW = weight.shape
    OH = conv_output_size(H, KH, SH, PH)
    OW = conv_output_size(W, KW, SW, PW)
    x_padded = pad2d(x, (PH, PW))
    out = xp.zeros((N, OC, OH, OW), dtype=x.dtype)
    for oh in range(OH):
        for ow in range(OW):
            patch = x_padded[:, :, oh * SH:oh * SH + KH, ow * SW:ow * SW + KW]  # (N, C, KH, KW)
            out[:, :, oh, ow] = xp.tensordot(patch, weight, axes=([1, 2, 3], [1, 2, 3]))
    if bias is not None:
        out += bias.reshape(1, OC, 1, 1)
    return out
