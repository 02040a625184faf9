"""A detection head shared by every pyramid level (paper, Sec. 4.1: "a 3x3 conv and two sibling
1x1 convs for classification and regression ... the parameters of the heads are shared across
all feature pyramid levels").

Because one set of weights serves every level, the head keeps one cache per level, and its
``backward`` adds each level's weight gradient into the same ``.grad``: visibly, below.
"""
from __future__ import annotations

from .. import functional as F
from ..backend import DEFAULT_DTYPE, default_rng, get_array_module
from ..functional.checks import integer
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

    def backward(self, grads):
        """Per-level gradients of logits and deltas -> per-level gradients of the features.

        grads: (d_logits, d_deltas), two lists shaped as forward's two outputs (the gradient of
        what forward returned, in its structure); returns a list of (N, in_channels, H_l, W_l)."""
        caches = self._need_cache(self.caches)
        d_logits, d_deltas = grads
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


# ---- the head's outputs as one row per anchor, and back -------------------------------------

def flatten_outputs(logits_l, deltas_l, per_class: int):
    """Per-map outputs -> one row per anchor over all maps: logits (N, T, K + 1), deltas (N, T, 4);
    per map (N, A * (K + 1), H, W) and (N, A * 4, H, W), rows in (map, y, x, anchor) order."""
    xp = get_array_module(logits_l[0])
    return (xp.concatenate([_flatten(x, per_class) for x in logits_l], axis=1),
            xp.concatenate([_flatten(x, 4) for x in deltas_l], axis=1))


def unflatten_outputs(d_logits, d_deltas, sizes, num_anchors: int):
    """The inverse, for gradients: (N, T, K + 1) and (N, T, 4) -> (per-map d logits, per-map
    d deltas), maps of ``sizes`` [(H_l, W_l)], ``num_anchors`` per cell: what ``backward`` takes."""
    d_logits_l, d_deltas_l, start = [], [], 0
    for (h, w) in sizes:  # undo the flattening, map by map
        end = start + h * w * num_anchors
        d_logits_l.append(_unflatten(d_logits[:, start:end], h, w))
        d_deltas_l.append(_unflatten(d_deltas[:, start:end], h, w))
        start = end
    return d_logits_l, d_deltas_l


def _flatten(x, per_anchor: int):
    """(N, A * per_anchor, H, W) -> (N, H * W * A, per_anchor), rows in (y, x, anchor) order."""
    N, _, H, W = x.shape
    return x.transpose(0, 2, 3, 1).reshape(N, -1, per_anchor)


def _unflatten(d, H: int, W: int):
    """The inverse of ``_flatten`` for gradients: (N, H * W * A, per_anchor) -> (N, A * per_anchor, H, W)."""
    xp = get_array_module(d)
    N = d.shape[0]
    return xp.ascontiguousarray(d.reshape(N, H, W, -1).transpose(0, 3, 1, 2))
