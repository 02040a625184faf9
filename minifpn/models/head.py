"""A detection head shared by every pyramid level (paper, Sec. 4.1: "a 3x3 conv and two sibling
1x1 convs for classification and regression ... the parameters of the heads are shared across
all feature pyramid levels").

Because one set of weights serves every level, the head keeps one cache per level, and its
``backward`` adds each level's weight gradient into the same ``.grad``: visibly, below.
"""
from __future__ import annotations

from .. import functional as F
from ..backend import DEFAULT_DTYPE, default_rng
from ..functional._checks import integer
from ..nn import Conv2d, Module, init


class DetectionHead(Module):
    """For each level x: (N, in_channels, H, W):
        h      = relu(conv3x3(x))                (N, channels, H, W)
        logits = cls_logits(h)   1x1             (N, A * (K + 1), H, W)
        deltas = bbox_pred(h)    1x1             (N, A * 4, H, W)
    A anchors per location, K classes plus background (K = 1 is the paper's RPN).
    """

    def __init__(self, in_channels, channels, num_anchors, num_classes, dtype=DEFAULT_DTYPE, seed=0):
        super().__init__()
        rng = default_rng(seed)
        num_anchors = integer(num_anchors, "num_anchors", "DetectionHead", 1)
        num_classes = integer(num_classes, "num_classes", "DetectionHead", 1)
        self.num_anchors, self.num_classes = num_anchors, num_classes
        self.conv = Conv2d(in_channels, channels, 3, padding=1, dtype=dtype, rng=rng)
        self.cls_logits = Conv2d(channels, num_anchors * (num_classes + 1), 1, dtype=dtype, rng=rng)
        self.bbox_pred = Conv2d(channels, num_anchors * 4, 1, dtype=dtype, rng=rng)
        for conv in (self.conv, self.cls_logits, self.bbox_pred):  # torchvision's RPNHead init
            init.normal_(conv.weight, 0.01, rng)
        self.caches = None  # one per level, set by forward, used by backward

    def _params(self, conv):
        return conv.weight.data, conv.bias.data

    def forward(self, features):
        """features: list of (N, in_channels, H_l, W_l) -> (list of logits, list of deltas)."""
        self.caches = []
        all_logits, all_deltas = [], []
        for x in features:
            h, conv_cache = F.conv2d(x, *self._params(self.conv), 1, 1)
            h, relu_cache = F.relu(h)
            logits, cls_cache = F.conv2d(h, *self._params(self.cls_logits))
            deltas, box_cache = F.conv2d(h, *self._params(self.bbox_pred))
            self.caches.append((conv_cache, relu_cache, cls_cache, box_cache))
            all_logits.append(logits)
            all_deltas.append(deltas)
        return all_logits, all_deltas

    def backward(self, d_logits, d_deltas):
        """Per-level gradients of logits and deltas -> per-level gradients of the features.

        d_logits, d_deltas: lists shaped as forward's two outputs (forward returns two lists, so
        backward takes two); returns a list of (N, in_channels, H_l, W_l)."""
        caches = self._need_cache(self.caches)
        d_features = []
        for d_l, d_d, (conv_cache, relu_cache, cls_cache, box_cache) in zip(
                d_logits, d_deltas, caches):
            dh_cls, dw, db = F.conv2d_backward(d_l, cls_cache)
            self.cls_logits.weight.grad += dw  # shared weights: every level adds its share
            self.cls_logits.bias.grad += db
            dh_box, dw, db = F.conv2d_backward(d_d, box_cache)
            self.bbox_pred.weight.grad += dw
            self.bbox_pred.bias.grad += db
            dh = F.relu_backward(dh_cls + dh_box, relu_cache)  # h fed both 1x1 convs
            dx, dw, db = F.conv2d_backward(dh, conv_cache)
            self.conv.weight.grad += dw
            self.conv.bias.grad += db
            d_features.append(dx)
        return d_features
