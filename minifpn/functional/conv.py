"""2-d convolution (cross-correlation, as in PyTorch) by im2col and one GEMM per image.

Glossary, used in every docstring of this package:
    N batch, C input channels, H, W input height and width,
    OC output channels, KH, KW kernel size, SH, SW stride, PH, PW padding,
    OH = (H + 2*PH - KH) // SH + 1,  OW = (W + 2*PW - KW) // SW + 1,
    L = OH * OW output positions, K = C * KH * KW numbers in one receptive field.
The derivation of the backward pass is in docs/derivations.md.
"""
from __future__ import annotations

from ..backend import get_array_module
from ._checks import check_float, check_nchw, pair


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

    x: (N, C, H, W)  ->  col: (N, C, KH, KW, OH, OW), where
    col[n, c, i, j, oh, ow] = x_padded[n, c, oh*SH + i, ow*SW + j].
    Built with one strided-slice copy per kernel offset (i, j): KH*KW copies in all.
    Reshaped to (N, C*KH*KW, OH*OW) it is the right-hand side of the convolution's GEMM.
    """
    KH, KW = pair(kernel_size, "kernel_size", "im2col", 1)
    SH, SW = pair(stride, "stride", "im2col", 1)
    PH, PW = pair(padding, "padding", "im2col", 0)
    xp = get_array_module(x)
    N, C, H, W = x.shape
    OH = conv_output_size(H, KH, SH, PH)
    OW = conv_output_size(W, KW, SW, PW)
    x_padded = pad2d(x, (PH, PW))
    col = xp.empty((N, C, KH, KW, OH, OW), dtype=x.dtype)
    for i in range(KH):
        for j in range(KW):
            col[:, :, i, j] = x_padded[:, :, _window(i, SH, OH), _window(j, SW, OW)]
    return col


def col2im(col, x_shape, stride=1, padding=0):
    """The adjoint of ``im2col``: add every column entry back where it was read from.

    col: (N, C, KH, KW, OH, OW)  ->  (N, C, H, W) with H, W from ``x_shape``.
    Where receptive fields overlap, the contributions add up (one strided-slice ``+=`` per
    kernel offset); the padding border is cropped off at the end.
    """
    SH, SW = pair(stride, "stride", "col2im", 1)
    PH, PW = pair(padding, "padding", "col2im", 0)
    xp = get_array_module(col)
    N, C, KH, KW, OH, OW = col.shape
    H, W = x_shape[2], x_shape[3]
    dx_padded = xp.zeros((N, C, H + 2 * PH, W + 2 * PW), dtype=col.dtype)
    for i in range(KH):
        for j in range(KW):
            dx_padded[:, :, _window(i, SH, OH), _window(j, SW, OW)] += col[:, :, i, j]
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
    out[n] = weight.reshape(OC, K) @ col[n]: one GEMM per image on the im2col columns, whose
    result (OC, OH*OW) is already NCHW, so no transpose is needed afterwards.
    """
    (SH, SW), (PH, PW) = _check_conv_args(x, weight, bias, stride, padding)
    xp = get_array_module(x)
    N, C, H, W = x.shape
    OC, _, KH, KW = weight.shape
    OH = conv_output_size(H, KH, SH, PH)
    OW = conv_output_size(W, KW, SW, PW)
    pointwise = (KH, KW, SH, SW, PH, PW) == (1, 1, 1, 1, 0, 0)
    if pointwise:
        cols = x.reshape(N, C, H * W)  # a 1x1 conv: every pixel is its own receptive field
    else:
        cols = im2col(x, (KH, KW), (SH, SW), (PH, PW)).reshape(N, C * KH * KW, OH * OW)
    w_mat = weight.reshape(OC, C * KH * KW)
    out = xp.matmul(w_mat, cols)  # (OC, K) @ (N, K, L) -> (N, OC, L)
    if bias is not None:
        out += bias.reshape(1, OC, 1)
    cache = (x.shape, cols, weight, bias is not None, (SH, SW), (PH, PW), pointwise)
    return out.reshape(N, OC, OH, OW), cache


def conv2d_backward(dout, cache):
    """Gradients of ``conv2d``.

    dout: (N, OC, OH, OW), the gradient of the loss with respect to ``out``.
    Returns dx: (N, C, H, W), dweight: (OC, C, KH, KW), dbias: (OC,) or None.
        dweight = sum_n dout[n] @ col[n]^T        (OC, L) @ (L, K)
        dcol[n] = weight^T @ dout[n]              (K, OC) @ (OC, L), then col2im -> dx
        dbias   = dout summed over N, OH, OW
    """
    x_shape, cols, weight, has_bias, stride, padding, pointwise = cache
    xp = get_array_module(dout)
    N, C, H, W = x_shape
    OC, _, KH, KW = weight.shape
    OH, OW = dout.shape[2], dout.shape[3]
    dout_mat = dout.reshape(N, OC, OH * OW)
    w_mat = weight.reshape(OC, C * KH * KW)
    dweight = xp.matmul(dout_mat, cols.transpose(0, 2, 1)).sum(axis=0).reshape(weight.shape)
    dbias = dout.sum(axis=(0, 2, 3)) if has_bias else None
    dcols = xp.matmul(w_mat.T, dout_mat)  # (N, K, L)
    if pointwise:
        dx = dcols.reshape(x_shape)  # the 1x1 fast path: no col2im needed
    else:
        dx = col2im(dcols.reshape(N, C, KH, KW, OH, OW), x_shape, stride, padding)
    return dx, dweight, dbias


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
