"""2-d max pooling, as ``torch.nn.functional.max_pool2d`` (floor mode, padding with -inf).

NaN propagates as in PyTorch: a window with any NaN gives NaN, and its gradient goes to the
last NaN in scan order (PyTorch keeps a new entry when ``entry > max or isnan(entry)``).

With ``kernel_size=1, stride=2`` it is the plain subsampling that makes the FPN's P6 from P5.
Shapes use the glossary of ``conv.py``.
"""
from __future__ import annotations

from ..backend import get_array_module
from .checks import check_nchw, pair
from .conv import _window, conv_output_size, pad2d


def max_pool2d(x, kernel_size, stride=None, padding=0):
    """Max over each KH x KW window of ``x``.

    x: (N, C, H, W) -> out: (N, C, OH, OW), OH = (H + 2*PH - KH) // SH + 1 (likewise OW);
    ``stride`` defaults to ``kernel_size``. Returns out and a cache for ``max_pool2d_backward``.
    The window is scanned one kernel offset at a time, as PyTorch's loop does: an entry wins
    when it is greater than the best so far or is NaN. So where two entries tie, the first one
    in scan order wins; a NaN always wins (the last NaN, if there are several); and a window
    of -inf values goes to its first real entry, never to the padding. The winner alone
    receives the gradient.
    """
    KH, KW = pair(kernel_size, "kernel_size", "max_pool2d", 1)
    SH, SW = pair(kernel_size if stride is None else stride, "stride", "max_pool2d", 1)
    PH, PW = pair(padding, "padding", "max_pool2d", 0)
    check_nchw(x, "max_pool2d")
    if PH > KH // 2 or PW > KW // 2:
        raise ValueError(f"max_pool2d: padding ({PH}, {PW}) must be at most half the kernel "
                         f"({KH}, {KW}), as in PyTorch")
    N, C, H, W = x.shape
    if KH > H + 2 * PH or KW > W + 2 * PW:
        raise ValueError(f"max_pool2d: kernel {KH}x{KW} is larger than the padded input "
                         f"{H + 2 * PH}x{W + 2 * PW}")
    xp = get_array_module(x)
    OH = conv_output_size(H, KH, SH, PH)
    OW = conv_output_size(W, KW, SW, PW)
    x_padded = pad2d(x, (PH, PW), value=-xp.inf)
    padded = PH > 0 or PW > 0
    # with padding: True on the image, False on the border (PyTorch starts at a real entry)
    real = pad2d(xp.ones((1, 1, H, W), dtype=x.dtype), (PH, PW), value=0.0) > 0 if padded else None
    out = out_real = None
    argmax = xp.zeros((N, C, OH, OW), dtype=xp.int32)  # which kernel offset won, as i*KW + j
    for i in range(KH):
        for j in range(KW):
            rows, cols = _window(i, SH, OH), _window(j, SW, OW)
            window = x_padded[:, :, rows, cols]
            window_real = real[:, :, rows, cols] if padded else None
            if out is None:
                out, out_real = window.copy(), window_real
                continue
            # strict > keeps a tie at the earlier offset; a NaN always takes over (PyTorch's rule)
            better = (window > out) | xp.isnan(window)
            if padded:  # a real entry (even -inf) replaces a padded one
                better |= window_real & ~out_real
                out_real = out_real | window_real
            # the same values and winners as where(better, ...), without a branch per entry
            # (xp.where on a random mask is slow on the CPU): maximum lets a NaN win and keep
            # winning, and the offset i*KW + j only grows along the scan
            out = xp.maximum(out, window)
            argmax = xp.maximum(argmax, better * xp.int32(i * KW + j))
    cache = (x.shape, argmax, (KH, KW), (SH, SW), (PH, PW))
    return out, cache


def max_pool2d_backward(dout, cache):
    """Gradient of ``max_pool2d``: each window's gradient goes to the entry that won it.

    dout: (N, C, OH, OW) -> dx: (N, C, H, W). Overlapping windows add their gradients.
    """
    x_shape, argmax, (KH, KW), (SH, SW), (PH, PW) = cache
    xp = get_array_module(dout)
    N, C, H, W = x_shape
    OH, OW = dout.shape[2], dout.shape[3]
    dx_padded = xp.zeros((N, C, H + 2 * PH, W + 2 * PW), dtype=dout.dtype)
    for i in range(KH):
        for j in range(KW):
            won = argmax == i * KW + j  # a product with the 0/1 mask: relu_backward says why
            target = dx_padded[:, :, _window(i, SH, OH), _window(j, SW, OW)]  # a view
            xp.add(target, dout * won, out=target)  # in place, as col2im
    if PH == 0 and PW == 0:
        return dx_padded
    return xp.ascontiguousarray(dx_padded[:, :, PH:PH + H, PW:PW + W])


def global_avg_pool2d(x):
    """The mean of each channel over all its positions: the classifier's pooling of C5.

    x: (N, C, H, W) -> out: (N, C), out[n, c] = sum_{i, j} x[n, c, i, j] / (H * W)
    (``torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)``, torchvision ResNet's avgpool).
    Returns out and a cache for ``global_avg_pool2d_backward``.
    """
    check_nchw(x, "global_avg_pool2d")
    return x.mean(axis=(2, 3)), tuple(x.shape)


def global_avg_pool2d_backward(dout, cache):
    """Gradient of ``global_avg_pool2d``. dout: (N, C) -> dx: (N, C, H, W).

    Every position entered the mean with weight 1 / (H * W), so each receives that share:
    dx[n, c, i, j] = dout[n, c] / (H * W).
    """
    N, C, H, W = cache
    xp = get_array_module(dout)
    dx = xp.zeros((N, C, H, W), dtype=dout.dtype)
    dx += (dout / (H * W)).reshape(N, C, 1, 1)  # broadcast over (H, W): a new array, dout untouched
    return dx
