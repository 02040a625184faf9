"""Layers: thin Modules around the functional pairs. Each ``forward`` keeps its cache for the
next ``backward``; each ``backward`` adds parameter gradients and returns the input gradient."""
from __future__ import annotations

from .. import functional as F
from ..backend import DEFAULT_DTYPE, default_rng, get_backend
from ..functional.checks import int_or_pair, integer, pair
from . import init
from .module import Module, Parameter


class Conv2d(Module):
    """Convolution layer. x: (N, in_channels, H, W) -> (N, out_channels, OH, OW).

    weight: (out_channels, in_channels, KH, KW), kaiming-uniform (a=1); bias: (out_channels,), zero.
    ``needs_input_grad`` False: ``backward`` returns None and skips the input gradient, for an input
    nothing trained lies below (the first layer above a frozen backbone part: ``ResNet``'s freeze_at).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 dtype=DEFAULT_DTYPE, rng=None):
        super().__init__()
        # NumPy integer scalars are ints here; bools and floats are refused, with the name
        in_channels = integer(in_channels, "in_channels", "Conv2d", 1)
        out_channels = integer(out_channels, "out_channels", "Conv2d", 1)
        KH, KW = pair(kernel_size, "kernel_size", "Conv2d", 1)
        stride = int_or_pair(stride, "stride", "Conv2d", 1)
        padding = int_or_pair(padding, "padding", "Conv2d", 0)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = (KH, KW), stride, padding
        xp = get_backend("numpy")
        self.weight = Parameter(xp.zeros((out_channels, in_channels, KH, KW), dtype=dtype))
        init.kaiming_uniform_(self.weight, a=1.0, rng=default_rng() if rng is None else rng)
        self.bias = Parameter(xp.zeros((out_channels,), dtype=dtype)) if bias else None
        self.needs_input_grad = True
        self.cache = None

    def forward(self, x):
        bias = self.bias.data if self.bias is not None else None
        out, self.cache = F.conv2d(x, self.weight.data, bias, self.stride, self.padding)
        return out

    def backward(self, dout):
        dx, dweight, dbias = F.conv2d_backward(dout, self._need_cache(self.cache), self.needs_input_grad)
        self.weight.grad += dweight
        if self.bias is not None:
            self.bias.grad += dbias
        return dx

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}")


class Linear(Module):
    """Fully connected layer. x: (N, in_features) -> (N, out_features), as ``torch.nn.Linear``.

    weight: (out_features, in_features), kaiming-uniform with a = sqrt(5), i.e.
    U(-1/sqrt(in_features), 1/sqrt(in_features)); bias: (out_features,), the same U: PyTorch's
    default ``reset_parameters``, so a fresh layer is distributed as torch's.
    """

    def __init__(self, in_features, out_features, bias=True, dtype=DEFAULT_DTYPE, rng=None):
        super().__init__()
        in_features = integer(in_features, "in_features", "Linear", 1)
        out_features = integer(out_features, "out_features", "Linear", 1)
        self.in_features, self.out_features = in_features, out_features
        rng = default_rng() if rng is None else rng
        xp = get_backend("numpy")
        self.weight = Parameter(xp.zeros((out_features, in_features), dtype=dtype))
        init.kaiming_uniform_(self.weight, a=5 ** 0.5, rng=rng)  # gain sqrt(1/3): bound 1/sqrt(IN)
        self.bias = None
        if bias:
            bound = 1 / in_features ** 0.5  # torch: 1/sqrt(fan_in), fan_in of the weight
            self.bias = Parameter(rng.uniform(-bound, bound, size=(out_features,)).astype(dtype))
        self.cache = None

    def forward(self, x):
        bias = self.bias.data if self.bias is not None else None
        out, self.cache = F.linear(x, self.weight.data, bias)
        return out

    def backward(self, dout):
        dx, dweight, dbias = F.linear_backward(dout, self._need_cache(self.cache))
        self.weight.grad += dweight
        if self.bias is not None:
            self.bias.grad += dbias
        return dx

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class BatchNorm2d(Module):
    """Batch normalization per channel. x: (N, num_features, H, W) -> same shape.

    weight (gamma) ones, bias (beta) zeros; buffers running_mean, running_var,
    num_batches_tracked, as in PyTorch (so torchvision weights load by name).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, dtype=DEFAULT_DTYPE):
        super().__init__()
        xp = get_backend("numpy")
        num_features = integer(num_features, "num_features", "BatchNorm2d", 1)
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = Parameter(xp.ones((num_features,), dtype=dtype))
        self.bias = Parameter(xp.zeros((num_features,), dtype=dtype))
        self.register_buffer("running_mean", xp.zeros((num_features,), dtype=dtype))
        self.register_buffer("running_var", xp.ones((num_features,), dtype=dtype))
        self.register_buffer("num_batches_tracked", xp.zeros((), dtype=xp.int64))
        self.cache = None

    def forward(self, x):
        out, self.cache = F.batch_norm(x, self.weight.data, self.bias.data, self.running_mean,
                                       self.running_var, self.training, self.momentum, self.eps)
        if self.training:
            self.num_batches_tracked = self.num_batches_tracked + 1
        return out

    def backward(self, dout):
        dx, dgamma, dbeta = F.batch_norm_backward(dout, self._need_cache(self.cache))
        self.weight.grad += dgamma
        self.bias.grad += dbeta
        return dx

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class SyncBatchNorm2d(BatchNorm2d):
    """``BatchNorm2d`` whose training-mode statistics are those of the global batch, the union of
    every rank's part (``F.sync_batch_norm``: one all-reduce in the forward, one in the
    backward). x: (N_r, num_features, H, W) -> same shape. ``comm``: the ranks'
    communicator (``minifpn.parallel``); with one rank, or in eval mode, it is ``BatchNorm2d``.
    Same parameters, buffers and state-dict keys as ``BatchNorm2d``: ``from_batch_norm`` makes one
    that shares a ``BatchNorm2d``'s arrays, so checkpoints do not depend on the number of ranks.
    The parameter gradients it adds are this rank's own; the data-parallel all-reduce sums them."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, dtype=DEFAULT_DTYPE, comm=None):
        super().__init__(num_features, eps, momentum, dtype)
        self.comm = comm

    @classmethod
    def from_batch_norm(cls, bn: BatchNorm2d, comm) -> SyncBatchNorm2d:
        """A SyncBatchNorm2d holding ``bn``'s own Parameters and buffers (not copies)."""
        sync = cls.__new__(cls)
        vars(sync).update(vars(bn))
        sync.comm = comm
        return sync

    def _synchronized(self) -> bool:
        return self.training and self.comm is not None and self.comm.size > 1

    def forward(self, x):
        if not self._synchronized():
            return super().forward(x)
        out, self.cache = F.sync_batch_norm(x, self.weight.data, self.bias.data, self.running_mean,
                                            self.running_var, self.comm, self.momentum, self.eps)
        self.num_batches_tracked = self.num_batches_tracked + 1
        return out

    def backward(self, dout):
        cache = self._need_cache(self.cache)
        if len(cache) == 4:  # the forward was plain batch norm (eval mode, or one rank)
            return super().backward(dout)
        dx, dgamma, dbeta = F.sync_batch_norm_backward(dout, cache)
        self.weight.grad += dgamma
        self.bias.grad += dbeta
        return dx

    def extra_repr(self):
        size = self.comm.size if self.comm is not None else 1
        return f"{super().extra_repr()}, ranks={size}"


class FrozenBatchNorm2d(Module):
    """Batch norm with its statistics and affine fixed: y = x * scale + shift per channel, with
    scale = weight / sqrt(running_var + eps), shift = bias - running_mean * scale.
    x: (N, num_features, H, W) -> same shape.

    How the paper's codebases fine-tune a pre-trained backbone (torchvision's
    ``FrozenBatchNorm2d``, detectron2's "FrozenBN", Detectron's AffineChannel): no batch
    statistics, no running-average update, nothing trained. All five arrays are buffers, under
    ``BatchNorm2d``'s state-dict keys (num_batches_tracked included, never changed), so a trained
    ``BatchNorm2d`` loads into it by name and back. Its backward is ``dout * scale``.
    """

    def __init__(self, num_features, eps=1e-5, dtype=DEFAULT_DTYPE):
        super().__init__()
        xp = get_backend("numpy")
        num_features = integer(num_features, "num_features", "FrozenBatchNorm2d", 1)
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", xp.ones((num_features,), dtype=dtype))
        self.register_buffer("bias", xp.zeros((num_features,), dtype=dtype))
        self.register_buffer("running_mean", xp.zeros((num_features,), dtype=dtype))
        self.register_buffer("running_var", xp.ones((num_features,), dtype=dtype))
        self.register_buffer("num_batches_tracked", xp.zeros((), dtype=xp.int64))
        self.cache = None

    def forward(self, x):
        out, self.cache = F.frozen_batch_norm(x, self.weight, self.bias, self.running_mean,
                                              self.running_var, self.eps)
        return out

    def backward(self, dout):
        return F.frozen_batch_norm_backward(dout, self._need_cache(self.cache))

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}"


class ReLU(Module):
    """max(x, 0), element-wise; any shape."""

    def __init__(self):
        super().__init__()
        self.cache = None

    def forward(self, x):
        out, self.cache = F.relu(x)
        return out

    def backward(self, dout):
        return F.relu_backward(dout, self._need_cache(self.cache))


class MaxPool2d(Module):
    """Max pooling. x: (N, C, H, W) -> (N, C, OH, OW), OH = (H + 2*padding - kernel) // stride + 1."""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        kernel_size = int_or_pair(kernel_size, "kernel_size", "MaxPool2d", 1)
        stride = None if stride is None else int_or_pair(stride, "stride", "MaxPool2d", 1)
        padding = int_or_pair(padding, "padding", "MaxPool2d", 0)
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.cache = None

    def forward(self, x):
        out, self.cache = F.max_pool2d(x, self.kernel_size, self.stride, self.padding)
        return out

    def backward(self, dout):
        return F.max_pool2d_backward(dout, self._need_cache(self.cache))

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class Upsample(Module):
    """Nearest upsampling. x: (N, C, H, W) -> (N, C, OH, OW), where (OH, OW) is the ``size`` given
    to ``forward`` or else ``scale_factor`` * (H, W). (The FPN calls ``F.upsample_nearest``
    directly, with the lateral map's size: it keeps one cache per level.)"""

    def __init__(self, scale_factor: int = 2):
        super().__init__()
        self.scale_factor = integer(scale_factor, "scale_factor", "Upsample", 1)
        self.cache = None

    def forward(self, x, size=None):
        if size is None:
            size = (x.shape[2] * self.scale_factor, x.shape[3] * self.scale_factor)
        out, self.cache = F.upsample_nearest(x, size)
        return out

    def backward(self, dout):
        return F.upsample_nearest_backward(dout, self._need_cache(self.cache))

    def extra_repr(self):
        return f"scale_factor={self.scale_factor}, mode='nearest'"
