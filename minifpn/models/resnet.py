"""The bottom-up pathway: a ResNet of BasicBlocks whose stages end in C2, C3, C4, C5.

Paper, Sec. 3: "we use the feature activations output by each stage's last residual block ...
{C2, C3, C4, C5} for conv2, conv3, conv4, and conv5 outputs ... strides of {4, 8, 16, 32}".
Attribute names follow ``torchvision.models.resnet`` (conv1, bn1, layer1..layer4, downsample),
so resnet18 weights load by name (see ``minifpn.interop``).
"""
from __future__ import annotations

from .. import functional as F
from ..backend import DEFAULT_DTYPE, default_rng
from ..functional._checks import integer
from ..nn import BatchNorm2d, Conv2d, MaxPool2d, Module, Sequential, init


class BasicBlock(Module):
    """Two 3x3 convs with batch norm, plus the shortcut: relu(bn2(conv2(relu(bn1(conv1(x))))) + s(x)).

    x: (N, in_channels, H, W) -> (N, out_channels, OH, OW), OH = ceil(H / stride).
    The shortcut s is the identity, or a 1x1 stride-2 projection with batch norm where the
    block downsamples or changes width (ResNet's option B).
    """

    def __init__(self, in_channels, out_channels, stride=1, dtype=DEFAULT_DTYPE, rng=None):
        super().__init__()
        self.conv1 = Conv2d(in_channels, out_channels, 3, stride, 1, bias=False, dtype=dtype, rng=rng)
        self.bn1 = BatchNorm2d(out_channels, dtype=dtype)
        self.conv2 = Conv2d(out_channels, out_channels, 3, 1, 1, bias=False, dtype=dtype, rng=rng)
        self.bn2 = BatchNorm2d(out_channels, dtype=dtype)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = Sequential(
                Conv2d(in_channels, out_channels, 1, stride, bias=False, dtype=dtype, rng=rng),
                BatchNorm2d(out_channels, dtype=dtype))
        self.relu1_cache = self.relu2_cache = None  # set by forward, used by backward

    def forward(self, x):
        h, self.relu1_cache = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        shortcut = x if self.downsample is None else self.downsample(x)
        out, self.relu2_cache = F.relu(F.add(h, shortcut)[0])
        return out

    def backward(self, dout):
        d = F.relu_backward(dout, self._need_cache(self.relu2_cache))
        d_main, d_shortcut = F.add_backward(d)  # the residual add sends d down both paths
        d_main = self.conv2.backward(self.bn2.backward(d_main))
        d_main = self.conv1.backward(self.bn1.backward(F.relu_backward(d_main, self.relu1_cache)))
        if self.downsample is not None:
            d_shortcut = self.downsample.backward(d_shortcut)
        return d_main + d_shortcut  # x fed both paths: their gradients add


class ResNet(Module):
    """Stem, then four stages of BasicBlocks; ``forward(x) -> [C2, C3, C4, C5]``.

    x: (N, in_channels, H, W). Stem: conv1 (stem_kernel, stride 2) + bn1 + ReLU + 3x3 stride-2
    max-pool, so C2 has stride 4; each later stage halves again (stride 8, 16, 32):
        C2: (N, widths[0], ceil(H/4), ceil(W/4)) ... C5: (N, widths[3], ceil(H/32), ...)
    (each ceil is applied stage by stage: H -> ceil(H/2) -> ceil(ceil(H/2)/2) ...).
    """

    def __init__(self, widths=(16, 32, 64, 128), blocks=(1, 1, 1, 1), in_channels=3,
                 stem_kernel=7, dtype=DEFAULT_DTYPE, seed=0):
        super().__init__()
        rng = default_rng(seed)
        if len(widths) != 4 or len(blocks) != 4:
            raise ValueError(f"ResNet: widths and blocks need one entry per stage (4 each), got "
                             f"{len(widths)} widths and {len(blocks)} blocks")
        widths = tuple(integer(w, "each width", "ResNet", 1) for w in widths)
        blocks = tuple(integer(b, "each block count", "ResNet", 1) for b in blocks)
        in_channels = integer(in_channels, "in_channels", "ResNet", 1)
        stem_kernel = integer(stem_kernel, "stem_kernel", "ResNet", 1)
        self.widths, self.blocks, self.in_channels = widths, blocks, in_channels
        self.conv1 = Conv2d(in_channels, widths[0], stem_kernel, 2, stem_kernel // 2, bias=False,
                            dtype=dtype, rng=rng)
        self.bn1 = BatchNorm2d(widths[0], dtype=dtype)
        self.maxpool = MaxPool2d(3, 2, 1)
        channels = widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks)):
            stride = 1 if stage == 0 else 2
            layer = Sequential(*[BasicBlock(channels if i == 0 else width, width,
                                            stride if i == 0 else 1, dtype, rng)
                                 for i in range(count)])
            setattr(self, f"layer{stage + 1}", layer)
            channels = width
        for m in self.modules():  # torchvision's ResNet init: He-normal (fan_out) convs
            if isinstance(m, Conv2d):
                init.he_normal_(m.weight, rng)
        self.out_channels = list(widths)
        self.stem_relu_cache = None  # set by forward, used by backward

    @property
    def stages(self):
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ResNet: expected images of shape (N, {self.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        h, self.stem_relu_cache = F.relu(self.bn1(self.conv1(x)))
        h = self.maxpool(h)
        features = []  # C2, C3, C4, C5
        for stage in self.stages:
            h = stage(h)
            features.append(h)
        return features

    def backward(self, grads):
        """grads: [dC2, dC3, dC4, dC5] (an entry may be None: no gradient arrives there).

        Walks the stages in reverse. C_k feeds both the FPN (dC_k) and the next stage, so its
        gradient is the sum of the two. Returns dx: (N, in_channels, H, W).
        """
        self._need_cache(self.stem_relu_cache)
        if len(grads) != 4:
            raise ValueError(f"ResNet.backward: expected 4 gradients [dC2, dC3, dC4, dC5], "
                             f"got {len(grads)}")
        d = None
        for stage, d_feature in zip(reversed(self.stages), reversed(grads)):
            if d_feature is not None:
                d = d_feature if d is None else d + d_feature
            if d is None:  # nothing reaches this stage or any above it
                continue
            d = stage.backward(d)
        if d is None:
            raise ValueError("ResNet.backward: every gradient was None")
        d = self.maxpool.backward(d)
        return self.conv1.backward(self.bn1.backward(F.relu_backward(d, self.stem_relu_cache)))


def resnet18(in_channels=3, dtype=DEFAULT_DTYPE, seed=0) -> ResNet:
    """ResNet-18's bottom-up pathway: widths 64/128/256/512, [2, 2, 2, 2] blocks, 7x7 stem
    (torchvision.models.resnet18 without avgpool and fc)."""
    return ResNet((64, 128, 256, 512), (2, 2, 2, 2), in_channels, 7, dtype, seed)


def resnet_small(in_channels=3, dtype=DEFAULT_DTYPE, seed=0) -> ResNet:
    """A small ResNet that trains on a CPU: widths 16/32/64/128, one block per stage, 3x3 stem."""
    return ResNet((16, 32, 64, 128), (1, 1, 1, 1), in_channels, 3, dtype, seed)
