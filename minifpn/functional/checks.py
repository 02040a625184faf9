"""Input checks shared by the functional ops, and by the layers, models and configs built on them: each
failure names what was expected."""
from __future__ import annotations

import math
import numbers

from ..backend import get_array_module


def is_int(value) -> bool:
    """True for a Python int or a NumPy integer scalar (np.int64(2)); False for bools and floats."""
    if type(value) is int:  # the common case, without the slower abstract-class check below
        return True
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # np.bool_ is not Integral


def is_real(value) -> bool:
    """True for a finite real number: an int, a float or a NumPy scalar; False for bools, NaN, inf."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def integer(value, name: str, op: str, minimum: int) -> int:
    """Return ``value`` as a Python int, checking it is an integer (not a bool or a float such
    as 2.5; NumPy integer scalars are fine) and >= ``minimum``."""
    if not is_int(value):
        raise ValueError(f"{op}: {name} must be an int (not a bool or a float), got {value!r}")
    if value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {int(value)}")
    return int(value)


def pair(value, name: str, op: str, minimum: int | None) -> tuple[int, int]:
    """Return ``(value, value)`` for an int, or the pair itself, checking each is >= ``minimum``
    (None: the caller checks the range itself).

    NumPy integer scalars count as ints; bools, floats and strings do not. Returns Python ints.
    """
    if type(value) is int:  # the common cases first: every conv and pool call checks four pairs
        value = (value, value)
    if (type(value) is tuple and len(value) == 2 and type(value[0]) is int
            and type(value[1]) is int and (minimum is None or min(value) >= minimum)):
        return value
    given = value
    if is_int(value):
        value = (value, value)
    message = f"{op}: {name} must be an int or a pair of ints (not bools or floats), got {given!r}"
    try:
        value = tuple(value)
    except TypeError:  # 2.5, None, a 0-d array: neither an int nor a pair
        raise ValueError(message) from None
    if isinstance(given, str) or len(value) != 2 or not all(is_int(v) for v in value):
        raise ValueError(message)
    value = (int(value[0]), int(value[1]))
    if minimum is not None and min(value) < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value!r}")
    return value


def int_or_pair(value, name: str, op: str, minimum: int):
    """As ``pair``, but an int stays one int: how layers keep ``stride=2`` readable in repr."""
    if is_int(value):
        return integer(value, name, op, minimum)
    return pair(value, name, op, minimum)


def check_nchw(x, op: str, name: str = "input") -> None:
    """Require a 4-d (N, C, H, W) floating-point array."""
    if not hasattr(x, "ndim") or x.ndim != 4:
        shape = getattr(x, "shape", type(x).__name__)
        raise ValueError(f"{op}: expected {name} of shape (N, C, H, W) (4 dims), got shape {shape}")
    check_float(x, op=op, names=(name,))


def check_float(*arrays, op: str, names: tuple[str, ...]):
    """Require floating arrays of one dtype on one backend; return their array module."""
    xp = get_array_module(*arrays)  # raises on a numpy/cupy mix
    present = [(n, a) for n, a in zip(names, arrays) if a is not None]
    for n, a in present:
        if a.dtype.kind != "f":
            raise TypeError(f"{op}: {n} must be a floating-point array (float32 or float64), "
                            f"got dtype {a.dtype}")
    dtypes = {a.dtype for _, a in present}
    if len(dtypes) > 1:
        listing = ", ".join(f"{n}={a.dtype}" for n, a in present)
        raise TypeError(f"{op}: all arrays must share one dtype, got {listing}; "
                        f"cast them first, e.g. x.astype(weight.dtype)")
    return xp


def check_same_shape(a, b, op: str, names: tuple[str, str]) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{op}: {names[0]} and {names[1]} must have the same shape, "
                         f"got {a.shape} and {b.shape}")
