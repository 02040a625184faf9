"""Pre-training, our ImageNet: the bottom-up ResNet as a digit classifier.

The paper's backbone is "pre-trained on the ImageNet1k classification set" (Sec. 5.1) before it
is fine-tuned as the detector's bottom-up pathway. Here the same ResNet that ends in C2..C5 is
pre-trained to name single digits placed at random sizes and places on the scenes' canvas:

    images (N, 1, H, W) -> ResNet -> C5 (N, W5, H/32, W/32) -> global average pooling (N, W5)
                        -> fc, a Linear layer (N, 10) -> softmax cross-entropy with the digit

as torchvision's ResNet ends in ``avgpool`` and ``fc``. Only the backbone is kept afterwards
(``minifpn.weights.save_backbone`` ships it with ``fc`` beside it, as a torchvision checkpoint
carries its classifier); ``minifpn.pretrain`` runs the training and measures the accuracy.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .. import functional as F
from ..backend import DEFAULT_DTYPE, backend_name, default_rng, to_device, to_numpy
from ..functional.checks import integer
from ..nn import Linear, Module
from .inputs import check_images
from .resnet import ResNet, resnet_fields


@dataclass
class ClassifierConfig:
    """Everything that fixes the classifier's shape; saved with every pre-training checkpoint.
    The backbone fields are ``DetectorConfig``'s, so a detector can load what this trained."""

    in_channels: int = 1
    widths: tuple = (16, 32, 64, 128)
    blocks: tuple = (1, 1, 1, 1)
    stem_kernel: int = 3
    num_classes: int = 10
    seed: int = 0

    def __post_init__(self):
        for name in ("in_channels", "stem_kernel", "num_classes"):
            setattr(self, name, integer(getattr(self, name), name, "ClassifierConfig", 1))
        self.seed = integer(self.seed, "seed", "ClassifierConfig", 0)
        self.widths = tuple(integer(w, "each of widths", "ClassifierConfig", 1) for w in self.widths)
        self.blocks = tuple(integer(b, "each of blocks", "ClassifierConfig", 1) for b in self.blocks)

    def backbone_fields(self) -> dict:
        """What fixes the bottom-up ResNet's shape: in_channels, widths, blocks, stem_kernel."""
        return resnet_fields(self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ClassifierConfig:
        return cls(**d)


class DigitClassifier(Module):
    """ResNet + global average pooling of C5 + ``fc``: images (N, in_channels, H, W) -> logits
    (N, num_classes). ``loss(images, boxes, labels)`` then ``backward()`` trains it, with the
    interface ``minifpn.train.train`` drives (each scene holds one digit; its box is not used);
    ``predict(images)`` gives the digit of each image."""

    kind = "classifier"  # the name minifpn.train.MODELS and checkpoints know this class by

    def __init__(self, config: ClassifierConfig | None = None, dtype=DEFAULT_DTYPE, **overrides):
        super().__init__()
        self.config = c = config or ClassifierConfig(**overrides)
        self.backbone = ResNet(c.widths, c.blocks, c.in_channels, c.stem_kernel, dtype, c.seed)
        self.fc = Linear(c.widths[3], c.num_classes, dtype=dtype, rng=default_rng(c.seed + 1))
        self.pool_cache = self._loss_cache = None  # set by logits and loss, used by backward

    def logits(self, images):
        """images (N, in_channels, H, W), sides multiples of 32 -> logits (N, num_classes)."""
        check_images(images, self.config.in_channels, values=False, who="DigitClassifier")
        c5 = self.backbone(images)[3]  # (N, W5, H / 32, W / 32)
        pooled, self.pool_cache = F.global_avg_pool2d(c5)  # (N, W5)
        return self.fc(pooled)

    def loss(self, images, boxes, labels, rng=None):
        """Mean softmax cross-entropy of the digit over the N images; each of ``labels`` holds
        exactly one digit (``boxes`` is accepted and not used: train() hands over scenes).
        Returns (loss, {"cls": loss}) as host floats."""
        N = images.shape[0] if getattr(images, "ndim", 0) == 4 else 0
        targets = [to_numpy(lab).reshape(-1) for lab in labels]
        if N == 0 or len(targets) != N or any(len(t) != 1 for t in targets):
            raise ValueError(f"DigitClassifier.loss: expected one label per image for each of the "
                             f"{N} images, got {[len(t) for t in targets]} labels")
        targets = np.concatenate(targets)
        if targets.dtype.kind not in "iu":  # as Detector.loss: 2.7 must not quietly become digit 2
            raise ValueError(f"DigitClassifier.loss: labels must be integers (digits), got dtype "
                             f"{targets.dtype} {targets.tolist()}; float labels are refused even when "
                             f"whole (1.0): use an int array")
        targets = targets.astype(np.int64)
        if targets.min() < 0 or targets.max() >= self.config.num_classes:
            raise ValueError(f"DigitClassifier.loss: labels must be in [0, {self.config.num_classes}), "
                             f"got {targets.tolist()}")
        logits = self.logits(images)
        loss, self._loss_cache = F.softmax_cross_entropy(
            logits, to_device(targets, backend_name(logits)), normalizer=N)
        value = float(loss)  # the step's one device read
        return value, {"cls": value}

    def backward(self):
        """Backpropagate the last ``loss`` into every parameter's ``.grad``: through fc, the
        pooling (each of C5's H5 * W5 cells gets 1 / (H5 * W5) of its channel's gradient) and
        the ResNet. Returns d images, or None where the backbone is frozen (``ResNet.backward``)."""
        d_logits = F.softmax_cross_entropy_backward(1.0, self._need_cache(self._loss_cache, "loss"))
        d_pooled = self.fc.backward(d_logits)
        d_c5 = F.global_avg_pool2d_backward(d_pooled, self.pool_cache)
        return self.backbone.backward([None, None, None, d_c5])

    def predict(self, images):
        """The most probable digit of each image: (N,) int64 on the host (eval mode)."""
        self._loss_cache = None  # predict overwrites the layers' caches: no backward of an old loss
        with self.evaluating():
            logits = self.logits(images)
        return to_numpy(logits.argmax(axis=1)).astype(np.int64)
