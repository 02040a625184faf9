"""The paper's two-stage detector (Sec. 4.2, "Fast R-CNN on the pyramid"), trained end to end
with approximate joint training (as torchvision's and Detectron's Faster R-CNN):

    stage 1, the RPN:  images -> backbone C2..C5 -> FPN P2..P6 -> shared head -> anchor loss;
                       its proposals: top-k objectness, decoded, clipped, NMS 0.7 (host arrays)
    stage 2, Fast R-CNN: proposals + ground truth -> sampled RoIs -> RoIAlign from the level
                       Eq. (1) assigns (P2..P5; or P2 alone, or the backbone's C4: the
                       baselines) -> FastRCNNHead -> classification + box loss
    loss = rpn_cls + rpn_box + rcnn_cls + rcnn_box

Both stages read the same pyramid (the paper's feature sharing), so ``backward`` adds Fast
R-CNN's gradient on P2..P5 to the RPN head's on P2..P6 and then walks the FPN and the backbone
back once. (With pooling "c4" Fast R-CNN's gradient joins the FPN's on C4 instead.) The
proposal boxes are host arrays: no gradient flows through their coordinates.

Glossary: N images, T anchors per image (all levels), P_n proposals of image n, R sampled RoIs
of the batch, C = d channels, OH = OW = pool_size (7), K classes (digits) plus background.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from .. import functional as F
from ..backend import DEFAULT_DTYPE, backend_name, default_rng, get_array_module, to_device, to_numpy
from ..detection.boxes import clip_boxes, nms
from ..detection.postprocess import MIN_BOX_SIZE, level_candidates
from ..detection.roi_targets import decode_detections, sample_rois
from ..functional._checks import integer
from ..nn import Module
from .config import DetectorConfig
from .detector import Detector
from .inputs import check_images, check_targets
from .pooler import RoIPooler
from .roi_head import FastRCNNHead, fast_rcnn_loss, fast_rcnn_loss_backward

POOLINGS = {"pyramid": (2, 3, 4, 5),  # Eq. (1) picks one of P2..P5 per RoI (the paper's)
            "p2": (2,),  # every RoI from P2, the finest map
            "c4": (4,)}  # every RoI from the backbone's C4 (stride 16): Table 3's baseline
RPN_SETTINGS = ("fpn", "bottom_up", "no_lateral")  # Table 1 settings whose FPN gives P2..P6


@dataclass
class TwoStageConfig(DetectorConfig):
    """A ``DetectorConfig`` for the backbone, the FPN and the RPN (its anchors and their
    labelling), where ``num_classes`` counts the classes Fast R-CNN names (the RPN always has
    K = 1), plus the second stage's settings. Saved with every checkpoint.

    Proposals per image, for 128 x 128 scenes of 1-5 digits (T = 4,092 anchors on P2..P6):
    ``pre_nms_top_n`` per level caps only P2's 3,072 anchors; NMS at 0.7 then thins the rest.
    Training keeps 300: ``rois_per_image`` = 128 are sampled from them and the ground-truth
    boxes, so 300 leave the sampler a choice of background. Testing keeps 100, 20 or more per
    digit (the paper keeps 1,000 for COCO's ~7 objects per image, about 140 each), since every
    proposal costs RoIAlign and fc6 time.
    """

    pooling: str = "pyramid"  # "pyramid": Eq. (1) over P2..P5; "p2": every RoI from P2;
    # "c4": every RoI from the backbone's C4, no FPN map (the RPN still runs on P2..P6)
    pool_size: int = 7  # OH = OW of RoIAlign's output, the paper's 7 x 7
    sampling_ratio: int = 2  # RoIAlign samples per bin side, torchvision's Faster R-CNN
    hidden: int = 256  # width of fc6 and fc7 (FastRCNNHead explains 256 for d = 64)
    rpn_nms_iou: float = 0.7  # the RPN's NMS threshold (Faster R-CNN, Sec. 3.3)
    pre_nms_top_n_train: int = 1000  # per level, before NMS
    post_nms_top_n_train: int = 300  # per image, after NMS
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_test: int = 100
    rois_per_image: int = 128  # RoIs sampled per image for the Fast R-CNN loss
    roi_positive_fraction: float = 0.25  # at most this share positive (IoU >= 0.5), Fast R-CNN's

    def __post_init__(self):
        super().__post_init__()
        where = "TwoStageConfig"
        if self.setting not in RPN_SETTINGS:
            raise ValueError(f"{where}: setting must be one of {RPN_SETTINGS} (the RoIs are pooled "
                             f"from P2..P5 of an FPN), got {self.setting!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"{where}: pooling must be one of {tuple(POOLINGS)}, got {self.pooling!r}")
        for name in ("pool_size", "sampling_ratio", "hidden", "pre_nms_top_n_train",
                     "post_nms_top_n_train", "pre_nms_top_n_test", "post_nms_top_n_test",
                     "rois_per_image"):
            setattr(self, name, integer(getattr(self, name), name, where, 1))
        for name in ("rpn_nms_iou", "roi_positive_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"{where}: {name} must be a number in (0, 1], got {value!r}")
            setattr(self, name, float(value))

    def rpn_config(self) -> DetectorConfig:
        """The RPN's config: every ``DetectorConfig`` field as here, with K = 1 (object or not)."""
        shared = {f.name: getattr(self, f.name) for f in fields(DetectorConfig)}
        return DetectorConfig(**{**shared, "num_classes": 1})


class PyramidRPN(Detector):
    """The paper's RPN on the pyramid (Sec. 4.1): the one-stage ``Detector`` with K = 1 (one
    anchor size per level, three aspect ratios, a head shared across P2..P6). It owns the
    backbone and the FPN, whose maps the second stage shares, and it adds what that stage needs:
        ``forward(images)``: the network up to the head, without a loss;
        ``maps``, ``outputs``: the maps P2..P6 and the head's per-anchor outputs of the last
            forward (also the one inside ``loss``), from which ``proposals`` are made;
        ``bottom_up``: that forward's C2..C5, for a second stage that pools from C4;
        (``Detector.head_backward`` gives the last RPN loss's gradient on P2..P6, stopping
        before the FPN, so that Fast R-CNN's gradient on the maps can join it.)
    """

    def __init__(self, config: DetectorConfig, dtype=DEFAULT_DTYPE):
        if config.num_classes != 1:
            raise ValueError(f"PyramidRPN: the RPN tells object from background, num_classes = 1; "
                             f"got num_classes = {config.num_classes}")
        super().__init__(config, dtype)
        self.maps = self.outputs = self.image_size = self.bottom_up = None  # set by every forward

    def features(self, images, *args, **kwargs):
        """``Detector.features``, remembering the maps P2..P6 for the second stage."""
        self.maps = super().features(images, *args, **kwargs)
        self.image_size = tuple(images.shape[2:])
        return self.maps

    def maps_from_backbone(self, c2_to_c5, *args, **kwargs):
        """``Detector.maps_from_backbone``, remembering C2..C5 in ``bottom_up``."""
        self.bottom_up = c2_to_c5
        return super().maps_from_backbone(c2_to_c5, *args, **kwargs)

    def _head_outputs(self, images, *args, **kwargs):
        """``Detector._head_outputs``, remembering (logits, deltas, anchors, sizes)."""
        self.outputs = super()._head_outputs(images, *args, **kwargs)
        return self.outputs

    def forward(self, images):
        """images (N, C_in, H, W) -> the maps P2..P6 (also kept in ``maps``); the head's outputs
        are kept in ``outputs``: logits (N, T, 2), deltas (N, T, 4), anchors, sizes."""
        self._loss_cache = None  # the layers' caches now hold this forward: no backward of a loss
        self._head_outputs(images)
        return self.maps

    def proposals(self, pre_nms_top_n: int, post_nms_top_n: int, nms_iou: float = 0.7):
        """The proposals of each image of the last forward (``rpn_proposals``): a list of N
        host arrays (P_n, 4) (x1, y1, x2, y2), best objectness first."""
        if self.outputs is None:
            raise RuntimeError("PyramidRPN.proposals called before a forward or loss")
        logits, deltas, anchors_l, _ = self.outputs
        return rpn_proposals(logits, deltas, anchors_l, self.image_size, pre_nms_top_n,
                             post_nms_top_n, nms_iou)


def rpn_proposals(logits, deltas, anchors_per_level, image_size, pre_nms_top_n: int = 1000,
                  post_nms_top_n: int = 300, nms_iou: float = 0.7) -> list:
    """The RPN's proposals of each image (Faster R-CNN, Sec. 3.3, per pyramid level as in FPN).

    logits (N, T, 2) (background, object), deltas (N, T, 4), on any backend; anchors_per_level:
    list of host (T_l, 4) with sum T_l = T; image_size (H, W). Per image: on each level, the
    pre_nms_top_n anchors of highest objectness p(object) are decoded; the boxes are clipped to
    the image, those with a side <= MIN_BOX_SIZE dropped, and NMS at ``nms_iou`` over all
    levels together keeps the best ``post_nms_top_n``.
    Returns a list of N host float64 arrays (P_n, 4), P_n <= post_nms_top_n, best first. They
    are plain host numbers, outside the graph: the paper's approximate joint training.
    """
    xp = get_array_module(logits)
    objectness = F.softmax(logits, axis=2)[..., 1:]  # (N, T, 1): p(object) against background
    host = to_numpy(xp.concatenate([objectness, deltas], axis=2))  # one device read
    H, W = image_size
    proposals = []
    for n in range(host.shape[0]):
        boxes, scores, start = [], [], 0
        for anchors in anchors_per_level:  # the best pre_nms_top_n of each level
            end = start + len(anchors)
            level_boxes, level_scores, _ = level_candidates(
                host[n, start:end, :1], host[n, start:end, 1:], anchors, 0.0, pre_nms_top_n)
            boxes.append(level_boxes)
            scores.append(level_scores)
            start = end
        boxes, scores = clip_boxes(np.concatenate(boxes), H, W), np.concatenate(scores)
        wide = ((boxes[:, 2] - boxes[:, 0]) > MIN_BOX_SIZE) & ((boxes[:, 3] - boxes[:, 1]) > MIN_BOX_SIZE)
        boxes, scores = boxes[wide], scores[wide]
        proposals.append(boxes[nms_top(boxes, scores, nms_iou, post_nms_top_n)])
    return proposals


def nms_top(boxes, scores, iou_threshold: float, count: int) -> np.ndarray:
    """The first ``count`` boxes that greedy NMS (``boxes.nms``) keeps, best first (host).

    Greedy NMS decides each box by the kept boxes ranked above it alone, so NMS on the best m
    boxes keeps exactly the boxes NMS on all would keep among those m. Try m = count, 2 count,
    ... until ``count`` survive or every box was tried: an untrained RPN's boxes barely overlap,
    and NMS over all ~2,000 of them would cost ~2,000 steps for the 300 kept.
    boxes (B, 4), scores (B,) -> indices (<= count,) into boxes."""
    order = np.argsort(-np.asarray(scores), kind="stable")  # as nms orders them
    m = count
    while True:
        top = order[:m]
        keep = top[nms(boxes[top], scores[top], iou_threshold)]
        if len(keep) >= count or m >= len(order):
            return keep[:count]
        m *= 2


def rois_with_batch_index(boxes_per_image, dtype, backend: str):
    """List of N host (R_n, 4) boxes -> one (sum R_n, 5) array of rows (n, x1, y1, x2, y2), the
    RoI format of ``roi_align``, on ``backend`` in ``dtype``."""
    rows = [np.concatenate([np.full((len(b), 1), n, np.float64), np.asarray(b, np.float64)], axis=1)
            for n, b in enumerate(boxes_per_image)]
    return to_device(np.concatenate(rows).reshape(-1, 5).astype(dtype), backend)


class TwoStageDetector(Module):
    """The pyramid RPN and Fast R-CNN on the pyramid (paper, Sec. 4.2). ``loss(images, boxes,
    labels)`` then ``backward()`` trains both stages at once; ``predict(images)`` returns boxes,
    scores and labels per image, as ``Detector`` does, so ``minifpn.train`` runs it unchanged.

    Parts: ``rpn`` (a ``PyramidRPN``: backbone, FPN, RPN head), ``pooler`` (RoIAlign over the
    levels of ``config.pooling``), ``roi_head`` (a ``FastRCNNHead``).

    ``config.pooling`` picks the maps the RoIs are pooled from: "pyramid" (P2..P5 by Eq. (1),
    the paper's), "p2" (P2 only) or "c4" (the backbone's C4, the single-scale baseline of the
    paper's Table 3, with the same 2-fc head as the others rather than the paper's conv5 head,
    so that only the features differ). The proposals come from the pyramid RPN in every case,
    as in Table 3.
    """

    kind = "two_stage"  # the name minifpn.train.MODELS and checkpoints know this class by

    def __init__(self, config: TwoStageConfig | None = None, dtype=DEFAULT_DTYPE, **overrides):
        super().__init__()
        self.config = c = config or TwoStageConfig(**overrides)
        if not isinstance(c, TwoStageConfig):
            raise TypeError(f"TwoStageDetector: expected a TwoStageConfig, got {type(c).__name__}")
        self.rpn = PyramidRPN(c.rpn_config(), dtype)
        self.pooler = RoIPooler(POOLINGS[c.pooling], c.pool_size, c.sampling_ratio)
        pooled_channels = c.widths[2] if c.pooling == "c4" else c.channels  # C4's, or d
        self.roi_head = FastRCNNHead(pooled_channels, c.pool_size, c.hidden, c.num_classes, dtype,
                                     c.seed + 3)
        self.proposals = None  # the last loss's or predict's proposals, a list of host (P_n, 4)
        self._loss_cache = None  # set by loss, used by backward

    # the RPN's backbone and FPN are the detector's: the names train.py and the figures use
    @property
    def backbone(self):
        return self.rpn.backbone

    @property
    def fpn(self):
        return self.rpn.fpn

    def features(self, images):
        """images (N, in_channels, H, W) -> [P2, ..., P6], which both stages read."""
        return self.rpn.features(images)

    def _pool(self, rois):
        """rois (R, 5) on the maps' device -> pooled (R, C, OH, OW) from the last forward's maps:
        P2..P5 (C = d), P2, or C4 (C = widths[2])."""
        if self.config.pooling == "c4":
            return self.pooler([self.rpn.bottom_up[2]], rois)
        return self.pooler(self.rpn.maps[:len(self.pooler.levels)], rois)

    # ---- training -------------------------------------------------------------------------
    def loss(self, images, boxes, labels, rng=None, proposals=None):
        """Loss on a batch: images (N, C, H, W); boxes: list of (K_n, 4) (x1, y1, x2, y2);
        labels: list of (K_n,) ints in [0, num_classes). Returns (loss, parts) as host floats:
        parts has rpn_cls, rpn_box (``Detector.loss`` of the RPN), rcnn_cls, rcnn_box
        (``fast_rcnn_loss`` of the sampled RoIs), and cls and box, the sums over both stages;
        loss = rpn_cls + rpn_box + rcnn_cls + rcnn_box = cls + box.

        Per image, ``sample_rois`` draws config.rois_per_image RoIs from the proposals and the
        ground-truth boxes (at most config.roi_positive_fraction positive, IoU >= 0.5).
        ``proposals``: a list of N host (P_n, 4) to use instead of the RPN's (Fast R-CNN's own
        training on fixed proposals; a gradient check); the RPN is trained either way.
        """
        c, rng = self.config, default_rng() if rng is None else rng
        check_images(images, c.in_channels, values=False)  # the shape, to unpack it
        N, _, H, W = images.shape
        boxes = [to_numpy(b).reshape(-1, 4) for b in boxes]  # host: sampling is bookkeeping
        labels = [to_numpy(lab).reshape(-1) for lab in labels]
        if N:  # (an empty batch: the RPN's loss refuses it, in its own words)
            check_targets(boxes, labels, N, H, W, c.num_classes)
        self._loss_cache = None
        # stage 1: backbone, FPN, RPN head and the RPN's anchor loss, one forward
        _, rpn_parts = self.rpn.loss(images, boxes, labels, rng)
        if proposals is None:
            proposals = self.rpn.proposals(c.pre_nms_top_n_train, c.post_nms_top_n_train, c.rpn_nms_iou)
        elif len(proposals) != N:
            raise ValueError(f"TwoStageDetector.loss: expected proposals for each of the {N} images, "
                             f"got {len(proposals)}")
        self.proposals = proposals
        # stage 2: sample RoIs per image, pool them from the shared maps, classify and regress
        sampled = [sample_rois(p, b, lab, rng, c.rois_per_image, c.roi_positive_fraction)
                   for p, b, lab in zip(proposals, boxes, labels)]
        rois = rois_with_batch_index([s[0] for s in sampled], self.rpn.maps[0].dtype,
                                     backend_name(images))
        roi_labels = np.concatenate([s[1] for s in sampled])
        roi_targets = np.concatenate([s[2] for s in sampled])
        cls_score, bbox_pred = self.roi_head(self._pool(rois))
        (loss_cls, loss_box), fast_rcnn_cache = fast_rcnn_loss(cls_score, bbox_pred, roi_labels,
                                                               roi_targets)
        self._loss_cache = fast_rcnn_cache
        xp = get_array_module(cls_score)
        host = to_numpy(xp.stack([loss_cls, loss_box]))  # one device read
        parts = {"rpn_cls": rpn_parts["cls"], "rpn_box": rpn_parts["box"],
                 "rcnn_cls": float(host[0]), "rcnn_box": float(host[1])}
        parts["cls"] = parts["rpn_cls"] + parts["rcnn_cls"]
        parts["box"] = parts["rpn_box"] + parts["rcnn_box"]
        return parts["cls"] + parts["box"], parts

    def backward(self):
        """Backpropagate the last ``loss`` into every parameter's ``.grad``; returns d images.

        Fast R-CNN's gradient goes through its head and the pooler onto P2..P5; the RPN head's
        gradient arrives on P2..P6 (P6 gets only the RPN's); the two are added map by map, and
        the sum walks the FPN and the backbone back once. With pooling "c4", Fast R-CNN's
        gradient on C4 is added to the one the FPN sends there, before the backbone."""
        fast_rcnn_cache = self._need_cache(self._loss_cache, "loss")
        d_cls, d_box = fast_rcnn_loss_backward(fast_rcnn_cache)
        d_pooled_maps = self.pooler.backward(self.roi_head.backward(d_cls, d_box))  # P2..P5, or C4
        d_rpn_maps = self.rpn.head_backward()  # P2..P6
        if self.config.pooling == "c4":
            d_bottom_up = list(self.rpn.fpn.backward(d_rpn_maps))  # [dC2, dC3, dC4, dC5]
            d_c4 = d_bottom_up[2]  # None where C4 comes from a frozen stage (freeze_at >= 4)
            d_bottom_up[2] = d_pooled_maps[0] if d_c4 is None else d_c4 + d_pooled_maps[0]  # C4 fed both
            return self.rpn.backbone.backward(d_bottom_up)
        d_maps = [d_rpn + d_pooled for d_rpn, d_pooled in zip(d_rpn_maps, d_pooled_maps)]
        d_maps += d_rpn_maps[len(d_pooled_maps):]  # the levels no RoI is pooled from: P6 (P3..P5)
        return self.rpn.features_backward(d_maps)

    # ---- inference --------------------------------------------------------------------------
    def predict(self, images, score_threshold: float = 0.05, nms_iou: float = 0.5,
                max_detections: int = 100):
        """Detections per image, as ``Detector.predict``: a list of dicts with boxes (D, 4)
        float32, scores (D,), labels (D,) int64 in [0, num_classes). The RPN's
        config.post_nms_top_n_test proposals are pooled and scored by Fast R-CNN; each class's
        box is decoded from its own deltas, and ``decode_detections`` thresholds, suppresses per
        class (NMS at ``nms_iou``) and keeps the best ``max_detections``. An empty batch gives []."""
        c = self.config
        check_images(images, c.in_channels, values=False)
        self._loss_cache = None  # predict overwrites the layers' caches: no backward of an old loss
        if images.shape[0] == 0:
            return []
        with self.evaluating():
            self.rpn(images)
            proposals = self.rpn.proposals(c.pre_nms_top_n_test, c.post_nms_top_n_test, c.rpn_nms_iou)
            rois = rois_with_batch_index(proposals, self.rpn.maps[0].dtype, backend_name(images))
            cls_score, bbox_pred = self.roi_head(self._pool(rois))
        self.proposals = proposals
        xp = get_array_module(cls_score)
        host = to_numpy(xp.concatenate([cls_score, bbox_pred], axis=1))  # one device read
        K1 = c.num_classes + 1
        ends = np.cumsum([len(p) for p in proposals])
        return [decode_detections(host[end - len(p):end, :K1], host[end - len(p):end, K1:], p,
                                  images.shape[2:], score_threshold, nms_iou, max_detections)
                for p, end in zip(proposals, ends)]


__all__ = ["POOLINGS", "PyramidRPN", "RPN_SETTINGS", "TwoStageConfig", "TwoStageDetector",
           "nms_top", "rois_with_batch_index", "rpn_proposals"]
