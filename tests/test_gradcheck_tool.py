"""The gradient checker itself: it must pass right gradients and catch wrong ones."""
import numpy as np
import pytest

from minifpn import functional as F
from minifpn.gradcheck import (
    check,
    directional_check,
    format_table,
    numerical_gradient,
    rel_error,
    standard_checks,
)


def test_rel_error_has_a_floor():
    assert rel_error(np.array([0.0]), np.array([0.0])) == 0.0
    assert rel_error(np.array([1e-12]), np.array([0.0])) == pytest.approx(1e-4)  # 1e-12 / 1e-8
    assert rel_error(np.array([1.0, 2.0]), np.array([1.0, 2.2])) == pytest.approx(0.2 / 4.2)


def test_numerical_gradient_of_a_known_function(rng):
    x = rng.standard_normal((3, 4))
    dout = rng.standard_normal((3, 4))
    grad = numerical_gradient(lambda: x ** 3, x, dout)
    np.testing.assert_allclose(grad, 3 * x ** 2 * dout, rtol=1e-8, atol=1e-10)


def test_numerical_gradient_refuses_float32():
    with pytest.raises(TypeError, match="float64"):
        numerical_gradient(lambda: None, np.zeros(3, np.float32), np.zeros(3))


def test_check_catches_a_wrong_backward(rng):
    """A ReLU backward that forgets the mask: the checker must fail it."""
    x = rng.standard_normal((2, 3, 4, 4)) + 0.05
    wrong = check("relu", "", lambda x: F.relu(x)[0], lambda d: {"x": d}, {"x": x})
    assert not wrong.passed and wrong.max_error > 0.5


def test_random_upstream_gradient_catches_a_backward_right_only_for_ones(rng):
    """out = 2x, backward that returns 2 everywhere (ignores dout): right only if dout is ones."""
    x = rng.standard_normal((3, 3))
    result = check("double", "", lambda x: 2 * x, lambda d: {"x": 2 * np.ones_like(d)}, {"x": x})
    assert not result.passed


def test_directional_check(rng):
    x = rng.standard_normal((40, 50))
    dout = rng.standard_normal((40, 50))
    f = lambda: np.tanh(x)  # noqa: E731
    right = (1 - np.tanh(x) ** 2) * dout
    assert directional_check(f, x, right, dout, rng=rng) < 1e-7
    assert directional_check(f, x, right * 1.01, dout, rng=rng) > 1e-3


def test_standard_checks_all_pass_and_cover_every_op_and_layer():
    results = standard_checks()
    ops = {r.op.split(" ")[0] for r in results}
    assert {"conv2d", "max_pool2d", "upsample_nearest", "batch_norm", "relu", "add", "Conv2d",
            "BatchNorm2d", "ReLU", "MaxPool2d", "Upsample", "Sequential", "Linear",
            "global_avg_pool2d", "frozen_batch_norm", "FrozenBatchNorm2d"} <= ops
    assert all(r.passed for r in results), format_table(results)
    assert all(r.max_error < 1e-6 for r in results)
    table = format_table(results)
    assert table.count("pass") == len(results) and "FAIL" not in table
