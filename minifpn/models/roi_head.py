"""The Fast R-CNN head on pooled RoI features, and its loss (paper, Sec. 4.2: "we ... attach two
hidden 1,024-d fully-connected (fc) layers (each followed by ReLU) before the final
classification and bounding box regression layers").

Glossary: R RoIs, C channels of the pooled features (d), OH = OW = pool_size (7), HID = hidden,
K classes plus background (class 0), P the sampled positives.
"""
from __future__ import annotations

import numpy as np

from .. import functional as F
from ..backend import DEFAULT_DTYPE, backend_name, default_rng, get_array_module, to_device, to_numpy
from ..functional.checks import check_nchw, integer
from ..nn import Linear, Module, init


class FastRCNNHead(Module):
    """The "2fc MLP head" and the Fast R-CNN predictor, for RoI features x: (R, C, OH, OW):
        h6        = relu(fc6(flatten(x)))   (R, HID)      flatten: (R, C * OH * OW)
        h7        = relu(fc7(h6))           (R, HID)
        cls_score = cls_score(h7)           (R, K + 1)    logits, class 0 = background
        bbox_pred = bbox_pred(h7)           (R, 4 * (K + 1)) deltas (dx, dy, dw, dh) of every class
    Box regression is class-specific: row r's deltas for class k are bbox_pred[r, 4k:4k+4].

    hidden = 256 by default: the paper's 1024-d layers read 256 * 7 * 7 = 12,544 numbers; ours
    read d * 7 * 7 = 64 * 49 = 3,136, and 256 keeps the paper's ratio of 12.25 inputs per hidden
    unit (fc6 then holds 0.8 M weights). Names and shapes follow torchvision's TwoMLPHead
    (fc6, fc7) and FastRCNNPredictor (cls_score, bbox_pred), so their weights load by name.
    Init: fc6 and fc7 as ``nn.Linear`` (PyTorch's default); cls_score N(0, 0.01^2) and
    bbox_pred N(0, 0.001^2) with zero biases, as Detectron's Fast R-CNN outputs, so an untrained
    head gives every class nearly the same score and leaves every RoI's box where it is.
    """

    def __init__(self, in_channels=64, pool_size=7, hidden=256, num_classes=10, dtype=DEFAULT_DTYPE,
                 seed=0):
        super().__init__()
        rng = default_rng(seed)
        self.in_channels = integer(in_channels, "in_channels", "FastRCNNHead", 1)
        self.pool_size = integer(pool_size, "pool_size", "FastRCNNHead", 1)
        self.hidden = integer(hidden, "hidden", "FastRCNNHead", 1)
        self.num_classes = integer(num_classes, "num_classes", "FastRCNNHead", 1)
        K1 = self.num_classes + 1
        self.fc6 = Linear(self.in_channels * self.pool_size ** 2, self.hidden, dtype=dtype, rng=rng)
        self.fc7 = Linear(self.hidden, self.hidden, dtype=dtype, rng=rng)
        self.cls_score = Linear(self.hidden, K1, dtype=dtype, rng=rng)
        self.bbox_pred = Linear(self.hidden, 4 * K1, dtype=dtype, rng=rng)
        init.normal_(self.cls_score.weight, 0.01, rng)
        init.normal_(self.bbox_pred.weight, 0.001, rng)
        self.cls_score.bias.data[...] = 0
        self.bbox_pred.bias.data[...] = 0
        self.cache = None  # (features shape, relu6 cache, relu7 cache), set by forward

    def _check_features(self, features):
        check_nchw(features, "FastRCNNHead", "features")
        C, S = self.in_channels, self.pool_size
        if tuple(features.shape[1:]) != (C, S, S):
            raise ValueError(f"FastRCNNHead: expected features of shape (R, {C}, {S}, {S}) "
                             f"(R, in_channels, pool_size, pool_size), got {tuple(features.shape)}")

    def forward(self, features):
        """features: (R, C, OH, OW) pooled RoIs -> (cls_score (R, K + 1), bbox_pred (R, 4 * (K + 1)))."""
        self._check_features(features)
        R = features.shape[0]
        x = features.reshape(R, self.in_channels * self.pool_size ** 2)  # not (R, -1): R may be 0
        h6, relu6 = F.relu(self.fc6(x))
        h7, relu7 = F.relu(self.fc7(h6))
        self.cache = (features.shape, relu6, relu7)
        return self.cls_score(h7), self.bbox_pred(h7)

    def backward(self, grads):
        """grads: (d_cls, d_box), the gradients of forward's two outputs, (R, K + 1) and
        (R, 4 * (K + 1)) -> d features (R, C, OH, OW); every parameter's gradient is added to its
        ``.grad``."""
        features_shape, relu6, relu7 = self._need_cache(self.cache)
        d_cls, d_box = grads
        dh7 = self.cls_score.backward(d_cls) + self.bbox_pred.backward(d_box)  # h7 fed both
        dh6 = self.fc7.backward(F.relu_backward(dh7, relu7))
        dx = self.fc6.backward(F.relu_backward(dh6, relu6))
        return dx.reshape(features_shape)

    def extra_repr(self):
        return (f"in_channels={self.in_channels}, pool_size={self.pool_size}, hidden={self.hidden}, "
                f"num_classes={self.num_classes}")


def _check_loss_args(cls_score, bbox_pred, labels, regression_targets):
    if getattr(cls_score, "ndim", None) != 2:
        raise ValueError(f"fast_rcnn_loss: expected cls_score of shape (R, K + 1), got "
                         f"{getattr(cls_score, 'shape', None)}")
    R, K1 = cls_score.shape
    if tuple(bbox_pred.shape) != (R, 4 * K1):
        raise ValueError(f"fast_rcnn_loss: expected bbox_pred of shape (R, 4 * (K + 1)) = "
                         f"({R}, {4 * K1}) for cls_score {tuple(cls_score.shape)}, got "
                         f"{tuple(bbox_pred.shape)}")
    if tuple(labels.shape) != (R,) or tuple(regression_targets.shape) != (R, 4):
        raise ValueError(f"fast_rcnn_loss: expected labels (R,) = ({R},) and regression_targets "
                         f"(R, 4) = ({R}, 4), got {tuple(labels.shape)} and "
                         f"{tuple(regression_targets.shape)}")
    if labels.dtype.kind not in "iu" or (R and not 0 <= labels.min() <= labels.max() < K1):
        raise ValueError(f"fast_rcnn_loss: labels must be integers in [0, K + 1) = [0, {K1}) "
                         f"(0 = background), got dtype {labels.dtype}"
                         + (f", range [{labels.min()}, {labels.max()}]" if R else ""))


def fast_rcnn_loss(cls_score, bbox_pred, labels, regression_targets, beta: float = 1.0 / 9):
    """The Fast R-CNN loss of R sampled RoIs, as torchvision's ``roi_heads.fastrcnn_loss``:
        loss_cls = sum_r CE(cls_score_r, labels_r) / R
        loss_box = sum_{r positive} SmoothL1_beta(bbox_pred_r[4 labels_r : 4 labels_r + 4]
                                                  - regression_targets_r) / R
    Only the true class's 4 deltas of each positive (labels_r > 0) are trained; both parts are
    divided by R, the sampled RoIs (not the positives). beta = 1/9, torchvision's.

    cls_score (R, K + 1), bbox_pred (R, 4 * (K + 1)) on any backend; labels (R,) ints and
    regression_targets (R, 4) from ``sample_rois`` (host arrays; moved to cls_score's backend
    and dtype here). Returns ((loss_cls, loss_box), cache): two 0-d arrays on cls_score's
    backend, and the cache for ``fast_rcnn_loss_backward``. R = 0 gives zero losses.
    """
    labels = to_numpy(labels)  # host: the positive rows are bookkeeping
    _check_loss_args(cls_score, bbox_pred, labels, regression_targets)
    R, K1 = cls_score.shape
    backend = backend_name(cls_score)
    positives = np.flatnonzero(labels > 0)
    pos_rows = to_device(positives, backend)
    pos_classes = to_device(labels[positives].astype(np.int64), backend)
    normalizer = max(R, 1)  # torchvision divides by labels.numel(); an empty batch gives 0
    loss_cls, cls_cache = F.softmax_cross_entropy(
        cls_score, to_device(labels.astype(np.int64), backend), normalizer)
    pred = bbox_pred.reshape(R, K1, 4)[pos_rows, pos_classes]  # (P, 4): the true class's deltas
    target = to_device(regression_targets, backend)[pos_rows].astype(cls_score.dtype)
    loss_box, box_cache = F.smooth_l1(pred, target, beta, normalizer)
    return (loss_cls, loss_box), (cls_score.shape, pos_rows, pos_classes, cls_cache, box_cache)


def fast_rcnn_loss_backward(cache, dloss=1.0):
    """Gradients of loss_cls + loss_box (times ``dloss``) with respect to cls_score (R, K + 1)
    and bbox_pred (R, 4 * (K + 1)): returns (d_cls, d_box). d_box is zero outside each
    positive's true-class deltas."""
    (R, K1), pos_rows, pos_classes, cls_cache, box_cache = cache
    d_cls = F.softmax_cross_entropy_backward(dloss, cls_cache)
    xp = get_array_module(d_cls)
    d_box = xp.zeros((R, K1, 4), dtype=d_cls.dtype)
    d_box[pos_rows, pos_classes] = F.smooth_l1_backward(dloss, box_cache)  # one class per row
    return d_cls, d_box.reshape(R, 4 * K1)
