"""Numerical gradient checks: the proof that every hand-written backward is right.

Method (CS231n's): pick a random upstream gradient ``dout``, so the scalar checked is
``loss = sum(f(x) * dout)``; its derivative by central differences,
    dloss/dx[i] ~ (loss(x + h e_i) - loss(x - h e_i)) / (2h),
must equal the backward pass's ``dx`` in float64 to a relative error below 1e-6 (the default
tolerance). The two outputs are subtracted before the sum, so entries that x[i] does not reach
cancel exactly and only rounding in the reached ones (about 1e-16 of each, over 2h = 2e-5) is
left as noise.
For big tensors, ``directional_check`` compares one random direction instead of every entry.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import backend_name, default_rng, get_array_module, get_backend, to_device, to_numpy


def rel_error(a, b, floor: float = 1e-8) -> float:
    """max |a - b| / max(floor, |a| + |b|) over all entries, computed on the host."""
    a, b = to_numpy(a).astype(np.float64), to_numpy(b).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_error: shapes differ, {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    return float((np.abs(a - b) / np.maximum(np.abs(a) + np.abs(b), floor)).max())


def numerical_gradient(f, x, dout, h: float = 1e-5):
    """Central-difference gradient of ``sum(f() * dout)`` with respect to ``x``.

    f: a function of no arguments that reads ``x`` (which is changed in place and restored);
    x: float64 array; dout: an array shaped like f's output. Returns an array shaped like x.
    """
    if x.dtype.name != "float64":
        raise TypeError(f"numerical_gradient needs a float64 x to be accurate, got {x.dtype}")
    if not x.flags.c_contiguous:
        raise ValueError("numerical_gradient needs a C-contiguous x (it is changed through a view)")
    xp = get_array_module(x)
    grad = xp.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)  # views into x and grad
    for i in range(x.size):
        old = flat[i].copy()
        flat[i] = old + h
        plus = f().copy()
        flat[i] = old - h
        minus = f()
        flat[i] = old
        # difference first, then sum: outputs that x[i] does not reach cancel exactly
        gflat[i] = ((plus - minus) * dout).sum() / (2 * h)
    return grad


def directional_check(f, x, grad, dout, h: float = 1e-5, rng=None) -> float:
    """Relative error between the analytic and the numerical derivative along one random
    direction v: <grad, v> against (loss(x + h v) - loss(x - h v)) / (2h). Cheap for big x."""
    rng = default_rng(0) if rng is None else rng
    v = to_device(rng.standard_normal(x.shape), backend_name(x)).astype(x.dtype)
    old = x.copy()
    x[...] = old + h * v
    plus = f().copy()
    x[...] = old - h * v
    minus = f()
    x[...] = old
    numeric = ((plus - minus) * dout).sum() / (2 * h)
    analytic = (grad * v).sum()
    return rel_error(analytic, numeric)


@dataclass
class CheckResult:
    """One line of a gradient-check table."""

    op: str
    shape: str
    errors: dict  # name of input or parameter -> max relative error
    tol: float

    @property
    def max_error(self) -> float:
        return max(self.errors.values())

    @property
    def passed(self) -> bool:
        return self.max_error < self.tol


def check(op_name, shape, forward, backward, inputs: dict, tol: float = 1e-6, seed: int = 0,
          h: float | dict = 1e-5) -> CheckResult:
    """Check a forward/backward pair on float64 ``inputs`` {name: array}.

    forward(**inputs) -> out; backward(dout) -> {name: gradient} for the names to check.
    The upstream gradient is random (N(0, 1)), so a backward that is right only for an
    all-ones gradient fails. ``h``: the step, or {name: step} (1e-5 for names not given).
    """
    rng = default_rng(seed)
    out = forward(**inputs)
    dout = to_device(rng.standard_normal(out.shape), backend_name(out)).astype(out.dtype)
    analytic = backward(dout)
    errors = {}
    for name, grad in analytic.items():
        step = h.get(name, 1e-5) if isinstance(h, dict) else h
        numeric = numerical_gradient(lambda: forward(**inputs), inputs[name], dout, step)
        errors[name] = rel_error(grad, numeric)
    return CheckResult(op_name, shape, errors, tol)


def format_table(results) -> str:
    """A plain-text table: op, shape, max relative error (and which input), pass/fail."""
    rows = [("op", "shape", "max rel. error", "worst", "result")]
    for r in results:
        worst = max(r.errors, key=r.errors.get)
        rows.append((r.op, r.shape, f"{r.max_error:.2e}", worst,
                     "pass" if r.passed else f"FAIL (tol {r.tol:.0e})"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---- the table printed by `minifpn gradcheck` ---------------------------------------------

def check_module(name: str, shape: str, module, x, tol: float = 1e-6, seed: int = 0,
                 h: float | dict = 1e-5) -> CheckResult:
    """Check a float64 Module: the gradient of its input and of every parameter (step ``h``)."""
    params = dict(module.named_parameters())

    def forward(input, **_):  # parameters are read from the module; they change in place
        return module(input)

    def backward(dout):
        module.zero_grad()
        dx = module.backward(dout)
        return {"input": dx, **{n: p.grad.copy() for n, p in params.items()}}

    inputs = {"input": x, **{n: p.data for n, p in params.items()}}
    return check(name, shape, forward, backward, inputs, tol=tol, seed=seed, h=h)


def distinct_values(rng, shape, spacing: float = 0.01):
    """Host float64 values at least ``spacing`` apart and at least ``spacing`` away from 0, in a
    random order: no max-pool tie and no ReLU kink lies within a step h << spacing."""
    n = 1
    for s in shape:
        n *= s
    order = rng.permutation(n)
    magnitude = (order // 2 + 1) * spacing
    return (magnitude * np.where(order % 2 == 0, 1.0, -1.0)).reshape(shape)


def _conv_checks(randn):
    from . import functional as F
    results = []
    for (N, C, H, W, OC, KH, S, P) in [(2, 3, 7, 6, 4, 3, 1, 1), (2, 3, 9, 7, 4, 3, 2, 1),
                                       (2, 4, 5, 5, 3, 1, 1, 0), (1, 3, 7, 7, 2, 1, 2, 0),
                                       (1, 2, 8, 9, 3, 5, 3, 2)]:
        state = {}

        def conv_forward(x, weight, bias, S=S, P=P):
            out, state["cache"] = F.conv2d(x, weight, bias, S, P)
            return out

        def conv_backward(dout):
            dx, dw, db = F.conv2d_backward(dout, state["cache"])
            return {"x": dx, "weight": dw, "bias": db}

        results.append(check("conv2d", f"{(N, C, H, W)} k{KH} s{S} p{P}", conv_forward,
                             conv_backward, {"x": randn(N, C, H, W), "weight": randn(OC, C, KH, KH),
                                             "bias": randn(OC)}))
    return results


def _pool_and_upsample_checks(randn, distinct):
    from . import functional as F
    results = []
    for (shape, KH, S, P) in [((2, 3, 7, 6), 3, 2, 1), ((2, 2, 6, 6), 2, 2, 0),
                             ((1, 3, 5, 7), 1, 2, 0)]:
        state = {}

        def pool_forward(x, KH=KH, S=S, P=P):
            out, state["cache"] = F.max_pool2d(x, KH, S, P)
            return out

        results.append(check("max_pool2d", f"{shape} k{KH} s{S} p{P}", pool_forward,
                             lambda d: {"x": F.max_pool2d_backward(d, state["cache"])},
                             {"x": distinct(shape)}))
    for (shape, size) in [((2, 3, 4, 5), (8, 10)), ((1, 2, 4, 3), (7, 5)), ((1, 2, 5, 6), (3, 4))]:
        state = {}

        def up_forward(x, size=size):
            out, state["cache"] = F.upsample_nearest(x, size)
            return out

        results.append(check("upsample_nearest", f"{shape} -> {size}", up_forward,
                             lambda d: {"x": F.upsample_nearest_backward(d, state["cache"])},
                             {"x": randn(*shape)}))
    return results


def _resize_checks(backend: str, seed: int):
    """resize_bilinear, downscaling and upscaling, on inputs of its own random stream (so the
    rows before and after it keep theirs)."""
    from . import functional as F
    rng = default_rng(seed + 13)
    results = []
    for (shape, size) in [((2, 3, 7, 5), (3, 11)), ((1, 2, 6, 6), (12, 12))]:
        state = {}

        def resize_forward(x, size=size):
            out, state["cache"] = F.resize_bilinear(x, size)
            return out

        results.append(check("resize_bilinear", f"{shape} -> {size}", resize_forward,
                             lambda d: {"x": F.resize_bilinear_backward(d, state["cache"])},
                             {"x": to_device(rng.standard_normal(shape), backend)}, seed=seed))
    return results


def _norm_and_elementwise_checks(randn, distinct, uniform):
    from . import functional as F
    results = []
    for training in (True, False):
        state = {}
        C = 3
        running = (randn(C), uniform(0.5, 2.0, C))

        def bn_forward(x, gamma, beta, training=training, running=running):
            out, state["cache"] = F.batch_norm(x, gamma, beta, running[0].copy(),
                                               running[1].copy(), training)
            return out

        def bn_backward(dout):
            dx, dgamma, dbeta = F.batch_norm_backward(dout, state["cache"])
            return {"x": dx, "gamma": dgamma, "beta": dbeta}

        mode = "train" if training else "eval"
        results.append(check(f"batch_norm ({mode})", "(2, 3, 5, 4)", bn_forward, bn_backward,
                             {"x": randn(2, C, 5, 4), "gamma": randn(C), "beta": randn(C)}))
    state = {}

    def relu_forward(x):
        out, state["cache"] = F.relu(x)
        return out

    results.append(check("relu", "(2, 3, 4, 5)", relu_forward,
                         lambda d: {"x": F.relu_backward(d, state["cache"])},
                         {"x": distinct((2, 3, 4, 5))}))

    def add_backward(dout):
        da, db = F.add_backward(dout)
        return {"a": da, "b": db}

    results.append(check("add", "(2, 3, 4, 5)", lambda a, b: F.add(a, b)[0], add_backward,
                         {"a": randn(2, 3, 4, 5), "b": randn(2, 3, 4, 5)}))
    return results


def _layer_checks(randn, distinct, rng, backend, seed):
    from . import nn
    layers = [
        ("Conv2d", "(2, 3, 7, 6) k3 s2 p1", nn.Conv2d(3, 4, 3, 2, 1, rng=rng), randn(2, 3, 7, 6)),
        ("Conv2d 1x1", "(2, 5, 4, 4)", nn.Conv2d(5, 3, 1, rng=rng), randn(2, 5, 4, 4)),
        ("BatchNorm2d", "(3, 4, 3, 5)", nn.BatchNorm2d(4), randn(3, 4, 3, 5)),
        ("ReLU", "(2, 3, 4, 4)", nn.ReLU(), distinct((2, 3, 4, 4))),
        ("MaxPool2d", "(2, 3, 7, 7) k3 s2 p1", nn.MaxPool2d(3, 2, 1), distinct((2, 3, 7, 7))),
        ("Upsample", "(2, 3, 3, 4) x2", nn.Upsample(2), randn(2, 3, 3, 4)),
        ("Sequential", "conv-bn-relu (2, 3, 6, 6)",
         nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1, bias=False, rng=rng), nn.BatchNorm2d(4), nn.ReLU()),
         randn(2, 3, 6, 6)),
    ]
    results = []
    for name, shape, module, x in layers:
        module.to(backend, dtype=np.float64)
        if isinstance(module, nn.BatchNorm2d):  # non-trivial scale and shift
            module.weight.data[...] = randn(module.num_features)
            module.bias.data[...] = randn(module.num_features)
        results.append(check_module(name, shape, module, x, seed=seed))
    # Linear draws after every layer above, so their rows of the table stay as they were
    linear = nn.Linear(6, 4, rng=rng).to(backend, dtype=np.float64)
    results.append(check_module("Linear", "(5, 6) -> (5, 4)", linear, randn(5, 6), seed=seed))
    return results


def _fine_tuning_checks(randn, uniform, backend, seed):
    """The ops of the paper's fine-tuning regime: the classifier's global average pooling and the
    frozen batch norm of a pre-trained backbone (its input gradient: nothing else in it trains)."""
    from . import functional as F
    from . import nn
    results = []
    for shape in [(2, 3, 5, 7), (1, 2, 1, 1)]:
        state = {}

        def gap_forward(x):
            out, state["cache"] = F.global_avg_pool2d(x)
            return out

        results.append(check("global_avg_pool2d", str(shape), gap_forward,
                             lambda d: {"x": F.global_avg_pool2d_backward(d, state["cache"])},
                             {"x": randn(*shape)}))
    C = 3
    fixed = (randn(C), randn(C), randn(C), uniform(0.5, 2.0, C))  # weight, bias, mean, var
    state = {}

    def frozen_forward(x):
        out, state["cache"] = F.frozen_batch_norm(x, *fixed)
        return out

    results.append(check("frozen_batch_norm", "(2, 3, 5, 4)", frozen_forward,
                         lambda d: {"x": F.frozen_batch_norm_backward(d, state["cache"])},
                         {"x": randn(2, C, 5, 4)}))
    frozen = nn.FrozenBatchNorm2d(4).to(backend, dtype=np.float64)
    frozen.weight, frozen.bias, frozen.running_mean = randn(4), randn(4), randn(4)
    frozen.running_var = uniform(0.5, 2.0, 4)
    results.append(check_module("FrozenBatchNorm2d", "(3, 4, 3, 5)", frozen, randn(3, 4, 3, 5),
                                seed=seed))
    return results


def standard_checks(backend: str = "numpy", seed: int = 0) -> list[CheckResult]:
    """Gradient-check every functional op and every layer on small float64 inputs."""
    get_backend(backend)  # raises a clear error if the backend cannot be used
    rng = default_rng(seed)

    def randn(*shape):
        return to_device(rng.standard_normal(shape), backend)

    def distinct(shape):  # no ties, so max and ReLU have one gradient each
        return to_device(distinct_values(rng, shape), backend)

    def uniform(lo, hi, n):
        return to_device(rng.uniform(lo, hi, n), backend)

    # the order of the draws from rng is part of the table's reproducibility: keep it
    return (_conv_checks(randn) + _pool_and_upsample_checks(randn, distinct)
            + _norm_and_elementwise_checks(randn, distinct, uniform)
            + _layer_checks(randn, distinct, rng, backend, seed)
            + _resize_checks(backend, seed) + _fine_tuning_checks(randn, uniform, backend, seed))
