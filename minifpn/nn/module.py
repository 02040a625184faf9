"""Parameter and Module: the bookkeeping that lets layers nest, as in ``torch.nn``.

The backward contract, for every Module in minifpn:
 1. ``forward`` keeps what ``backward`` needs in caches, which ``__init__`` creates as None; a
    ``backward`` with no cache (no forward yet) raises ``BackwardBeforeForward``.
 2. ``backward`` takes the gradient of what ``forward`` returned, in the same structure (one
    array; or a list of arrays, where None means "no gradient reached this output") and returns
    the gradient of what ``forward`` took, in the same structure. It never changes its argument.
 3. It *adds* the gradients of the module's parameters to ``param.grad``, so a parameter used
    twice (a head shared across levels) collects both contributions; ``zero_grad`` clears them.
Where forward takes or returns several things, backward mirrors it, and the class says so:
``DetectionHead.backward(d_logits, d_deltas)`` (forward returns two lists),
``LastLevelP6P7.backward([dP6, dP7]) -> (dP5, dC5)`` (forward takes P5 and C5), and
``Detector.backward()``, whose forward is ``loss``: a scalar, so its gradient is 1.
"""
from __future__ import annotations

import contextlib

from ..backend import backend_name, get_array_module, to_device, to_numpy


class BackwardBeforeForward(RuntimeError):
    """``backward`` was called on a module whose ``forward`` has not run: there is no cache."""


class Parameter:
    """A trainable array ``data`` and the gradient ``grad`` accumulated for it (same shape).

    ``requires_grad`` False marks a frozen parameter (``ResNet``'s ``freeze_at``): it is saved and
    loaded as any other, but no backward computes its gradient and the optimizer leaves it alone.
    """

    def __init__(self, data, requires_grad: bool = True):
        self.data = data
        self.grad = get_array_module(data).zeros_like(data)
        self.requires_grad = requires_grad

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    def __repr__(self):
        return f"Parameter(shape={tuple(self.data.shape)}, dtype={self.data.dtype})"


class Module:
    """Base class: subclasses set Parameters, buffers and sub-Modules as attributes, in order.

    Names are built from attribute names joined by dots, as PyTorch's ``state_dict`` keys
    (``layer1.0.conv1.weight``), so weights move between the two by name.
    """

    def __init__(self):
        self.training = True
        self._buffer_names: list[str] = []

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no forward")

    def backward(self, dout):
        raise NotImplementedError(f"{type(self).__name__} has no backward")

    def _need_cache(self, cache, forward: str = "forward"):
        """Return ``cache``; if it is None (``forward`` never ran), raise BackwardBeforeForward.

        Every module sets its caches to None in ``__init__``, so a backward before any forward
        fails here with words, not with an AttributeError deep inside.
        """
        if cache is None:
            name = type(self).__name__
            raise BackwardBeforeForward(
                f"{name}.backward called before {forward}: run {forward} first (each backward "
                f"uses the cache of the last {forward})")
        return cache

    # ---- the tree of modules ------------------------------------------------------------
    def register_buffer(self, name: str, value) -> None:
        """Keep ``value`` as state that is saved and moved with the module but not trained."""
        setattr(self, name, value)
        if name not in self._buffer_names:
            self._buffer_names.append(name)

    def named_children(self):
        """(name, module) for each direct sub-module, in the order they were set."""
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def modules(self):
        """This module and every module below it, depth first."""
        yield self
        for _, child in self.named_children():
            yield from child.modules()

    def named_parameters(self, prefix: str = ""):
        """(dotted name, Parameter) for every parameter: this module's own, then its children's."""
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield prefix + name, value
        for name, child in self.named_children():
            yield from child.named_parameters(prefix + name + ".")

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_trainable_parameters(self):
        """(dotted name, Parameter) for the parameters that train: ``requires_grad`` is True."""
        return ((name, p) for name, p in self.named_parameters() if p.requires_grad)

    def named_buffers(self, prefix: str = ""):
        """(dotted name, array) for every buffer (running statistics and the like)."""
        for name in self._buffer_names:
            yield prefix + name, getattr(self, name)
        for name, child in self.named_children():
            yield from child.named_buffers(prefix + name + ".")

    def zero_grad(self) -> None:
        """Set every parameter's gradient to zero (gradients accumulate until then)."""
        for p in self.parameters():
            p.grad[...] = 0

    # ---- modes and backends -------------------------------------------------------------
    def train(self, mode: bool = True):
        """Training mode (batch norm uses batch statistics); returns self."""
        for m in self.modules():
            m.training = mode
        return self

    def eval(self):
        """Evaluation mode (batch norm uses its running averages); returns self."""
        return self.train(False)

    @contextlib.contextmanager
    def evaluating(self):
        """``with module.evaluating():`` runs the block in evaluation mode and puts the mode
        it had back afterwards, even when the block raises."""
        was_training = self.training
        self.eval()
        try:
            yield self
        finally:
            self.train(was_training)

    def to(self, backend: str | None = None, dtype=None):
        """Move every parameter and buffer to ``backend`` ("numpy"/"cupy") and/or cast floats
        to ``dtype``; returns self."""
        def move(a):
            if backend is not None:
                a = to_device(a, backend)
            if dtype is not None and a.dtype.kind == "f":
                a = a.astype(dtype)
            return a
        for m in self.modules():
            for value in vars(m).values():
                if isinstance(value, Parameter):
                    value.data, value.grad = move(value.data), move(value.grad)
            for name in m._buffer_names:
                setattr(m, name, move(getattr(m, name)))
        return self

    @property
    def backend(self) -> str:
        """"numpy" or "cupy": where this module's parameters live."""
        for p in self.parameters():
            return backend_name(p.data)
        return "numpy"

    # ---- saving and loading -------------------------------------------------------------
    def state_dict(self, prefix: str = "") -> dict:
        """A snapshot {dotted name: NumPy array} of every parameter and buffer, in PyTorch's
        order: each module's parameters, then its buffers, then its children's."""
        state = {}
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                state[prefix + name] = to_numpy(value.data).copy()
        for name in self._buffer_names:
            state[prefix + name] = to_numpy(getattr(self, name)).copy()
        for name, child in self.named_children():
            state.update(child.state_dict(prefix + name + "."))
        return state

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy arrays from ``state`` (NumPy arrays or torch tensors) into this module.

        Values keep this module's backend and dtype. With ``strict``, missing or unexpected
        keys raise; a shape mismatch always raises, naming the key.
        """
        params = dict(self.named_parameters())
        buffers = {name: None for name, _ in self.named_buffers()}
        expected = set(params) | set(buffers)
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict for {type(self).__name__}: missing keys {missing}, "
                           f"unexpected keys {unexpected}")
        owners = {name: (m, name.rsplit(".", 1)[-1]) for name, m in self._buffer_owners()}
        for name, value in state.items():
            if name not in expected:
                continue
            value = to_numpy(value)
            if name in params:
                target = params[name].data
            else:
                module, attr = owners[name]
                target = getattr(module, attr)
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"load_state_dict: {name} has shape {tuple(value.shape)} in the "
                                 f"state dict but {tuple(target.shape)} in the module")
            new = to_device(value, backend_name(target)).astype(target.dtype)
            if name in params:
                params[name].data = new
            else:
                setattr(module, attr, new)

    def _buffer_owners(self, prefix: str = ""):
        for name in self._buffer_names:
            yield prefix + name, self
        for name, child in self.named_children():
            yield from child._buffer_owners(prefix + name + ".")

    def __repr__(self):
        children = [f"  ({n}): " + repr(c).replace("\n", "\n  ") for n, c in self.named_children()]
        extra = self.extra_repr()
        if not children:
            return f"{type(self).__name__}({extra})"
        return f"{type(self).__name__}({extra}\n" + "\n".join(children) + "\n)"

    def extra_repr(self) -> str:
        return ""


class ModuleList(Module):
    """A list of modules named "0", "1", ... (PyTorch's naming, e.g. ``inner_blocks.0.weight``)."""

    def __init__(self, modules=()):
        super().__init__()
        self._length = 0
        for m in modules:
            self.append(m)

    def append(self, module: Module) -> None:
        setattr(self, str(self._length), module)
        self._length += 1

    def __getitem__(self, i: int) -> Module:
        if i < 0:
            i += self._length
        if not 0 <= i < self._length:
            raise IndexError(f"index {i} out of range for a ModuleList of length {self._length}")
        return getattr(self, str(i))

    def __len__(self) -> int:
        return self._length

    def __iter__(self):
        return (self[i] for i in range(self._length))


class Sequential(ModuleList):
    """Modules applied one after another; ``backward`` walks them in reverse."""

    def __init__(self, *modules):
        super().__init__(modules)
        self._input_shape = None  # set by forward; backward checks that forward ran

    def forward(self, x):
        self._input_shape = tuple(x.shape)
        for m in self:
            x = m(x)
        return x

    def backward(self, dout):
        self._need_cache(self._input_shape)
        for m in reversed(list(self)):
            dout = m.backward(dout)
        return dout
