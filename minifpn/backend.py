"""Array backends: NumPy (default) or CuPy, chosen by the arrays themselves.

Compute code never imports NumPy: it asks ``xp = get_array_module(x)`` and
writes ``xp.zeros(...)``, so the same line runs on the CPU and on a GPU
(the DeZero / Chainer idiom). Every move between host and device happens here.
"""
from __future__ import annotations

import numpy as np

DEFAULT_DTYPE = np.float32
BACKENDS = ("numpy", "cupy")

try:  # CuPy is optional: importing minifpn must never need it.
    import cupy as _cupy
except Exception:  # ImportError, or a CUDA library that fails to load
    _cupy = None


class BackendError(RuntimeError):
    """Raised when a backend is asked for but cannot be used."""


def use_cupy_module(module):
    """Serve ``module`` as the "cupy" backend; returns the module it replaces (``None`` if none).

    The test suite installs its strict CuPy stand-in (tests/strict_cupy) this way, so that every
    run takes the CuPy branch of this file and of the compute code without a GPU; it puts the
    previous module back afterwards. ``module`` needs CuPy's ``ndarray``, ``asarray``,
    ``asnumpy`` and ``cuda.runtime.getDeviceCount``.
    """
    global _cupy
    previous, _cupy = _cupy, module
    return previous


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    if _cupy is None:
        return False
    try:
        return _cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def available_backends() -> list[str]:
    """Names of the backends usable on this machine, NumPy first."""
    return ["numpy"] + (["cupy"] if cupy_available() else [])


def get_backend(name: str = "numpy"):
    """Return the array module for ``name`` ("numpy" or "cupy")."""
    if name == "numpy":
        return np
    if name == "cupy":
        if _cupy is None:
            raise BackendError(
                "backend 'cupy' was asked for but CuPy is not installed; "
                "install it with `pip install minifpn[gpu]` or use backend='numpy'")
        if not cupy_available():
            raise BackendError("backend 'cupy' was asked for but CuPy sees no CUDA device")
        return _cupy
    raise BackendError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def _is_cupy(x) -> bool:
    return _cupy is not None and isinstance(x, _cupy.ndarray)


def backend_name(x) -> str:
    """"cupy" for a CuPy array, "numpy" for anything else."""
    return "cupy" if _is_cupy(x) else "numpy"


def get_array_module(*arrays):
    """The array module (numpy or cupy) of ``arrays``; ``None`` entries are ignored.

    Raises ``BackendError`` when arrays from two backends are mixed, since
    NumPy and CuPy arrays cannot be combined in one computation.
    """
    names = {backend_name(a) for a in arrays if a is not None and hasattr(a, "dtype")}
    if len(names) > 1:
        raise BackendError(
            "arrays from two backends were mixed (numpy and cupy); move them to one "
            "backend first with minifpn.backend.to_device(x, 'numpy' or 'cupy')")
    return _cupy if names == {"cupy"} else np


def to_numpy(x):
    """Copy ``x`` to the host as a NumPy array (a no-op for NumPy arrays)."""
    if _is_cupy(x):
        return _cupy.asnumpy(x)
    if hasattr(x, "detach"):  # a torch tensor, e.g. from a torchvision state_dict
        return x.detach().cpu().numpy()
    return np.asarray(x)


def to_device(x, backend: str = "numpy"):
    """Return ``x`` as an array of ``backend`` ("numpy" or "cupy"), copying only if needed."""
    xp = get_backend(backend)
    if xp is np:
        return to_numpy(x)
    return _cupy.asarray(x)


def default_rng(seed=None) -> np.random.Generator:
    """A host random generator; parameters are drawn on the host, then moved with ``to_device``."""
    return np.random.default_rng(seed)


def reuse_freed_memory() -> bool:
    """Ask glibc to keep freed memory for the next allocation instead of handing it back to the
    operating system. Returns True where that was done (Linux with glibc).

    NumPy allocates a fresh buffer for every intermediate (an im2col matrix is often 10-80 MB).
    By default glibc unmaps big freed buffers, so the next allocation page-faults every page
    back in and zeroes it: for a 3x3 conv on 8 x 64 x 32 x 32 that was about half of the time
    (docs/performance.md). The command-line jobs and the benchmarks call this once at start.
    """
    import ctypes
    import sys
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    mmap_ok = libc.mallopt(M_MMAP_THRESHOLD, 32 * 2 ** 20)  # heap, not mmap, up to 32 MB (the max)
    trim_ok = libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)  # never give the heap's top back
    return bool(mmap_ok and trim_ok)
