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

from ..backend import DEFAULT_DTYPE, backend_name, default_rng, get_array_module, to_device, to_numpy
from ..detection.postprocess import nms_top, rpn_proposals  # noqa: F401  (named here as before)
from ..detection.roi_targets import decode_detections, sample_rois
from ..functional.checks import integer
from ..nn import Module
from .config import DetectorConfig
from .detector import Detector
from .inputs import check_images
from .pooler import RoIPooler
from .roi_head import FastRCNNHead, fast_rcnn_loss, fast_rcnn_loss_backward

# where each pooling takes its RoI features: the FPN's maps ("P") or the backbone's ("C"), at levels
POOLINGS = {"pyramid": ("P", (2, 3, 4, 5)),  # Eq. (1) picks one of P2..P5 per RoI (the paper's)
            "p2": ("P", (2,)),  # every RoI from P2, the finest map
            "c4": ("C", (4,))}  # every RoI from the backbone's C4 (stride 16): Table 3's baseline
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

    Parts: ``rpn`` (the one-stage ``Detector`` with K = 1: backbone, FPN, RPN head; its forward
    record of the last loss or predict is ``rpn_out``), ``pooler`` (RoIAlign over the
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
        self.rpn = Detector(c.rpn_config(), dtype)  # the paper's RPN: the one-stage detector, K = 1
        self.pool_from, levels = POOLINGS[c.pooling]  # "P" or "C", decided once
        self.pooler = RoIPooler(levels, c.pool_size, c.sampling_ratio)
        pooled_channels = {"P": c.channels, "C": c.widths[levels[0] - 2]}[self.pool_from]  # d, or C_k's
        self.roi_head = FastRCNNHead(pooled_channels, c.pool_size, c.hidden, c.num_classes, dtype,
                                     c.seed + 3)
        self.proposals = None  # the last loss's or predict's proposals, a list of host (P_n, 4)
        self.rpn_out = None  # the RPN's DetectorOutput of the last loss or predict: maps, C2..C5
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
        """rois (R, 5) on the maps' device -> pooled (R, C, OH, OW) from the last forward's maps
        at the pooler's levels: P2..P5 (C = d), P2, or C4 (C = widths[2])."""
        maps = {"P": self.rpn_out.features, "C": self.rpn_out.bottom_up}[self.pool_from]  # from level 2
        return self.pooler([maps[k - 2] for k in self.pooler.levels], rois)

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
        boxes, labels = self.rpn.check_batch(images, boxes, labels, c.num_classes)  # host, checked once
        boxes, labels = [b.reshape(-1, 4) for b in boxes], [lab.reshape(-1) for lab in labels]
        N = images.shape[0]
        self._loss_cache = None
        # stage 1: backbone, FPN, RPN head and the RPN's anchor loss (every digit "an object")
        self.rpn_out = out = self.rpn.forward(images)
        _, rpn_parts = self.rpn.loss_of(out, boxes, [np.zeros(len(b), np.int64) for b in boxes], rng)
        if proposals is None:
            proposals = self.rpn.proposals(out, c.pre_nms_top_n_train, c.post_nms_top_n_train,
                                           c.rpn_nms_iou)
        elif len(proposals) != N:
            raise ValueError(f"TwoStageDetector.loss: expected proposals for each of the {N} images, "
                             f"got {len(proposals)}")
        self.proposals = proposals
        # stage 2: sample RoIs per image, pool them from the shared maps, classify and regress
        sampled = [sample_rois(p, b, lab, rng, c.rois_per_image, c.roi_positive_fraction)
                   for p, b, lab in zip(proposals, boxes, labels)]
        rois = rois_with_batch_index([s[0] for s in sampled], out.features[0].dtype, backend_name(images))
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
        d_pooled_maps = self.pooler.backward(self.roi_head.backward(fast_rcnn_loss_backward(
            fast_rcnn_cache)))  # at the pooler's levels: P2..P5, P2, or C4
        d_by_source = {"P": list(self.rpn.head_backward()), "C": [None, None, None, None]}  # P2..P6, C2..C5
        d = d_by_source[self.pool_from]
        for k, d_pooled in zip(self.pooler.levels, d_pooled_maps):  # a map both stages read: add
            d[k - 2] = d_pooled if d[k - 2] is None else d[k - 2] + d_pooled
        return self.rpn.features_backward(d_by_source["P"], d_by_source["C"])

    # ---- inference --------------------------------------------------------------------------
    def predict(self, images, score_threshold: float = 0.05, nms_iou: float = 0.5,
                max_detections: int = 100):
        """Detections per image, as ``Detector.predict``: a list of dicts with boxes (D, 4)
        float32, scores (D,), labels (D,) int64 in [0, num_classes). The RPN's
        config.post_nms_top_n_test proposals are pooled and scored by Fast R-CNN; each class's
        box is decoded from its own deltas, and ``decode_detections`` thresholds, suppresses per
        class (NMS at ``nms_iou``) and keeps the best ``max_detections``. An empty batch gives []."""
        c = self.config
        check_images(images, c.in_channels)  # NaN or inf: refused before any work
        self._loss_cache = None  # predict overwrites the layers' caches: no backward of an old loss
        if images.shape[0] == 0:
            return []
        with self.evaluating():
            self.rpn_out = out = self.rpn.forward(images)
            out.read()  # the finite checks of the images and C2..C5
            proposals = self.rpn.proposals(out, c.pre_nms_top_n_test, c.post_nms_top_n_test, c.rpn_nms_iou)
            rois = rois_with_batch_index(proposals, out.features[0].dtype, backend_name(images))
            cls_score, bbox_pred = self.roi_head(self._pool(rois))
        self.proposals = proposals
        xp = get_array_module(cls_score)
        host = to_numpy(xp.concatenate([cls_score, bbox_pred], axis=1))  # one device read
        K1 = c.num_classes + 1
        ends = np.cumsum([len(p) for p in proposals])
        return [decode_detections(host[end - len(p):end, :K1], host[end - len(p):end, K1:], p,
                                  images.shape[2:], score_threshold, nms_iou, max_detections)
                for p, end in zip(proposals, ends)]


__all__ = ["POOLINGS", "RPN_SETTINGS", "TwoStageConfig", "TwoStageDetector", "nms_top",
           "rois_with_batch_index", "rpn_proposals"]
