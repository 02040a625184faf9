"""Boxes, anchors, training targets (match, sample, encode), post-processing (decode, clip, NMS)
and COCO-style metrics (host-side NumPy)."""
from .anchors import ANCHOR_SIZES, ASPECT_RATIOS, cell_anchors, grid_anchors, match_anchors, sample_anchors
from .boxes import batched_nms, box_area, box_iou, clip_boxes, decode, encode, nms
from .levels import map_levels
from .metrics import evaluate, format_metrics, without_labels
from .postprocess import MIN_BOX_SIZE, postprocess_image
from .roi_targets import BOX_CODER_WEIGHTS, decode_detections, decode_rois, encode_rois, sample_rois
from .targets import Targets, batch_targets, image_targets

__all__ = ["ANCHOR_SIZES", "ASPECT_RATIOS", "BOX_CODER_WEIGHTS", "MIN_BOX_SIZE", "Targets",
           "batch_targets", "batched_nms", "box_area", "box_iou", "cell_anchors", "clip_boxes",
           "decode", "decode_detections", "decode_rois", "encode", "encode_rois", "evaluate",
           "format_metrics", "grid_anchors", "image_targets", "map_levels", "match_anchors", "nms",
           "postprocess_image", "sample_anchors", "sample_rois", "without_labels"]
