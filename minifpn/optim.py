"""SGD with momentum and weight decay (PyTorch's rule), and the learning-rate schedule.

For each parameter p with gradient g:
    g <- g + weight_decay * p;   v <- momentum * v + g;   p <- p - lr * v
"""
from __future__ import annotations

import numpy as np

from .backend import backend_name, get_array_module, to_device, to_numpy


class SGD:
    """Stochastic gradient descent over ``module.named_parameters()``.

    All parameters live in one flat buffer and all gradients in another: each parameter's
    ``data`` and ``grad`` become views into them, so a step is six whole-model operations and
    ``zero_grad`` one, instead of that many per parameter (on a GPU each is a kernel launch).
    The update is the rule above, element for element; nothing about it depends on the packing.
    A parameter whose array is later replaced (``Module.load_state_dict``, ``Module.to``) is
    noticed at the next call and the buffers are packed again from the current arrays.
    """

    def __init__(self, named_parameters, lr: float, momentum: float = 0.9,
                 weight_decay: float = 1e-4):
        self.params = dict(named_parameters)
        if len({id(p) for p in self.params.values()}) != len(self.params):
            raise ValueError("SGD: a Parameter appears under two names; pass each one once")
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.velocity = None  # flat, like the parameters; None before the first step
        self._pack()

    def _pack(self) -> None:
        """Copy every parameter and gradient into one flat buffer each and view them from there."""
        ps = list(self.params.values())
        dtypes, backends = {p.dtype for p in ps}, {backend_name(p.data) for p in ps}
        if len(dtypes) > 1 or len(backends) > 1:
            raise ValueError(f"SGD: all parameters must share one dtype and backend, got dtypes "
                             f"{sorted(map(str, dtypes))} and backends {sorted(backends)}")
        xp = get_array_module(ps[0].data) if ps else None
        self.data = xp.concatenate([p.data.ravel() for p in ps]) if ps else None
        self.grad = xp.concatenate([p.grad.ravel() for p in ps]) if ps else None
        start = 0
        for p in ps:
            shape, end = p.data.shape, start + p.data.size
            p.data, p.grad = self.data[start:end].reshape(shape), self.grad[start:end].reshape(shape)
            start = end
        self._views = [(p.data, p.grad) for p in ps]
        if self.velocity is not None and ps:  # the parameters moved: their momentum goes along
            self.velocity = to_device(to_numpy(self.velocity), backends.pop()).astype(self.data.dtype)

    def _repack_if_replaced(self) -> None:
        if any(p.data is not d or p.grad is not g
               for p, (d, g) in zip(self.params.values(), self._views)):
            self._pack()

    def step(self) -> None:
        self._repack_if_replaced()
        if self.data is None:
            return
        g = self.grad + self.weight_decay * self.data if self.weight_decay else self.grad.copy()
        if self.velocity is None:
            self.velocity = g
        else:
            self.velocity *= self.momentum
            self.velocity += g
        self.data -= self.lr * self.velocity

    def zero_grad(self) -> None:
        self._repack_if_replaced()
        if self.grad is not None:
            self.grad[...] = 0

    def _spans(self):
        start = 0
        for name, p in self.params.items():
            yield name, p, slice(start, start + p.data.size)
            start += p.data.size

    def state_dict(self) -> dict:
        """Momentum buffers as host arrays, by parameter name (empty before the first step)."""
        if self.velocity is None:
            return {}
        host = to_numpy(self.velocity)  # one transfer for the whole model
        return {name: host[span].reshape(p.shape).copy() for name, p, span in self._spans()}

    def load_state_dict(self, state: dict) -> None:
        """Momentum from ``state_dict()``; a parameter with none gets zero momentum (its next
        velocity is then its gradient, as on a first step)."""
        self._repack_if_replaced()
        spans = {name: (p, span) for name, p, span in self._spans()}
        for name, v in state.items():
            if name not in spans:
                raise KeyError(f"SGD.load_state_dict: no parameter named {name!r}")
            if tuple(v.shape) != tuple(spans[name][0].shape):
                raise ValueError(f"SGD.load_state_dict: {name} has momentum of shape "
                                 f"{tuple(v.shape)} but the parameter is {tuple(spans[name][0].shape)}")
        if not state or self.data is None:
            return
        host = np.zeros(self.data.shape, dtype=self.data.dtype)
        for name, v in state.items():
            host[spans[name][1]] = to_numpy(v).ravel()
        self.velocity = to_device(host, backend_name(self.data))


def learning_rate(iteration: int, base_lr: float, total: int, warmup: int = 100,
                  warmup_factor: float = 0.001, milestones=(0.75, 0.9), gamma: float = 0.1):
    """Linear warm-up from base_lr * warmup_factor over ``warmup`` iterations, then steps of
    x gamma at each milestone (a fraction of ``total``), as Detectron's schedules."""
    if iteration < warmup:
        alpha = iteration / warmup
        return base_lr * (warmup_factor * (1 - alpha) + alpha)
    drops = sum(iteration >= int(m * total) for m in milestones)
    return base_lr * gamma ** drops
