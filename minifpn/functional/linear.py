"""A fully connected layer, as ``torch.nn.functional.linear``: the fc6, fc7 and predictor layers
of the Fast R-CNN head (paper, Sec. 4.2: "two hidden 1,024-d fully-connected (fc) layers").

Glossary: N rows (in the Fast R-CNN head: its RoIs), IN = in_features, OUT = out_features.
"""
from __future__ import annotations

from .checks import check_float


def _check_linear_args(x, weight, bias, op="linear"):
    if not hasattr(x, "ndim") or x.ndim != 2:
        raise ValueError(f"{op}: expected input of shape (N, in_features) (2 dims), got shape "
                         f"{getattr(x, 'shape', type(x).__name__)}; flatten it first, e.g. "
                         f"x.reshape(N, -1)")
    if not hasattr(weight, "ndim") or weight.ndim != 2:
        raise ValueError(f"{op}: expected weight of shape (out_features, in_features) (2 dims), "
                         f"got shape {getattr(weight, 'shape', type(weight).__name__)}")
    check_float(x, weight, bias, op=op, names=("input", "weight", "bias"))
    OUT, IN = weight.shape
    if x.shape[1] != IN:
        raise ValueError(f"{op}: input has {x.shape[1]} features per row but weight of shape "
                         f"(out_features, in_features) = {tuple(weight.shape)} expects "
                         f"in_features = {IN}")
    if bias is not None and tuple(bias.shape) != (OUT,):
        raise ValueError(f"{op}: expected bias of shape (out_features,) = ({OUT},), got "
                         f"{tuple(bias.shape)}")


def linear(x, weight, bias=None):
    """out = x @ weight^T + bias, as ``torch.nn.functional.linear``.

    x: (N, IN); weight: (OUT, IN); bias: (OUT,) or None.
    Returns out: (N, OUT) and a cache for ``linear_backward``. N = 0 rows give a (0, OUT) out.
    """
    _check_linear_args(x, weight, bias)
    out = x @ weight.T  # (N, IN) @ (IN, OUT)
    if bias is not None:
        out = out + bias
    return out, (x, weight, bias is not None)


def linear_backward(dout, cache):
    """Gradients of ``linear``. dout: (N, OUT).

    Returns dx: (N, IN), dweight: (OUT, IN), dbias: (OUT,) or None:
        dx      = dout @ weight        (N, OUT) @ (OUT, IN)
        dweight = dout^T @ x           (OUT, N) @ (N, IN): one outer product per row, summed
        dbias   = dout summed over the N rows
    With N = 0 rows, dweight and dbias are zeros (an empty sum).
    """
    x, weight, has_bias = cache
    dx = dout @ weight
    dweight = dout.T @ x
    dbias = dout.sum(axis=0) if has_bias else None
    return dx, dweight, dbias
