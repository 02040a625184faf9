"""Detection losses with hand-written backward: softmax cross-entropy (classes) and Smooth L1
(box deltas), which the detector uses, and sigmoid binary cross-entropy, the objectness loss of
the paper's RPN: minifpn's RPN (K = 1) uses the 2-way softmax instead, which is the same loss on
the logit difference (a test shows it). Each returns a 0-d loss, summed over its rows and
divided by ``normalizer`` (the number of sampled anchors)."""
from __future__ import annotations

from ..backend import get_array_module


def softmax(logits, axis: int = -1):
    """Probabilities from scores along ``axis``: exp(x - max) / sum(exp(x - max)), any shape.
    Subtracting each row's max first does not change the result and keeps exp from overflowing.
    (Inference only: the training losses work with the log-softmax inside them.)"""
    xp = get_array_module(logits)
    probs = xp.exp(logits - logits.max(axis=axis, keepdims=True))
    probs /= probs.sum(axis=axis, keepdims=True)
    return probs


def softmax_cross_entropy(logits, targets, normalizer: float = 1.0):
    """-sum_i log softmax(logits_i)[targets_i] / normalizer.

    logits: (M, C) float; targets: (M,) integer class indices in [0, C). Returns loss (0-d) and
    a cache. Log-softmax is computed after subtracting each row's max, so it cannot overflow.
    """
    xp = get_array_module(logits, targets)
    if logits.ndim != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(f"softmax_cross_entropy: expected logits (M, C) and targets (M,), got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
    rows = xp.arange(logits.shape[0])
    loss = -log_probs[rows, targets].sum() / normalizer
    return loss, (log_probs, targets, normalizer)


def softmax_cross_entropy_backward(dloss, cache):
    """dlogits = (softmax(logits) - onehot(targets)) * dloss / normalizer: (M, C)."""
    log_probs, targets, normalizer = cache
    xp = get_array_module(log_probs)
    dlogits = xp.exp(log_probs)
    dlogits[xp.arange(log_probs.shape[0]), targets] -= 1  # each row once: plain indexing is exact
    return dlogits * (dloss / normalizer)


def binary_cross_entropy_with_logits(logits, targets, normalizer: float = 1.0):
    """sum_i [max(x, 0) - x t + log(1 + exp(-|x|))] / normalizer, the stable form of
    -t log sigmoid(x) - (1 - t) log(1 - sigmoid(x)). logits, targets: same shape, float."""
    xp = get_array_module(logits, targets)
    if logits.shape != targets.shape:
        raise ValueError(f"binary_cross_entropy_with_logits: logits {tuple(logits.shape)} and "
                         f"targets {tuple(targets.shape)} must have one shape")
    loss = (xp.maximum(logits, 0) - logits * targets + xp.log1p(xp.exp(-xp.abs(logits)))).sum()
    return loss / normalizer, (logits, targets, normalizer)


def binary_cross_entropy_with_logits_backward(dloss, cache):
    """dlogits = (sigmoid(x) - t) * dloss / normalizer."""
    logits, targets, normalizer = cache
    xp = get_array_module(logits)
    sigmoid = 1 / (1 + xp.exp(-logits))
    return (sigmoid - targets) * (dloss / normalizer)


def smooth_l1(pred, target, beta: float = 1.0 / 9, normalizer: float = 1.0):
    """sum of 0.5 d^2 / beta where |d| < beta, else |d| - 0.5 beta; d = pred - target.

    pred, target: (M, 4). beta = 1/9 as Detectron's and torchvision's RPN. Returns loss (0-d).
    """
    xp = get_array_module(pred, target)
    if pred.shape != target.shape:
        raise ValueError(f"smooth_l1: pred {tuple(pred.shape)} and target {tuple(target.shape)} "
                         f"must have one shape")
    d = pred - target
    small = xp.abs(d) < beta
    loss = xp.where(small, 0.5 * d * d / beta, xp.abs(d) - 0.5 * beta).sum() / normalizer
    return loss, (d, small, beta, normalizer)


def smooth_l1_backward(dloss, cache):
    """dpred = (d / beta where |d| < beta, else sign(d)) * dloss / normalizer."""
    d, small, beta, normalizer = cache
    xp = get_array_module(d)
    return xp.where(small, d / beta, xp.sign(d)) * (dloss / normalizer)
