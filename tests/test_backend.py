import subprocess
import sys
import types

import numpy as np
import pytest

from minifpn import backend
from minifpn import functional as F


def test_default_dtype_is_float32():
    assert backend.DEFAULT_DTYPE is np.float32


def test_numpy_is_the_default_module():
    x = np.zeros((2, 2), dtype=np.float32)
    assert backend.get_array_module(x) is np
    assert backend.get_array_module(None, x) is np
    assert backend.get_backend() is np
    assert backend.available_backends()[0] == "numpy"


def test_round_trip_keeps_values_and_dtype(backend):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    moved = backend_module_roundtrip(x, backend)
    assert moved.dtype == np.float32
    np.testing.assert_array_equal(moved, x)


def backend_module_roundtrip(x, name):
    return backend.to_numpy(backend.to_device(x, name))


def test_importing_minifpn_never_needs_cupy():
    code = ("import sys; sys.modules['cupy'] = None\n"  # makes `import cupy` fail
            "import minifpn, minifpn.nn, minifpn.functional\n"
            "from minifpn.backend import available_backends; print(available_backends())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['numpy']"


@pytest.mark.skipif(backend._cupy is not None, reason="CuPy is installed here")
def test_asking_for_missing_cupy_is_a_clear_error():
    with pytest.raises(backend.BackendError, match="CuPy is not installed.*minifpn\\[gpu\\]"):
        backend.get_backend("cupy")
    with pytest.raises(backend.BackendError, match="CuPy is not installed"):
        backend.to_device(np.zeros(3), "cupy")


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(backend.BackendError, match="unknown backend 'jax'.*numpy"):
        backend.get_backend("jax")


class _FakeDeviceArray(np.ndarray):
    """Stands in for a cupy.ndarray on a machine without a GPU."""


def test_arrays_from_two_backends_are_refused(monkeypatch):
    monkeypatch.setattr(backend, "_cupy", types.SimpleNamespace(ndarray=_FakeDeviceArray))
    x = np.zeros((1, 2, 5, 5), dtype=np.float32)
    w = np.zeros((3, 2, 3, 3), dtype=np.float32).view(_FakeDeviceArray)
    assert backend.backend_name(w) == "cupy"
    with pytest.raises(backend.BackendError, match="two backends.*numpy and cupy"):
        F.conv2d(x, w)
    with pytest.raises(backend.BackendError, match="two backends"):
        F.add(x, np.zeros_like(x).view(_FakeDeviceArray))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_reuse_freed_memory_is_applied_on_linux():
    assert backend.reuse_freed_memory() is True
    x = np.ones((4096, 4096), dtype=np.float32)  # 64 MB: allocation still works afterwards
    assert float(x.sum()) == 4096 * 4096
