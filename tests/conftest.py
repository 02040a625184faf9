"""Shared fixtures: the backends to run on, and random inputs placed on them."""
import numpy as np
import pytest

from minifpn.backend import cupy_available, to_device

BACKENDS = [
    "numpy",
    pytest.param("cupy", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not cupy_available(), reason="CuPy with a CUDA device is not available here")]),
]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each test that asks for ``backend`` runs once per array backend ("numpy", "cupy")."""
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def make(backend):
    """make(array) puts a host array on the test's backend."""
    return lambda a: to_device(a, backend)
