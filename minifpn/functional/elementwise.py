"""ReLU and the element-wise add (a residual connection, or an FPN merge)."""
from __future__ import annotations

from ..backend import get_array_module
from ._checks import check_float, check_same_shape


def relu(x):
    """max(x, 0), element-wise. x: any shape -> out: same shape; cache for ``relu_backward``."""
    check_float(x, op="relu", names=("input",))
    xp = get_array_module(x)
    out = xp.maximum(x, 0)
    return out, out > 0


def relu_backward(dout, cache):
    """The gradient passes where the input was positive, and is zero elsewhere.

    Returns a new array; ``dout`` is never changed in place, since a residual or FPN add
    may hand the same ``dout`` to another branch too.
    """
    xp = get_array_module(dout)
    return xp.where(cache, dout, 0).astype(dout.dtype, copy=False)


def add(a, b):
    """a + b for two arrays of one shape (no broadcasting). Returns out and an (empty) cache."""
    check_float(a, b, op="add", names=("a", "b"))
    check_same_shape(a, b, "add", ("a", "b"))
    return a + b, None


def add_backward(dout, cache=None):
    """An add hands the same gradient to both of its inputs: returns (da, db) = (dout, dout)."""
    return dout, dout
