"""The bottom-up pathway: a ResNet of BasicBlocks whose stages end in C2, C3, C4, C5.

Paper, Sec. 3: "we use the feature activations output by each stage's last residual block ...
{C2, C3, C4, C5} for conv2, conv3, conv4, and conv5 outputs ... strides of {4, 8, 16, 32}".
Attribute names follow ``torchvision.models.resnet`` (conv1, bn1, layer1..layer4, downsample),
so resnet18 weights load by name (see ``minifpn.interop``).

Fine-tuning a pre-trained backbone as the paper's codebases do (docs/fpn.md, "Pre-training and
freezing"): ``norm="frozen_bn"`` makes every batch norm a ``FrozenBatchNorm2d``, and ``freeze_at``
freezes the bottom of the network, as detectron2's ``FREEZE_AT``: 0 nothing, 1 the stem (conv1,
bn1), 2 the stem and C2's stage (layer1), 3 also layer2, 4 also layer3, 5 the whole backbone.
A frozen part keeps its weights (``requires_grad`` False, so no optimizer step and no weight
decay), its batch norms are frozen whatever ``norm`` says, and ``backward`` stops above it.
"""
from __future__ import annotations

from .. import functional as F
from ..backend import DEFAULT_DTYPE, default_rng
from ..functional.checks import integer, is_int
from ..nn import BatchNorm2d, Conv2d, FrozenBatchNorm2d, MaxPool2d, Module, Sequential, init

NORMS = {"bn": BatchNorm2d, "frozen_bn": FrozenBatchNorm2d}  # ResNet's norm: live or frozen batch norm
FREEZE_AT = {0: "nothing", 1: "the stem (conv1, bn1)", 2: "the stem and C2's stage (layer1)",
             3: "the stem, layer1 and layer2", 4: "the stem and layer1..layer3",
             5: "the whole backbone"}  # what each freeze_at freezes, as detectron2's FREEZE_AT


class BasicBlock(Module):
    """Two 3x3 convs with batch norm, plus the shortcut: relu(bn2(conv2(relu(bn1(conv1(x))))) + s(x)).

    x: (N, in_channels, H, W) -> (N, out_channels, OH, OW), OH = ceil(H / stride).
    The shortcut s is the identity, or a 1x1 stride-2 projection with batch norm where the
    block downsamples or changes width (ResNet's option B).
    """

    def __init__(self, in_channels, out_channels, stride=1, dtype=DEFAULT_DTYPE, rng=None,
                 norm_layer=BatchNorm2d):
        super().__init__()
        self.conv1 = Conv2d(in_channels, out_channels, 3, stride, 1, bias=False, dtype=dtype, rng=rng)
        self.bn1 = norm_layer(out_channels, dtype=dtype)
        self.conv2 = Conv2d(out_channels, out_channels, 3, 1, 1, bias=False, dtype=dtype, rng=rng)
        self.bn2 = norm_layer(out_channels, dtype=dtype)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = Sequential(
                Conv2d(in_channels, out_channels, 1, stride, bias=False, dtype=dtype, rng=rng),
                norm_layer(out_channels, dtype=dtype))
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
        if d_main is None:  # conv1 skipped it: nothing trained lies below this block (freeze_at)
            return None
        return d_main + d_shortcut  # x fed both paths: their gradients add


class ResNet(Module):
    """Stem, then four stages of BasicBlocks; ``forward(x) -> [C2, C3, C4, C5]``.

    x: (N, in_channels, H, W). Stem: conv1 (stem_kernel, stride 2) + bn1 + ReLU + 3x3 stride-2
    max-pool, so C2 has stride 4; each later stage halves again (stride 8, 16, 32):
        C2: (N, widths[0], ceil(H/4), ceil(W/4)) ... C5: (N, widths[3], ceil(H/32), ...)
    (each ceil is applied stage by stage: H -> ceil(H/2) -> ceil(ceil(H/2)/2) ...).
    norm: "bn" (BatchNorm2d) or "frozen_bn" (FrozenBatchNorm2d) in every part that is not frozen;
    freeze_at: 0..5, the part frozen (``FREEZE_AT``; frozen parts always have frozen batch norm).
    """

    def __init__(self, widths=(16, 32, 64, 128), blocks=(1, 1, 1, 1), in_channels=3,
                 stem_kernel=7, dtype=DEFAULT_DTYPE, seed=0, norm="bn", freeze_at=0):
        super().__init__()
        rng = default_rng(seed)
        if len(widths) != 4 or len(blocks) != 4:
            raise ValueError(f"ResNet: widths and blocks need one entry per stage (4 each), got "
                             f"{len(widths)} widths and {len(blocks)} blocks")
        widths = tuple(integer(w, "each width", "ResNet", 1) for w in widths)
        blocks = tuple(integer(b, "each block count", "ResNet", 1) for b in blocks)
        in_channels = integer(in_channels, "in_channels", "ResNet", 1)
        stem_kernel = integer(stem_kernel, "stem_kernel", "ResNet", 1)
        self.norm, self.freeze_at = check_norm(norm, "ResNet"), check_freeze_at(freeze_at, "ResNet")
        self.widths, self.blocks, self.in_channels = widths, blocks, in_channels
        self.conv1 = Conv2d(in_channels, widths[0], stem_kernel, 2, stem_kernel // 2, bias=False,
                            dtype=dtype, rng=rng)
        self.bn1 = self._norm_layer(1)(widths[0], dtype=dtype)
        self.maxpool = MaxPool2d(3, 2, 1)
        channels = widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks)):
            stride = 1 if stage == 0 else 2
            norm_layer = self._norm_layer(stage + 2)
            layer = Sequential(*[BasicBlock(channels if i == 0 else width, width,
                                            stride if i == 0 else 1, dtype, rng, norm_layer)
                                 for i in range(count)])
            setattr(self, f"layer{stage + 1}", layer)
            channels = width
        for m in self.modules():  # torchvision's ResNet init: He-normal (fan_out) convs
            if isinstance(m, Conv2d):
                init.he_normal_(m.weight, rng)
        for part in self.frozen_parts():  # no gradient, no update, no weight decay
            for p in part.parameters():
                p.requires_grad = False
        if 1 <= self.freeze_at <= 4:  # the first trainable block's input is a constant to the loss
            first = self.stages[self.freeze_at - 1][0]
            first.conv1.needs_input_grad = False
            if first.downsample is not None:
                first.downsample[0].needs_input_grad = False
        self.out_channels = list(widths)
        self.stem_relu_cache = None  # set by forward, used by backward

    def _norm_layer(self, part: int):
        """The norm class of part 1 (the stem) or 2..5 (layer1..layer4, ending in C2..C5)."""
        return FrozenBatchNorm2d if part <= self.freeze_at else NORMS[self.norm]

    def frozen_parts(self) -> list:
        """The modules ``freeze_at`` freezes, bottom first: [conv1, bn1, layer1, ...]."""
        parts = [self.conv1, self.bn1, *self.stages]  # the stem counts as part 1, layer_k as k + 1
        return parts[:self.freeze_at + 1] if self.freeze_at else []

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
        gradient is the sum of the two. Returns dx: (N, in_channels, H, W); or None with
        ``freeze_at`` >= 1: the walk stops above the frozen part, where nothing is trained, so
        no gradient is computed there (nor reaches the image).
        """
        self._need_cache(self.stem_relu_cache)
        if len(grads) != 4:
            raise ValueError(f"ResNet.backward: expected 4 gradients [dC2, dC3, dC4, dC5], "
                             f"got {len(grads)}")
        trainable = 4 - max(self.freeze_at - 1, 0)  # layer4 down to the first trainable stage
        if trainable == 0:  # freeze_at 5: the whole backbone is frozen
            return None
        if all(g is None for g in grads[4 - trainable:]):
            raise ValueError("ResNet.backward: every gradient was None" + (
                f" (of the trainable stages' outputs, C{6 - trainable}..C5)" if self.freeze_at else ""))
        d = None
        for stage, d_feature in list(zip(reversed(self.stages), reversed(grads)))[:trainable]:
            if d_feature is not None:
                d = d_feature if d is None else d + d_feature
            if d is None:  # nothing reaches this stage or any above it
                continue
            d = stage.backward(d)
        if self.freeze_at >= 1 or d is None:  # frozen below here, or no gradient reached it
            return None
        d = self.maxpool.backward(d)
        return self.conv1.backward(self.bn1.backward(F.relu_backward(d, self.stem_relu_cache)))


RESNET_FIELDS = ("in_channels", "widths", "blocks", "stem_kernel")  # what fixes a ResNet's shape


def resnet_fields(config) -> dict:
    """The fields of a config (DetectorConfig, ClassifierConfig) that fix its ResNet's shape,
    {"in_channels", "widths", "blocks", "stem_kernel"}: what a pre-trained backbone must match."""
    return {name: getattr(config, name) for name in RESNET_FIELDS}


def check_norm(norm, where: str) -> str:
    """``norm`` if it is one of NORMS, else a ValueError naming the choices."""
    if norm not in NORMS:
        raise ValueError(f"{where}: norm must be one of {', '.join(map(repr, NORMS))}, got {norm!r}")
    return norm


def check_freeze_at(freeze_at, where: str) -> int:
    """``freeze_at`` as an int in 0..5 (FREEZE_AT), else a ValueError saying what each means."""
    if not is_int(freeze_at) or not 0 <= freeze_at <= 5:
        raise ValueError(f"{where}: freeze_at must be an int from 0 (nothing frozen) to 5 (the whole "
                         f"backbone), got {freeze_at!r}; 2 freezes the stem and C2's stage, as "
                         f"detectron2's default")
    return int(freeze_at)


def resnet18(in_channels=3, dtype=DEFAULT_DTYPE, seed=0) -> ResNet:
    """ResNet-18's bottom-up pathway: widths 64/128/256/512, [2, 2, 2, 2] blocks, 7x7 stem
    (torchvision.models.resnet18 without avgpool and fc)."""
    return ResNet((64, 128, 256, 512), (2, 2, 2, 2), in_channels, 7, dtype, seed)


def resnet_small(in_channels=3, dtype=DEFAULT_DTYPE, seed=0) -> ResNet:
    """A small ResNet that trains on a CPU: widths 16/32/64/128, one block per stage, 3x3 stem."""
    return ResNet((16, 32, 64, 128), (1, 1, 1, 1), in_channels, 3, dtype, seed)
