"""The detector: bottom-up ResNet, a neck (the FPN, or one backbone map), and a head shared
across the neck's maps.

``setting`` picks a row (a)-(f) of the paper's Table 1 (``minifpn.models.settings``; the neck
is built once from it, ``minifpn.models.neck.build_neck``): an RPN ablation there; here a
10-digit detector, so K = 10, and K = 1 gives the paper's RPN exactly.
``forward(images)`` runs the network once and returns a ``DetectorOutput``, which ``loss_of``,
``proposals`` and ``predict`` read. Image sides must be multiples of 32 (C5's stride): use
``pad_images``.
"""
from __future__ import annotations

import numpy as np

from .. import functional as F
from ..backend import DEFAULT_DTYPE, backend_name, default_rng, get_array_module, to_device, to_numpy
from ..detection.anchors import grid_anchors
from ..detection.postprocess import postprocess_image, rpn_proposals
from ..detection.targets import batch_targets
from ..nn import Module
from .config import DetectorConfig
from .fpn import FPN
from .head import DetectionHead, flatten_outputs, unflatten_outputs
from .inputs import TOP_STRIDE, check_batch, check_images, pad_images
from .neck import build_neck
from .record import DetectorOutput, LossCache
from .resnet import ResNet


class Detector(Module):
    """Backbone + neck + shared head. ``loss(images, boxes, labels)`` then ``backward()`` trains
    it; ``predict(images)`` returns boxes, scores and labels per image. ``head_maps``: (name,
    stride, anchor sizes) of each map the head runs on, finest first. The neck is ``fpn`` (an
    ``FPN``: its state-dict keys are torchvision's) or ``single_map``; ``neck`` is either."""

    kind = "one_stage"  # the name minifpn.train.MODELS and checkpoints know this class by

    def __init__(self, config: DetectorConfig | None = None, dtype=DEFAULT_DTYPE, **overrides):
        super().__init__()
        self.config = c = config or DetectorConfig(**overrides)
        self.backbone = ResNet(c.widths, c.blocks, c.in_channels, c.stem_kernel, dtype, c.seed,
                               c.norm, c.freeze_at)
        if c.pretrained:  # the shipped digit classifier's backbone (its fc layer is not used)
            from ..weights import load_backbone
            self.backbone.load_state_dict(load_backbone(c.backbone_fields(), c.seed))
        neck = build_neck(c, dtype)
        setattr(self, "fpn" if isinstance(neck, FPN) else "single_map", neck)
        sizes = list(c.anchor_sizes)  # one per map of a pyramid (DetectorConfig checks it), else all
        per_map = [[s] for s in sizes] if len(neck.output_names) > 1 else [sizes]
        self.head_maps = list(zip(neck.output_names, neck.strides, per_map))
        self.num_anchors = len(per_map[0]) * len(c.aspect_ratios)
        self.head = DetectionHead(neck.out_channels, c.channels, self.num_anchors, c.num_classes, dtype,
                                  c.seed + 2)
        self._anchor_cache = {}
        self._loss_cache = None  # set by loss_of, used by head_backward

    @property
    def neck(self) -> Module:
        return self.fpn if hasattr(self, "fpn") else self.single_map

    # ---- the forward pass, and the maps alone -----------------------------------------------
    def forward(self, images) -> DetectorOutput:
        """images (N, in_channels, H, W) -> a ``DetectorOutput``. The images' and C2..C5's finite
        checks are device flags in it, read with the loss (one device read per step)."""
        c = self.config
        check_images(images, c.in_channels, values=False)  # shape and sides; values: the checks
        xp = get_array_module(images)
        checks = [(xp.isfinite(images).all(), lambda: check_images(images, c.in_channels))]
        bottom_up = self.backbone(images)
        checks += [check for check in [self.neck.finite_check(bottom_up)] if check is not None]
        maps = self.neck(bottom_up, check_finite=False)
        logits_l, deltas_l = self.head(maps)
        sizes = [m.shape[2:] for m in maps]
        logits, deltas = flatten_outputs(logits_l, deltas_l, c.num_classes + 1)
        return DetectorOutput(bottom_up, maps, logits, deltas, self.anchors(sizes), sizes,
                              tuple(images.shape[2:]), checks)

    def features(self, images):
        """images (N, in_channels, H, W) -> the maps the head runs on, finest first (the images
        and C2..C5 checked for NaN and infinity): for looking at the maps."""
        check_images(images, self.config.in_channels)
        return self.neck(self.backbone(images))

    def anchors(self, map_sizes) -> list[np.ndarray]:
        """Host anchors per map, (H_l * W_l * A, 4) each, for maps of ``map_sizes``."""
        key = tuple(map_sizes)
        if key not in self._anchor_cache:
            self._anchor_cache[key] = [
                grid_anchors(h, w, stride, sizes, self.config.aspect_ratios)
                for (h, w), (_, stride, sizes) in zip(map_sizes, self.head_maps)]
        return self._anchor_cache[key]

    # ---- training -------------------------------------------------------------------------
    def loss(self, images, boxes, labels, rng=None, shard=None):
        """Loss on a batch: images (N, C, H, W); boxes: list of (K_n, 4) (x1, y1, x2, y2);
        labels: list of (K_n,) ints in [0, num_classes). ``check_batch``, ``forward``, then
        ``loss_of``. Returns (loss, parts) as host floats. With ``shard`` = (start, stop), the
        images are rows start..stop-1 of a global batch whose boxes and labels (all of them)
        are given: data-parallel training (``loss_of``)."""
        if shard is None:
            boxes, labels = self.check_batch(images, boxes, labels)
            return self.loss_of(self.forward(images), boxes, labels, rng)
        start, stop = shard
        boxes, labels = list(boxes), list(labels)
        boxes[start:stop], labels[start:stop] = self.check_batch(images, boxes[start:stop],
                                                                 labels[start:stop])
        return self.loss_of(self.forward(images), boxes, labels, rng, shard)

    def check_batch(self, images, boxes, labels, num_classes=None):
        """``inputs.check_batch`` for this detector: host (boxes, labels), checked; labels in
        [0, num_classes) (default: the config's; an RPN, K = 1, takes any: every digit an object)."""
        return check_batch(images, boxes, labels, self.config.in_channels,
                           num_classes or self.config.num_classes, any_label=num_classes is None
                           and self.config.num_classes == 1)

    def loss_of(self, out: DetectorOutput, boxes, labels, rng=None, shard=None):
        """The loss of the forward ``out`` on its batch's checked host targets. Anchors are
        labelled (IoU >= config.positive_iou or the best anchor of a box: object; <
        config.negative_iou: background), config.anchors_per_image are sampled per image with
        at most config.positive_fraction positive, and
            loss = sum CE(sampled) / n + sum SmoothL1(positive deltas) / n,
        n = the number of sampled anchors (or of positives, with normalize_by="positives").
        Reads the loss and ``out``'s checks in one device read; returns (loss, parts).

        ``shard`` = (start, stop): ``out`` is the forward of images start..stop-1 of a global
        batch whose boxes and labels are given whole. The targets are drawn for the whole batch
        (the same random draws as one process), n counts the whole batch's samples, and the loss
        is this part's share: the ranks' shares sum to the one-process loss."""
        c, rng = self.config, default_rng() if rng is None else rng
        anchors = np.concatenate(out.anchors)
        targets = batch_targets(anchors, boxes, labels, rng, c.positive_iou,
                                c.negative_iou, c.anchors_per_image, c.positive_fraction)
        normalizer = max(len(targets.box_index if c.normalize_by == "positives" else targets.cls_index), 1)
        if shard is not None:
            targets = targets.rows(*shard, len(anchors))
        backend = backend_name(out.logits)
        cls_index, cls_target, box_index = (to_device(a, backend) for a in (
            targets.cls_index, targets.cls_target, targets.box_index))
        box_target = to_device(targets.box_target.astype(out.logits.dtype), backend)
        loss_cls, cls_cache = F.softmax_cross_entropy(
            out.logits.reshape(-1, c.num_classes + 1)[cls_index], cls_target, normalizer)
        loss_box, box_cache = F.smooth_l1(out.deltas.reshape(-1, 4)[box_index], box_target,
                                          normalizer=normalizer)
        self._loss_cache = LossCache(out.logits.shape, out.deltas.shape, cls_index, box_index,
                                      cls_cache, box_cache, out.sizes)
        host = out.read(loss_cls, loss_box)
        parts = {"cls": float(host[0]), "box": float(host[1])}
        return parts["cls"] + parts["box"], parts

    def backward(self):
        """Backpropagate the last loss into every parameter's ``.grad`` (the loss is a scalar:
        its gradient is 1); returns d images (None where the backbone is frozen)."""
        return self.features_backward(self.head_backward())

    def head_backward(self):
        """The last loss's gradient through the head only: returns the gradients of the maps the
        head ran on (each (N, d, H_l, W_l)) and adds the head's parameter gradients. A second
        stage that read the same maps adds its own before ``features_backward``."""
        cache = self._need_cache(self._loss_cache, "loss")
        xp = get_array_module(cache.cls_index)
        dtype = self.head.conv.weight.data.dtype
        (N, T, K1), per_anchor = cache.logits_shape, self.num_anchors
        d_logits = xp.zeros((N * T, K1), dtype=dtype)
        d_logits[cache.cls_index] = F.softmax_cross_entropy_backward(1.0, cache.cls_cache)  # unique rows
        d_deltas = xp.zeros((N * T, 4), dtype=dtype)
        d_deltas[cache.box_index] = F.smooth_l1_backward(1.0, cache.box_cache)
        d_logits, d_deltas = d_logits.reshape(cache.logits_shape), d_deltas.reshape(cache.deltas_shape)
        return self.head.backward(unflatten_outputs(d_logits, d_deltas, cache.sizes, per_anchor))

    def features_backward(self, d_maps, d_bottom_up=None):
        """Gradients of the head's maps (and, from a second stage that also read C2..C5,
        ``d_bottom_up``: [dC2, .., dC5], None where none) -> d images, through the neck and the
        backbone (None where ``freeze_at`` stops the backward above the images)."""
        d_c = self.neck.backward(d_maps)
        if d_bottom_up is not None:
            d_c = [b if a is None else a if b is None else a + b for a, b in zip(d_c, d_bottom_up)]
        return self.backbone.backward(d_c)

    # ---- inference --------------------------------------------------------------------------
    def proposals(self, out: DetectorOutput, pre_nms_top_n: int, post_nms_top_n: int,
                  nms_iou: float = 0.7) -> list:
        """The RPN's proposals of each image of ``out`` (K = 1): a list of N host (P_n, 4) arrays
        (x1, y1, x2, y2), best objectness first (``rpn_proposals``)."""
        if self.config.num_classes != 1:
            raise ValueError(f"Detector.proposals: proposals come from an RPN (num_classes = 1), "
                             f"got num_classes = {self.config.num_classes}")
        return rpn_proposals(out.logits, out.deltas, out.anchors, out.image_size, pre_nms_top_n,
                             post_nms_top_n, nms_iou)

    def predict(self, images, score_threshold: float = 0.05, nms_iou: float = 0.5,
                top_k: int = 1000, max_detections: int = 100):
        """Detections per image: a list of dicts with boxes (D, 4) float32, scores (D,),
        labels (D,) int64 (digits 0..9). Per map, the top_k (anchor, class) pairs above
        score_threshold are decoded and clipped; then NMS per class and the best
        max_detections. The score of class k is softmax p(k); with K = 1 this is the RPN's
        objectness, 1 - p(background). An empty batch (N = 0) gives an empty list."""
        check_images(images, self.config.in_channels)  # NaN or inf: refused before any work
        self._loss_cache = None  # predict overwrites the layers' caches: no backward of an old loss
        if images.shape[0] == 0:
            return []
        with self.evaluating():
            out = self.forward(images)
        out.read()  # the finite checks: NaN or inf in C2..C5 (bad weights) raises here
        probs = to_numpy(F.softmax(out.logits, axis=2))  # over the K + 1 classes
        deltas = to_numpy(out.deltas)
        return [postprocess_image(probs[n, :, 1:], deltas[n], out.anchors, images.shape[2:],
                                  score_threshold, nms_iou, top_k, max_detections)
                for n in range(images.shape[0])]  # background (class 0) dropped


__all__ = ["Detector", "DetectorConfig", "DetectorOutput", "TOP_STRIDE", "pad_images"]
