"""A strict CuPy stand-in on top of NumPy: the GPU code path, proven on a CPU.

No GPU is lent to this project's CI, so the CuPy branch of minifpn would go untested. This
module imitates what makes CuPy *strict*, which is what CPU-only code gets wrong:

- ``numpy.asarray(device_array)`` raises TypeError, with CuPy's words (no implicit conversion);
- a host ``numpy.ndarray`` operand (0-d included) mixed with a device array in a ufunc or an
  operator raises TypeError, as CuPy's "Unsupported type"; Python and NumPy scalars are fine;
- reductions stay on the device: ``x.sum()`` is a 0-d device array, not a Python float;
- ``float(x)``, ``int(x)``, ``bool(x)``, ``x.item()``, ``x.tolist()``, ``x.get()`` and
  ``asnumpy(x)`` are the device -> host synchronisations: each is counted (``sync_count()``);
  so are the ones hidden in CuPy's routines whose output size depends on the data:
  ``nonzero`` and ``flatnonzero`` (one each) and ``bincount`` (two);
- indexing accepts host integer arrays and lists (CuPy copies them to the device first), and
  host values may be assigned into device arrays (a host -> device copy, not a sync).

Host -> device copies (``asarray``) are free here, as they are asynchronous on a GPU. The data
lives in a NumPy array, so every value is bit for bit what NumPy computes: a training run on
the stand-in must give the same checkpoint as on NumPy. What it cannot show: kernel compilation,
cuBLAS rounding, speed, device memory.
"""
from __future__ import annotations

import numbers

import numpy

_syncs = 0
_launches = 0


def launch_count() -> int:
    """Device operations since the last ``reset_launch_count()``: every call that computes into
    a new or existing device buffer (a ufunc, a reduction, a copy, a fancy-index gather, a
    ``__setitem__``, a GEMM, a memset for ``zeros``) counts one, as one kernel launch (or one
    cuBLAS call) on a GPU; views (reshape, transpose, basic slicing) and ``empty`` count none.
    An estimate: CuPy fuses nothing here either, but some of its routines launch two kernels."""
    return _launches


def reset_launch_count() -> None:
    global _launches
    _launches = 0


def _launch(result=None, *sources):
    """Count one device operation, unless ``result`` is a view of one of ``sources``."""
    global _launches
    if isinstance(result, numpy.ndarray):  # (a loop: this module's own `any` is the device one)
        for s in sources:
            if isinstance(s, numpy.ndarray) and numpy.shares_memory(result, s):
                return
    _launches += 1


def sync_count() -> int:
    """Device -> host synchronisations since the last ``reset_sync_count()``."""
    return _syncs


def reset_sync_count() -> None:
    global _syncs
    _syncs = 0


def _sync():
    global _syncs
    _syncs += 1


def _unsupported(value, where: str):
    return TypeError(f"Unsupported type {type(value)} in {where}: a host numpy.ndarray cannot be "
                     f"mixed with device arrays (strict CuPy stand-in); move it with "
                     f"minifpn.backend.to_device(x, 'cupy') first")


def _unwrap(value, where: str, allow_host: bool = False):
    """Device arrays -> their NumPy data; a host ndarray is refused unless ``allow_host``;
    lists and tuples are walked (e.g. ``concatenate``'s sequence)."""
    if isinstance(value, ndarray):
        return value._a
    if isinstance(value, numpy.ndarray):
        if not allow_host:
            raise _unsupported(value, where)
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v, where, allow_host) for v in value)
    return value


def _wrap(value):
    """NumPy results -> device arrays; 0-d results and NumPy scalars become 0-d device arrays."""
    if isinstance(value, numpy.ndarray):
        return ndarray(value)
    if isinstance(value, numpy.generic):
        return ndarray(numpy.asarray(value))
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def _arrays_in(args):
    """The NumPy arrays among ``args`` (one level of lists walked), for the view test."""
    found = []
    for a in args:
        if isinstance(a, numpy.ndarray):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found += [b for b in a if isinstance(b, numpy.ndarray)]
    return found


def _index(key):
    """An index: device arrays unwrapped; host integer/boolean arrays and lists are accepted, as
    CuPy copies them to the device."""
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if isinstance(key, ndarray):
        return key._a
    return key


class ndarray(numpy.lib.mixins.NDArrayOperatorsMixin):
    """A device array: NumPy data that refuses to be read by the host without an explicit sync."""

    __array_priority__ = 100

    def __init__(self, data):
        if not isinstance(data, numpy.ndarray):
            raise TypeError(f"strict_cupy.ndarray wraps a numpy.ndarray, got {type(data)}")
        self._a = data

    # ---- refusals, as CuPy's ------------------------------------------------------------------
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        where = f"ufunc {ufunc.__name__!r}"
        args = [_unwrap(x, where) for x in inputs]
        for x in inputs:
            if not isinstance(x, (ndarray, numbers.Number, numpy.generic, bool)):
                raise _unsupported(x, where)
        out = kwargs.get("out")
        if out is not None:
            for o in out:
                if not isinstance(o, ndarray):
                    raise _unsupported(o, where + " (out=)")
            kwargs["out"] = tuple(o._a for o in out)
        result = getattr(ufunc, method)(*args, **kwargs)
        _launch()
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(result)

    def __array_function__(self, func, types, args, kwargs):
        where = f"numpy.{func.__name__}"
        args = _unwrap(list(args), where)
        result = func(*args, **{k: _unwrap(v, where) for k, v in kwargs.items()})
        _launch(result, *_arrays_in(args))
        return _wrap(result)

    # ---- the counted synchronisations -----------------------------------------------------------
    def get(self):
        """Copy to the host as a numpy.ndarray (a synchronisation)."""
        _sync()
        return self._a.copy()

    def item(self):
        _sync()
        return self._a.item()

    def tolist(self):
        _sync()
        return self._a.tolist()

    def __float__(self):
        _sync()
        return float(self._a)

    def __int__(self):
        _sync()
        return int(self._a)

    def __bool__(self):
        _sync()
        return bool(self._a)

    def __index__(self):
        _sync()
        return self._a.__index__()

    # ---- host metadata: no synchronisation ------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    dtype = property(lambda self: self._a.dtype)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray(self._a.T))

    def __len__(self):
        return len(self._a)

    def __iter__(self):  # CuPy iterates over the first axis, giving device arrays
        return (ndarray(numpy.asarray(row)) for row in self._a)

    def __repr__(self):  # printing reads the data: a synchronisation, as in CuPy
        _sync()
        return f"strict_cupy.{self._a!r}"

    __str__ = __repr__

    def __format__(self, spec):
        _sync()
        return format(self._a, spec) if self._a.ndim else format(str(self._a), spec)

    def __getitem__(self, key):
        result = self._a[_index(key)]
        _launch(result, self._a)  # basic slicing is a view; fancy indexing is a gather kernel
        return _wrap(result)

    def __setitem__(self, key, value):
        self._a[_index(key)] = value._a if isinstance(value, ndarray) else value
        _launch()

    def __getattr__(self, name):
        # methods (reshape, transpose, astype, sum, max, copy, ...) run on the data and return
        # device arrays; host ndarray arguments are refused as in a ufunc. Protocols stay hidden:
        # NumPy would read the data through __array_interface__ (CuPy has none of them)
        if name.startswith("__"):
            raise AttributeError(f"strict_cupy.ndarray has no attribute {name!r}")
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr)
        where = f"ndarray.{name}"

        def method(*args, **kwargs):
            result = attr(*_unwrap(list(args), where),
                          **{k: _unwrap(v, where) for k, v in kwargs.items()})
            if isinstance(result, (numpy.ndarray, numpy.generic)):
                _launch(result, self._a)  # reshape/transpose/view: no kernel
            return _wrap(result)
        return method

    def __reduce__(self):  # pickling a device array is a copy to the host
        _sync()
        return (ndarray, (self._a.copy(),))


def asarray(a, dtype=None, order=None):
    """Host (or device) data -> a device array (a host -> device copy: not a sync)."""
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == dtype else a.astype(dtype)
    if hasattr(a, "__cuda_array_interface__"):
        raise TypeError("strict_cupy.asarray: foreign device arrays are not supported")
    return ndarray(numpy.array(_unwrap(a, "asarray", allow_host=True), dtype=dtype, order=order))


def array(a, dtype=None, copy=True, order="K", ndmin=0):
    if isinstance(a, ndarray):
        return ndarray(numpy.array(a._a, dtype=dtype, copy=copy, order=order, ndmin=ndmin))
    return ndarray(numpy.array(_unwrap(a, "array", allow_host=True), dtype=dtype, order=order,
                               ndmin=ndmin))


def asnumpy(a):
    """A device array -> a numpy.ndarray (a synchronisation); host values pass through."""
    if isinstance(a, ndarray):
        return a.get()
    return numpy.asarray(a)


def get_array_module(*args):
    import sys
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else numpy


def _device_function(name):
    """``xp.name``: NumPy's function on unwrapped device arrays; host ndarrays refused (as CuPy's
    routines refuse them); the result on the device."""
    func = getattr(numpy, name)
    where = f"strict_cupy.{name}"

    def wrapper(*args, **kwargs):
        out = kwargs.pop("out", None)
        args = _unwrap(list(args), where)
        kwargs = {k: _unwrap(v, where) for k, v in kwargs.items()}
        if out is not None:
            if not isinstance(out, ndarray):
                raise _unsupported(out, where + " (out=)")
            func(*args, out=out._a, **kwargs)
            _launch()
            return out
        result = func(*args, **kwargs)
        if name not in ("empty", "empty_like"):  # an allocation from the pool: no kernel
            _launch(result, *_arrays_in(args))
        return _wrap(result)
    wrapper.__name__ = name
    return wrapper


_FUNCTIONS = """
    zeros empty ones full zeros_like empty_like ones_like full_like arange linspace
    concatenate stack take where maximum minimum exp log sqrt abs sign floor ceil isfinite isnan
    isinf cumsum sum mean max min amax amin argmax argmin all any clip matmul tensordot dot
    einsum ascontiguousarray reshape transpose broadcast_to pad bincount nonzero flatnonzero
    argsort sort unique repeat tile expand_dims squeeze moveaxis swapaxes copy square log1p
    expm1 tanh logical_and logical_or logical_not equal not_equal less less_equal greater
    greater_equal add subtract multiply divide true_divide floor_divide power negative
    count_nonzero allclose array_equal log2
""".split()
for _name in _FUNCTIONS:
    globals()[_name] = _device_function(_name)


def _syncing(name: str, syncs: int):
    """``xp.name`` counting the synchronisations that CuPy's makes before it can size its output."""
    device = globals()[name]

    def wrapper(*args, **kwargs):
        for _ in range(syncs):
            _sync()
        return device(*args, **kwargs)
    wrapper.__name__ = name
    return wrapper


# CuPy's nonzero / flatnonzero read the count of nonzeros; bincount reads (x < 0).any() and x.max()
for _name, _syncs_inside in (("nonzero", 1), ("flatnonzero", 1), ("bincount", 2)):
    globals()[_name] = _syncing(_name, _syncs_inside)


def _add_at(a, indices, b=None):
    """``cupy.add.at`` (CuPy >= 13; cupyx.scatter_add before): add ``b`` into the device array
    ``a`` at ``indices``, in place and unbuffered, so a repeated index gets every addition."""
    where = "strict_cupy.add.at"
    if not isinstance(a, ndarray):
        raise _unsupported(a, where)
    numpy.add.at(a._a, _index(indices), _unwrap(b, where))
    _launch()


add.at = _add_at  # noqa: F821 (made by the loop above)

# dtypes and constants are the same objects in CuPy and NumPy
for _name in """float16 float32 float64 int8 int16 int32 int64 uint8 uint16 uint32 uint64 bool_
                 intp dtype inf nan pi newaxis finfo iinfo integer floating
                 result_type can_cast promote_types""".split():
    globals()[_name] = getattr(numpy, _name)


class _StrideTricks:
    @staticmethod
    def as_strided(x, shape=None, strides=None):
        """A view of a device array with other strides (in bytes), as CuPy's: no kernel."""
        if not isinstance(x, ndarray):
            raise _unsupported(x, "strict_cupy.lib.stride_tricks.as_strided")
        return ndarray(numpy.lib.stride_tricks.as_strided(x._a, shape=shape, strides=strides))


class lib:  # noqa: N801 (CuPy's name: cupy.lib.stride_tricks)
    stride_tricks = _StrideTricks()


class _Runtime:
    @staticmethod
    def getDeviceCount() -> int:
        return 1


class _Device:
    """``cupy.cuda.Device(n).use()``: records n as the current device (the stand-in has one)."""

    current = 0

    def __init__(self, device: int = 0):
        self.id = device

    def use(self) -> None:
        count = cuda.runtime.getDeviceCount()
        if not 0 <= self.id < count:
            raise RuntimeError(f"cudaErrorInvalidDevice: device {self.id} of {count}")
        _Device.current = self.id


class cuda:  # noqa: N801 (CuPy's name)
    runtime = _Runtime()
    Device = _Device


__all__ = ["asarray", "asnumpy", "cuda", "get_array_module", "launch_count", "lib", "ndarray",
           "reset_launch_count", "reset_sync_count", "sync_count"]
