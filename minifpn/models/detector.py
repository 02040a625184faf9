"""The detector: bottom-up ResNet, FPN (or one backbone map), and a head shared across levels.

``setting`` switches between the rows (a)-(f) of the paper's Table 1, named and described in
``minifpn.models.settings.SETTINGS`` (an RPN ablation there; here a 10-digit detector, so K = 10, and
K = 1 gives the paper's RPN exactly).
Images must have sides that are multiples of 32 (the stride of C5): use ``pad_images``.
"""
from __future__ import annotations

import numpy as np

from .. import functional as F
from ..backend import DEFAULT_DTYPE, backend_name, default_rng, get_array_module, to_device, to_numpy
from ..detection.anchors import grid_anchors
from ..detection.postprocess import postprocess_image
from ..detection.targets import batch_targets
from ..nn import Module
from .config import DetectorConfig
from .fpn import FPN
from .head import DetectionHead
from .inputs import TOP_STRIDE, check_images, check_targets, pad_images
from .resnet import ResNet


class Detector(Module):
    """Backbone + (FPN) + shared head. ``loss(images, boxes, labels)`` then ``backward()``
    trains it; ``predict(images)`` returns boxes, scores and labels per image.
    ``head_maps``: (name, stride, anchor sizes) of each map the head runs on, finest first
    (``FPN.levels`` are the pyramid's level numbers k = 2..5)."""

    kind = "one_stage"  # the name minifpn.train.MODELS and checkpoints know this class by

    def __init__(self, config: DetectorConfig | None = None, dtype=DEFAULT_DTYPE, **overrides):
        super().__init__()
        self.config = c = config or DetectorConfig(**overrides)
        self.backbone = ResNet(c.widths, c.blocks, c.in_channels, c.stem_kernel, dtype, c.seed,
                               c.norm, c.freeze_at)
        if c.pretrained:  # the shipped digit classifier's backbone (its fc layer is not used)
            from ..weights import load_backbone
            self.backbone.load_state_dict(load_backbone(c.backbone_fields(), c.seed))
        all_sizes = list(c.anchor_sizes)
        if c.setting in ("c4", "c5"):
            level = 4 if c.setting == "c4" else 5
            self.head_maps = [(f"C{level}", 2 ** level, all_sizes)]
            head_in = c.widths[level - 2]
        else:
            extra = None if c.setting == "p2_only" else "maxpool"
            self.fpn = FPN(list(c.widths), c.channels, extra_block=extra, variant=c.setting,
                           dtype=dtype, seed=c.seed + 1)
            for k in self.fpn.levels[:max(c.freeze_at - 1, 0)]:  # C_k of a frozen stage: a constant
                self.fpn.inner_blocks[k - 2].needs_input_grad = False
            if c.setting == "p2_only":
                self.head_maps = [("P2", 4, all_sizes)]
            else:
                self.head_maps = [(name, stride, [size]) for name, stride, size in
                               zip(self.fpn.output_names, self.fpn.strides, all_sizes)]
            head_in = c.channels
        self.num_anchors = len(self.head_maps[0][2]) * len(c.aspect_ratios)
        self.head = DetectionHead(head_in, c.channels, self.num_anchors, c.num_classes, dtype,
                                  c.seed + 2)
        self._anchor_cache = {}
        self._loss_cache = None  # set by loss, used by backward

    # ---- features: the part of the network that differs between settings --------------
    def features(self, images, deferred: list | None = None):
        """images (N, in_channels, H, W) -> the maps the head runs on, finest first.

        The images must be finite, and so must C2..C5 (the FPN checks them); each check reads
        one flag from the device. Given a list as ``deferred``, the checks append
        (flag, raise the check's error) to it instead, and ``loss`` reads the flags together
        with the loss: one device read per step, not three.
        """
        c = self.config
        check_images(images, c.in_channels, values=deferred is None)  # shape, sides, NaN or inf
        if deferred is not None:
            xp = get_array_module(images)
            deferred.append((xp.isfinite(images).all(), lambda: check_images(images, c.in_channels)))
        return self.maps_from_backbone(self.backbone(images), deferred)

    def maps_from_backbone(self, c2_to_c5, deferred: list | None = None):
        """The bottom-up pathway's [C2, C3, C4, C5] -> the maps the head runs on: one of them
        (settings "c4", "c5") or the FPN's [P2, ..., P6]. ``deferred`` as in ``features``."""
        setting = self.config.setting
        if setting == "c4":
            return [c2_to_c5[2]]
        if setting == "c5":
            return [c2_to_c5[3]]
        if deferred is not None:
            deferred.append((self.fpn.inputs_finite(c2_to_c5),
                             lambda: self.fpn.raise_not_finite(c2_to_c5)))
        return self.fpn(c2_to_c5, check_finite=deferred is None)

    def features_backward(self, d_maps):
        """Gradients of the head's input maps -> gradient of the images (None where the
        backbone's ``freeze_at`` stops the backward above the images: ``ResNet.backward``)."""
        if self.config.setting == "c4":
            return self.backbone.backward([None, None, d_maps[0], None])
        if self.config.setting == "c5":
            return self.backbone.backward([None, None, None, d_maps[0]])
        return self.backbone.backward(self.fpn.backward(d_maps))

    def anchors(self, map_sizes) -> list[np.ndarray]:
        """Host anchors per level, (H_l * W_l * A, 4) each, for maps of ``map_sizes``."""
        key = tuple(map_sizes)
        if key not in self._anchor_cache:
            self._anchor_cache[key] = [
                grid_anchors(h, w, stride, sizes, self.config.aspect_ratios)
                for (h, w), (_, stride, sizes) in zip(map_sizes, self.head_maps)]
        return self._anchor_cache[key]

    def _head_outputs(self, images, deferred: list | None = None):
        """Run everything up to the head; flatten its outputs to one row per anchor.
        Returns logits (N, T, K+1), deltas (N, T, 4), per-level anchors, per-level sizes."""
        maps = self.features(images, deferred)
        logits_l, deltas_l = self.head(maps)
        sizes = [m.shape[2:] for m in maps]
        xp = get_array_module(images)
        K1 = self.config.num_classes + 1
        logits = xp.concatenate([_flatten(x, K1) for x in logits_l], axis=1)
        deltas = xp.concatenate([_flatten(x, 4) for x in deltas_l], axis=1)
        return logits, deltas, self.anchors(sizes), sizes

    # ---- training -------------------------------------------------------------------------
    def loss(self, images, boxes, labels, rng=None):
        """Loss on a batch: images (N, C, H, W); boxes: list of (K_n, 4) (x1, y1, x2, y2);
        labels: list of (K_n,) ints in [0, num_classes). Returns (loss, parts) as host floats.

        Anchors are labelled (IoU >= config.positive_iou or the best anchor of a box: object;
        < config.negative_iou: background), config.anchors_per_image are sampled per image with
        at most config.positive_fraction positive, and
            loss = sum CE(sampled) / n + sum SmoothL1(positive deltas) / n,
        n = the number of sampled anchors (or of positives, with normalize_by="positives").
        """
        check_images(images, self.config.in_channels, values=False)  # the shape, to unpack it
        if images.shape[0] == 0:
            raise ValueError("Detector.loss: the batch is empty (N = 0 images); a loss needs at "
                             "least one image")
        c, rng = self.config, default_rng() if rng is None else rng
        N, _, H, W = images.shape
        # targets may arrive on the device; the anchor bookkeeping is host code
        boxes, labels = [to_numpy(b) for b in boxes], [to_numpy(lab) for lab in labels]
        if c.num_classes == 1:  # the paper's RPN: every digit is just "an object"
            labels = [np.zeros(len(b.reshape(-1, 4)), np.int64) for b in boxes]
        check_targets(boxes, labels, N, H, W, c.num_classes)
        deferred = []  # the input checks' flags, read below with the loss
        logits, deltas, anchors_l, sizes = self._head_outputs(images, deferred)
        targets = batch_targets(np.concatenate(anchors_l), boxes, labels, rng, c.positive_iou,
                                c.negative_iou, c.anchors_per_image, c.positive_fraction)
        backend = backend_name(images)
        cls_index, cls_target, box_index = (to_device(a, backend) for a in (
            targets.cls_index, targets.cls_target, targets.box_index))
        box_target = to_device(targets.box_target.astype(images.dtype), backend)
        counted = targets.box_index if c.normalize_by == "positives" else targets.cls_index
        normalizer = max(len(counted), 1)
        loss_cls, cls_cache = F.softmax_cross_entropy(
            logits.reshape(-1, c.num_classes + 1)[cls_index], cls_target, normalizer)
        loss_box, box_cache = F.smooth_l1(deltas.reshape(-1, 4)[box_index], box_target,
                                          normalizer=normalizer)
        self._loss_cache = (logits.shape, deltas.shape, cls_index, box_index, cls_cache,
                            box_cache, sizes)
        flags = [flag.astype(loss_cls.dtype) for flag, _ in deferred]
        host = to_numpy(get_array_module(logits).stack([loss_cls, loss_box, *flags]))  # one read
        for ok, (_, fail) in zip(host[2:], deferred):
            if not ok:
                fail()  # raises that check's own error, naming what is not finite
        parts = {"cls": float(host[0]), "box": float(host[1])}
        return parts["cls"] + parts["box"], parts

    def backward(self):
        """Backpropagate the last ``loss`` into every parameter's ``.grad``; returns d images."""
        return self.features_backward(self.head_backward())

    def head_backward(self):
        """The last ``loss``'s gradient through the head only: returns the gradients of the maps
        the head ran on, [dP2, ..., dP6] (each (N, d, H_k, W_k)), and adds the head's parameter
        gradients. A second stage that reads the same maps adds its own before
        ``features_backward`` (``TwoStageDetector``)."""
        logits_shape, deltas_shape, cls_index, box_index, cls_cache, box_cache, sizes = \
            self._need_cache(self._loss_cache, "loss")
        xp = get_array_module(cls_index)
        dtype = self.head.conv.weight.data.dtype
        d_logits = xp.zeros((logits_shape[0] * logits_shape[1], logits_shape[2]), dtype=dtype)
        d_logits[cls_index] = F.softmax_cross_entropy_backward(1.0, cls_cache)  # unique rows
        d_deltas = xp.zeros((deltas_shape[0] * deltas_shape[1], 4), dtype=dtype)
        d_deltas[box_index] = F.smooth_l1_backward(1.0, box_cache)
        d_logits = d_logits.reshape(logits_shape)
        d_deltas = d_deltas.reshape(deltas_shape)
        d_logits_l, d_deltas_l = [], []
        start = 0
        for (h, w) in sizes:  # undo the flattening, level by level
            end = start + h * w * self.num_anchors
            d_logits_l.append(_unflatten(d_logits[:, start:end], h, w))
            d_deltas_l.append(_unflatten(d_deltas[:, start:end], h, w))
            start = end
        return self.head.backward(d_logits_l, d_deltas_l)

    # ---- inference --------------------------------------------------------------------------
    def predict(self, images, score_threshold: float = 0.05, nms_iou: float = 0.5,
                top_k: int = 1000, max_detections: int = 100):
        """Detections per image: a list of dicts with boxes (D, 4) float32, scores (D,),
        labels (D,) int64 (digits 0..9). Per level, the top_k (anchor, class) pairs above
        score_threshold are decoded and clipped; then NMS per class and the best
        max_detections. The score of class k is softmax p(k); with K = 1 this is the RPN's
        objectness, 1 - p(background). An empty batch (N = 0) gives an empty list."""
        check_images(images, self.config.in_channels, values=False)
        self._loss_cache = None  # predict overwrites the layers' caches: no backward of an old loss
        if images.shape[0] == 0:
            return []
        with self.evaluating():
            logits, deltas, anchors_l, _ = self._head_outputs(images)
        probs = F.softmax(logits, axis=2)  # over the K + 1 classes
        probs, deltas = to_numpy(probs), to_numpy(deltas)
        return [postprocess_image(probs[n, :, 1:], deltas[n], anchors_l, images.shape[2:],
                                  score_threshold, nms_iou, top_k, max_detections)
                for n in range(images.shape[0])]  # background (class 0) dropped


def _flatten(x, per_anchor: int):
    """(N, A * per_anchor, H, W) -> (N, H * W * A, per_anchor), rows in (y, x, anchor) order."""
    N, _, H, W = x.shape
    return x.transpose(0, 2, 3, 1).reshape(N, -1, per_anchor)


def _unflatten(d, H: int, W: int):
    """The inverse of ``_flatten`` for gradients: (N, H * W * A, per_anchor) -> (N, A * per_anchor, H, W)."""
    xp = get_array_module(d)
    N = d.shape[0]
    return xp.ascontiguousarray(d.reshape(N, H, W, -1).transpose(0, 3, 1, 2))


__all__ = ["Detector", "DetectorConfig", "TOP_STRIDE", "pad_images"]
