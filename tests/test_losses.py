"""The detection losses: float64 gradient checks and parity with torch.nn.functional."""
import numpy as np
import pytest

from minifpn import functional as F
from minifpn.backend import to_numpy
from minifpn.gradcheck import numerical_gradient, rel_error

TOL = 1e-6


def scalar(f):
    """numerical_gradient wants an array output: wrap a 0-d loss."""
    return lambda: np.asarray(f()).reshape(1)


def test_softmax_cross_entropy_gradient(make, rng):
    logits = make(rng.standard_normal((7, 11)))  # unsaturated: no gradient entry below 1e-4
    targets = make(rng.integers(0, 11, 7))
    loss, cache = F.softmax_cross_entropy(logits, targets, normalizer=5.0)
    dloss = rng.standard_normal()  # a random upstream gradient, as everywhere
    grad = F.softmax_cross_entropy_backward(dloss, cache)
    assert np.abs(to_numpy(grad)).min() > 1e-4 * abs(dloss)
    numeric = numerical_gradient(
        scalar(lambda: to_numpy(F.softmax_cross_entropy(logits, targets, 5.0)[0])),
        logits, np.array([dloss]))
    assert rel_error(grad, numeric) < TOL


def test_smooth_l1_gradient(make, rng):
    pred = make(rng.standard_normal((9, 4)) * 0.3)
    target = make(rng.standard_normal((9, 4)) * 0.3)
    d = to_numpy(pred - target)
    assert (np.abs(np.abs(d) - 1 / 9) > 1e-4).all(), "no entry sits on the kink at |d| = beta"
    assert (np.abs(d) < 1 / 9).any() and (np.abs(d) > 1 / 9).any(), "both branches are used"
    dloss = rng.standard_normal()
    _, cache = F.smooth_l1(pred, target, normalizer=3.0)
    grad = F.smooth_l1_backward(dloss, cache)
    numeric = numerical_gradient(scalar(lambda: to_numpy(F.smooth_l1(pred, target, normalizer=3.0)[0])),
                                 pred, np.array([dloss]))
    assert rel_error(grad, numeric) < TOL


def test_binary_cross_entropy_gradient(make, rng):
    logits = make(rng.standard_normal(20))
    targets = make((rng.random(20) > 0.5).astype(np.float64))
    dloss = rng.standard_normal()
    _, cache = F.binary_cross_entropy_with_logits(logits, targets, 2.0)
    grad = F.binary_cross_entropy_with_logits_backward(dloss, cache)
    numeric = numerical_gradient(
        scalar(lambda: to_numpy(F.binary_cross_entropy_with_logits(logits, targets, 2.0)[0])),
        logits, np.array([dloss]))
    assert rel_error(grad, numeric) < TOL


def test_losses_are_stable_for_huge_logits():
    big = np.array([[1000.0, -1000.0, 0.0]])
    loss, _ = F.softmax_cross_entropy(big, np.array([1]))
    assert np.isfinite(loss) and loss == pytest.approx(2000.0)
    loss, _ = F.binary_cross_entropy_with_logits(np.array([800.0, -800.0]), np.array([0.0, 1.0]))
    assert loss == pytest.approx(1600.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_losses_match_torch(dtype, rng):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    TF = torch.nn.functional
    logits = rng.standard_normal((13, 11)).astype(dtype)
    targets = rng.integers(0, 11, 13)
    tl = torch.tensor(logits, requires_grad=True)
    (TF.cross_entropy(tl, torch.tensor(targets), reduction="sum") / 4).backward()
    loss, cache = F.softmax_cross_entropy(logits, targets, 4.0)
    assert loss.dtype == dtype
    np.testing.assert_allclose(loss, TF.cross_entropy(tl, torch.tensor(targets), reduction="sum").item() / 4,
                               rtol=1e-5)
    np.testing.assert_allclose(F.softmax_cross_entropy_backward(1.0, cache), tl.grad.numpy(),
                               rtol=1e-5, atol=1e-7)

    pred, target = rng.standard_normal((13, 4)).astype(dtype), rng.standard_normal((13, 4)).astype(dtype)
    tp = torch.tensor(pred, requires_grad=True)
    t_loss = TF.smooth_l1_loss(tp, torch.tensor(target), beta=1 / 9, reduction="sum") / 4
    t_loss.backward()
    loss, cache = F.smooth_l1(pred, target, 1 / 9, 4.0)
    np.testing.assert_allclose(loss, t_loss.item(), rtol=1e-5)
    np.testing.assert_allclose(F.smooth_l1_backward(1.0, cache), tp.grad.numpy(), rtol=1e-5, atol=1e-7)

    x, t = rng.standard_normal(13).astype(dtype) * 3, (rng.random(13) > 0.5).astype(dtype)
    tx = torch.tensor(x, requires_grad=True)
    t_loss = TF.binary_cross_entropy_with_logits(tx, torch.tensor(t), reduction="sum") / 4
    t_loss.backward()
    loss, cache = F.binary_cross_entropy_with_logits(x, t, 4.0)
    np.testing.assert_allclose(loss, t_loss.item(), rtol=1e-5)
    np.testing.assert_allclose(F.binary_cross_entropy_with_logits_backward(1.0, cache),
                               tx.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_loss_shape_errors():
    with pytest.raises(ValueError, match=r"expected logits \(M, C\) and targets \(M,\)"):
        F.softmax_cross_entropy(np.zeros((3, 4)), np.zeros(2, int))
    with pytest.raises(ValueError, match="must have one shape"):
        F.smooth_l1(np.zeros((3, 4)), np.zeros((3, 3)))


def test_two_way_softmax_is_binary_cross_entropy_on_the_logit_difference(make, rng):
    """Why the RPN (K = 1) may use a 2-way softmax: CE([a, b], t) = BCE(b - a, t), and likewise
    the gradient: d/db = -d/da = BCE's gradient."""
    logits = rng.standard_normal((20, 2))
    targets = rng.integers(0, 2, 20)
    ce, ce_cache = F.softmax_cross_entropy(make(logits), make(targets), 5.0)
    bce, bce_cache = F.binary_cross_entropy_with_logits(
        make(logits[:, 1] - logits[:, 0]), make(targets.astype(np.float64)), 5.0)
    np.testing.assert_allclose(to_numpy(ce), to_numpy(bce), rtol=1e-12)
    d_ce = to_numpy(F.softmax_cross_entropy_backward(1.0, ce_cache))
    d_bce = to_numpy(F.binary_cross_entropy_with_logits_backward(1.0, bce_cache))
    np.testing.assert_allclose(d_ce[:, 1], d_bce, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(d_ce[:, 0], -d_bce, rtol=1e-10, atol=1e-15)
