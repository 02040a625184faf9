"""Comparing our arrays with PyTorch's: the outside referee (tinygrad's helper_test_op idea)."""
import numpy as np
import pytest

from minifpn.backend import to_numpy

torch = pytest.importorskip("torch", reason="PyTorch is not installed: parity tests need it "
                            "(pip install -e .[parity])")

# float32 sums of a few hundred products differ from PyTorch's order of summation by ~1e-6.
TOLERANCES = {np.float32: dict(rtol=1e-4, atol=1e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}


def tensor(a, requires_grad=False):
    return torch.tensor(to_numpy(a), requires_grad=requires_grad)


def assert_matches(ours, theirs, dtype, name):
    """Same shape, same dtype, same values (within the dtype's tolerance)."""
    ours = to_numpy(ours)
    theirs = theirs.detach().numpy()
    assert ours.shape == theirs.shape, f"{name}: shape {ours.shape} != torch's {theirs.shape}"
    assert ours.dtype == theirs.dtype == dtype, f"{name}: dtype {ours.dtype} vs torch {theirs.dtype}"
    np.testing.assert_allclose(ours, theirs, err_msg=name, **TOLERANCES[dtype])
