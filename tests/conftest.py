"""Shared fixtures: the backends to run on, and random inputs placed on them.

Every backend-parametrized test runs on three backends: "numpy"; "strict_cupy", the CuPy
stand-in in tests/strict_cupy (NumPy underneath, CuPy's strictness on top), always; and real
"cupy" where CuPy sees a CUDA device. The stand-in is served as the "cupy" backend, so a test
receives the name "cupy" and the code takes its CuPy branch; only the test id says strict_cupy.
"""
import numpy as np
import pytest
import strict_cupy  # tests/strict_cupy: tests/ is on sys.path, as for torch_helpers

from minifpn.backend import cupy_available, to_device, use_cupy_module

BACKENDS = [
    "numpy",
    "strict_cupy",
    pytest.param("cupy", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not cupy_available(), reason="CuPy with a CUDA device is not available here")]),
]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each test that asks for ``backend`` runs once per array backend: it gets "numpy" or "cupy"
    (the strict stand-in is installed as "cupy" for the test's duration, then taken away)."""
    if request.param == "strict_cupy":
        previous = use_cupy_module(strict_cupy)
        request.addfinalizer(lambda: use_cupy_module(previous))
        return "cupy"
    return request.param


@pytest.fixture
def stand_in():
    """The strict stand-in served as the "cupy" backend for one test (for the tests that count
    its device operations or synchronisations themselves)."""
    previous = use_cupy_module(strict_cupy)
    yield strict_cupy
    use_cupy_module(previous)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def make(backend):
    """make(array) puts a host array on the test's backend."""
    return lambda a: to_device(a, backend)


DTYPES = [np.float32, np.float64]


@pytest.fixture(params=DTYPES, ids=["float32", "float64"])
def dtype(request):
    """Each test that takes ``dtype`` runs in float32 and in float64."""
    return request.param


@pytest.fixture
def th():
    """tests/torch_helpers (tensor, assert_matches, torch), imported only by the tests that ask for
    it, so that without torch only the parity tests skip, with its reason."""
    import torch_helpers
    return torch_helpers
