"""Boxes, anchors, matching, sampling, NMS and COCO-style metrics (host-side NumPy)."""
from .anchors import ANCHOR_SIZES, ASPECT_RATIOS, cell_anchors, grid_anchors, match_anchors, sample_anchors
from .boxes import batched_nms, box_area, box_iou, clip_boxes, decode, encode, nms
from .metrics import evaluate, format_metrics

__all__ = ["ANCHOR_SIZES", "ASPECT_RATIOS", "batched_nms", "box_area", "box_iou", "cell_anchors",
           "clip_boxes", "decode", "encode", "evaluate", "format_metrics", "grid_anchors",
           "match_anchors", "nms", "sample_anchors"]
