"""SGD with momentum and weight decay (PyTorch's rule), and the learning-rate schedule.

For each parameter p with gradient g:
    g <- g + weight_decay * p;   v <- momentum * v + g;   p <- p - lr * v
"""
from __future__ import annotations

from .backend import backend_name, to_device, to_numpy


class SGD:
    """Stochastic gradient descent over ``module.named_parameters()``."""

    def __init__(self, named_parameters, lr: float, momentum: float = 0.9,
                 weight_decay: float = 1e-4):
        self.params = dict(named_parameters)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.velocity = {name: None for name in self.params}

    def step(self) -> None:
        for name, p in self.params.items():
            g = p.grad + self.weight_decay * p.data if self.weight_decay else p.grad
            v = self.velocity[name]
            v = g.copy() if v is None else self.momentum * v + g
            self.velocity[name] = v
            p.data -= self.lr * v

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad[...] = 0

    def state_dict(self) -> dict:
        """Momentum buffers as host arrays, by parameter name (missing before the first step)."""
        return {name: to_numpy(v) for name, v in self.velocity.items() if v is not None}

    def load_state_dict(self, state: dict) -> None:
        for name, v in state.items():
            if name not in self.params:
                raise KeyError(f"SGD.load_state_dict: no parameter named {name!r}")
            p = self.params[name]
            if tuple(v.shape) != tuple(p.shape):
                raise ValueError(f"SGD.load_state_dict: {name} has momentum of shape "
                                 f"{tuple(v.shape)} but the parameter is {tuple(p.shape)}")
            self.velocity[name] = to_device(v, backend_name(p.data)).astype(p.dtype)


def learning_rate(iteration: int, base_lr: float, total: int, warmup: int = 100,
                  warmup_factor: float = 0.001, milestones=(0.75, 0.9), gamma: float = 0.1):
    """Linear warm-up from base_lr * warmup_factor over ``warmup`` iterations, then steps of
    x gamma at each milestone (a fraction of ``total``), as Detectron's schedules."""
    if iteration < warmup:
        alpha = iteration / warmup
        return base_lr * (warmup_factor * (1 - alpha) + alpha)
    drops = sum(iteration >= int(m * total) for m in milestones)
    return base_lr * gamma ** drops
