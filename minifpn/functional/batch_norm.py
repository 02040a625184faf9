"""Batch normalization over (N, H, W) for each channel, as ``torch.nn.functional.batch_norm``.

Training mode normalizes with the batch's mean and (biased) variance and moves the running
averages toward them; eval mode normalizes with the running averages. Derivation of the
backward: docs/derivations.md.

``frozen_batch_norm`` is what a pre-trained backbone's batch norm becomes when it is fine-tuned
as the paper's codebases do (torchvision's ``FrozenBatchNorm2d``, Detectron's AffineChannel):
a fixed per-channel scale and shift, whatever the batch.
"""
from __future__ import annotations

from ..backend import get_array_module
from .checks import check_float, check_nchw


def _check_inputs(op: str, x, weight, bias, running_mean, running_var) -> int:
    """x (N, C, H, W) and the four per-channel arrays (None: absent), floating point, one dtype,
    each of shape (C,). Returns C."""
    check_nchw(x, op)
    names = ("weight", "bias", "running_mean", "running_var")
    arrays = (weight, bias, running_mean, running_var)
    check_float(x, *arrays, op=op, names=("input", *names))
    C = x.shape[1]
    for name, a in zip(names, arrays):
        if a is not None and tuple(a.shape) != (C,):
            raise ValueError(f"{op}: input has {C} channels, expected {name} of shape ({C},), got "
                             f"{tuple(a.shape)}")
    return C


def batch_norm(x, gamma, beta, running_mean, running_var, training: bool,
               momentum: float = 0.1, eps: float = 1e-5):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta, per channel.

    x: (N, C, H, W); gamma, beta, running_mean, running_var: (C,).
    training=True: mean and var are the batch's over (N, H, W), and ``running_mean`` and
    ``running_var`` are updated in place (as PyTorch does) with
        running = (1 - momentum) * running + momentum * batch_statistic,
    where the running variance takes the unbiased batch variance (divided by M - 1, M = N*H*W).
    training=False: mean and var are the running averages.
    Returns y: (N, C, H, W) and a cache for ``batch_norm_backward``.
    """
    C = _check_inputs("batch_norm", x, gamma, beta, running_mean, running_var)
    xp = get_array_module(x)
    M = x.shape[0] * x.shape[2] * x.shape[3]
    if training:
        if M < 2:
            raise ValueError(f"batch_norm: training needs more than one value per channel, "
                             f"got input of shape {x.shape}")
        mean = x.mean(axis=(0, 2, 3))
        centered = x - mean.reshape(1, C, 1, 1)
        var = (centered * centered).mean(axis=(0, 2, 3))
        if running_mean is not None:
            running_mean *= 1 - momentum
            running_mean += momentum * mean
            running_var *= 1 - momentum
            running_var += (momentum * M / (M - 1)) * var  # unbiased variance, as PyTorch keeps
    else:
        mean, var = running_mean, running_var
        centered = x - mean.reshape(1, C, 1, 1)
    inv_std = 1 / xp.sqrt(var + eps)
    x_hat = centered * inv_std.reshape(1, C, 1, 1)
    y = x_hat * gamma.reshape(1, C, 1, 1)
    y += beta.reshape(1, C, 1, 1)
    return y, (x_hat, inv_std, gamma, training)


def batch_norm_backward(dout, cache):
    """Gradients of ``batch_norm``.

    dout: (N, C, H, W) -> dx: (N, C, H, W), dgamma: (C,), dbeta: (C,).
    In training mode the mean and variance depend on x, which adds two correction terms:
        dx = gamma * inv_std * (dout - dbeta / M - x_hat * dgamma / M)
    with dbeta = sum(dout) and dgamma = sum(dout * x_hat) over N, H, W (docs/derivations.md
    derives it). In eval mode they are constants: dx = dout * gamma * inv_std.
    """
    x_hat, inv_std, gamma, training = cache
    N, C, H, W = dout.shape
    M = N * H * W
    dbeta = dout.sum(axis=(0, 2, 3))
    dgamma = (dout * x_hat).sum(axis=(0, 2, 3))
    scale = (gamma * inv_std).reshape(1, C, 1, 1)
    if not training:
        return dout * scale, dgamma, dbeta
    dx = (dout - (dbeta / M).reshape(1, C, 1, 1)) - x_hat * (dgamma / M).reshape(1, C, 1, 1)
    dx *= scale  # in place: dx is this function's own array
    return dx, dgamma, dbeta


def frozen_batch_norm(x, weight, bias, running_mean, running_var, eps: float = 1e-5):
    """y = x * scale + shift per channel, with the statistics and the affine fixed:
        scale = weight / sqrt(running_var + eps),   shift = bias - running_mean * scale
    (``torchvision.ops.misc.FrozenBatchNorm2d``; the same function as ``batch_norm`` in eval
    mode, written as one multiply-add). x: (N, C, H, W); the other four: (C,).
    Returns y: (N, C, H, W) and a cache for ``frozen_batch_norm_backward``.
    """
    C = _check_inputs("frozen_batch_norm", x, weight, bias, running_mean, running_var)
    xp = get_array_module(x)
    scale = weight / xp.sqrt(running_var + eps)
    shift = bias - running_mean * scale
    y = x * scale.reshape(1, C, 1, 1)
    y += shift.reshape(1, C, 1, 1)
    return y, scale


def frozen_batch_norm_backward(dout, cache):
    """Gradient of ``frozen_batch_norm`` for its input only: nothing else in it is trained.
    dout: (N, C, H, W) -> dx = dout * scale (per channel), (N, C, H, W)."""
    scale = cache
    return dout * scale.reshape(1, -1, 1, 1)


def sync_batch_norm(x, gamma, beta, running_mean, running_var, comm, momentum: float = 0.1,
                    eps: float = 1e-5):
    """Training-mode ``batch_norm`` over the union of every rank's batch (synchronized BN).

    x: (N_r, C, H, W), this rank's part of the global batch; gamma, beta, running_mean,
    running_var: (C,), the same on every rank. ``comm`` has ``allreduce_(a)``: a summed over the
    ranks in place (``minifpn.parallel``). ONE all-reduce of a (2C + 1,) buffer: the per-channel
    sums of d = x - k and of d * d, and the count M_r = N_r * H * W, with k = running_mean (the
    same on every rank; subtracting it keeps sum(d*d)/M - mean(d)^2 from cancelling), so
        M = sum_r M_r,  mean = k + sum(d) / M,  var = sum(d*d) / M - (sum(d) / M)^2
    are the global batch's (docs/derivations.md). Returns y: (N_r, C, H, W) and a cache for
    ``sync_batch_norm_backward``. The running averages move as ``batch_norm``'s, by the global
    statistics, so they stay the same on every rank."""
    C = _check_inputs("sync_batch_norm", x, gamma, beta, running_mean, running_var)
    xp = get_array_module(x)
    shift = running_mean.reshape(1, C, 1, 1)
    d = x - shift
    count = xp.full((1,), x.shape[0] * x.shape[2] * x.shape[3], dtype=x.dtype)
    stats = xp.concatenate([d.sum(axis=(0, 2, 3)), (d * d).sum(axis=(0, 2, 3)), count])
    comm.allreduce_(stats)  # the forward's one communication
    M = float(stats[2 * C])  # the global count (exact: an integer far below 2^24)
    if M < 2:
        raise ValueError(f"sync_batch_norm: training needs more than one value per channel over "
                         f"the ranks, got {M:g}")
    mean_d = stats[:C] / M
    var = xp.maximum(stats[C:2 * C] / M - mean_d * mean_d, 0)
    mean = running_mean + mean_d
    running_mean *= 1 - momentum
    running_mean += momentum * mean
    running_var *= 1 - momentum
    running_var += (momentum * M / (M - 1)) * var
    inv_std = 1 / xp.sqrt(var + eps)
    x_hat = (d - mean_d.reshape(1, C, 1, 1)) * inv_std.reshape(1, C, 1, 1)
    y = x_hat * gamma.reshape(1, C, 1, 1)
    y += beta.reshape(1, C, 1, 1)
    return y, (x_hat, inv_std, gamma, M, comm)


def sync_batch_norm_backward(dout, cache):
    """Gradients of ``sync_batch_norm`` on this rank.

    dout: (N_r, C, H, W) -> dx: (N_r, C, H, W), dgamma: (C,), dbeta: (C,). dx needs the GLOBAL
        dbeta = sum(dout),  dgamma = sum(dout * x_hat)   over every rank's (N, H, W),
        dx = gamma * inv_std * (dout - dbeta / M - x_hat * dgamma / M)
    (``batch_norm_backward`` with the sums taken over the global batch): ONE all-reduce of the
    (2C,) pair. The returned dgamma and dbeta are this rank's OWN sums, so that the data-parallel
    all-reduce of every parameter's gradient adds them into the global ones exactly once."""
    x_hat, inv_std, gamma, M, comm = cache
    xp = get_array_module(dout)
    C = dout.shape[1]
    dbeta = dout.sum(axis=(0, 2, 3))
    dgamma = (dout * x_hat).sum(axis=(0, 2, 3))
    sums = xp.concatenate([dbeta, dgamma])
    comm.allreduce_(sums)  # the backward's one communication
    dx = (dout - (sums[:C] / M).reshape(1, C, 1, 1)) - x_hat * (sums[C:] / M).reshape(1, C, 1, 1)
    dx *= (gamma * inv_std).reshape(1, C, 1, 1)
    return dx, dgamma, dbeta
