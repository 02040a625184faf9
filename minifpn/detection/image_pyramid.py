"""A featurized image pyramid (the paper's Figure 1(a)): one single-scale detector run on the
image resized to several scales, its boxes mapped back and merged.

The paper's baseline before feature pyramids: "each of the image scales is featurized
independently" and "inference time increases considerably" (Sec. 1). Here the detector is Table 1's
setting (a), the head on C4 alone; each scale s resizes the (H, W) images to
(OH, OW) = (round(H * s), round(W * s)) with ``F.resize_bilinear`` (Python's round: half to even),
pads them to multiples of 32 (``pad_images``, zeros at the bottom and right, so boxes keep their
coordinates), and runs ``Detector.predict``. A box at x in the resized image lies at
x * W / OW in the original (y * H / OH), the inverse of the resize's own map of pixel edges
(pixel i of the output covers [i, i + 1) * W / OW of the input); the boxes of every scale are
then clipped to the image, slivers dropped, and merged by class-wise NMS with the detector's own
IoU threshold and number of detections (``postprocess_image``'s nms_iou = 0.5, max_detections =
100). Host-side, but the resize and the detector run on the images' backend.

Scale jitter for training, the pyramid's training-time twin, is ``minifpn.data.jitter.scale_jitter``.
"""
from __future__ import annotations

import numpy as np

from .. import functional as F
from ..functional.checks import check_nchw, is_real
from ..models.inputs import TOP_STRIDE, pad_images
from ..models.settings import SETTINGS
from .boxes import batched_nms, clip_boxes
from .postprocess import MIN_BOX_SIZE

PYRAMID_SETTINGS = ("c4",)  # Table 1's (a); the issue asks for this setting alone


def check_scales(scales) -> tuple[float, ...]:
    """The scales as a tuple of floats: a non-empty sequence of finite numbers > 0."""
    if isinstance(scales, (str, bytes)) or not hasattr(scales, "__len__") or len(scales) == 0:
        raise ValueError(f"image pyramid: scales must be a non-empty list of positive numbers "
                         f"(e.g. (0.5, 1, 2)), got {scales!r}")
    for s in scales:
        if not (is_real(s) and s > 0):
            raise ValueError(f"image pyramid: every scale must be a finite number > 0, got {s!r} "
                             f"in {tuple(scales)!r}")
    return tuple(float(s) for s in scales)


def check_pyramid_detector(detector) -> None:
    """Refuse, in one line, anything but a one-stage detector of a setting in PYRAMID_SETTINGS."""
    config = getattr(detector, "config", None)
    setting = getattr(config, "setting", None)
    if getattr(detector, "kind", None) != "one_stage" or setting not in PYRAMID_SETTINGS:
        what = f"({SETTINGS[setting].letter}) {setting}" if setting in SETTINGS else repr(setting)
        kind = getattr(detector, "kind", type(detector).__name__)
        raise ValueError(f"image pyramid: needs a single-scale one-stage detector of Table 1's setting "
                         f"(a) c4; got a {kind} detector of setting {what}")


def scaled_size(H: int, W: int, scale: float) -> tuple[int, int]:
    """(OH, OW) = (round(H * scale), round(W * scale)), refusing a side that would vanish."""
    OH, OW = round(H * scale), round(W * scale)
    if OH < 1 or OW < 1:
        raise ValueError(f"image pyramid: scale {scale} makes the {H}x{W} images {OH}x{OW}; "
                         f"every side needs at least 1 pixel")
    return OH, OW


def resize_for_scale(images, scale: float, multiple: int = TOP_STRIDE):
    """images (N, C, H, W) -> (resized and padded images (N, C, OH', OW') with OH' and OW' the
    multiples of ``multiple`` (32: what a detector needs; 1: no padding) at or above OH and OW,
    (OH, OW)); scale 1 gives a copy, padded."""
    OH, OW = scaled_size(images.shape[2], images.shape[3], scale)
    resized, _ = F.resize_bilinear(images, (OH, OW))
    return (resized if multiple == 1 else pad_images(resized, multiple)), (OH, OW)


def boxes_to_original(boxes, scaled: tuple[int, int], original: tuple[int, int]) -> np.ndarray:
    """boxes (D, 4) (x1, y1, x2, y2) in the resized image's pixels -> (D, 4) float32 in the
    original's: x * W / OW, y * H / OH (exact where OW = 2 W or W = 2 OW: a factor 1/2 or 2),
    clipped to the original H x W."""
    (OH, OW), (H, W) = scaled, original
    factor = np.array([W / OW, H / OH, W / OW, H / OH])
    mapped = np.asarray(boxes, np.float64).reshape(-1, 4) * factor
    return clip_boxes(mapped, H, W).astype(np.float32)


def merge_detections(per_scale: list, image_size: tuple[int, int], nms_iou: float,
                     max_detections: int) -> dict:
    """One image's detections of every scale, already in its own pixels: a list of dicts
    {"boxes": (D_s, 4), "scores": (D_s,), "labels": (D_s,)} -> one dict of the same form with
    D <= max_detections, best score first: the boxes with both sides > MIN_BOX_SIZE, then NMS per
    class at ``nms_iou`` over all scales together."""
    boxes = np.concatenate([d["boxes"] for d in per_scale]).reshape(-1, 4)
    scores = np.concatenate([d["scores"] for d in per_scale])
    labels = np.concatenate([d["labels"] for d in per_scale]).astype(np.int64)
    wide = ((boxes[:, 2] - boxes[:, 0]) > MIN_BOX_SIZE) & ((boxes[:, 3] - boxes[:, 1]) > MIN_BOX_SIZE)
    boxes, scores, labels = boxes[wide], scores[wide], labels[wide]
    keep = batched_nms(boxes, scores, labels, nms_iou)[:max_detections]
    return {"boxes": boxes[keep].astype(np.float32), "scores": scores[keep], "labels": labels[keep]}


def predict_image_pyramid(detector, images, scales, score_threshold: float = 0.05, nms_iou: float = 0.5,
                          top_k: int = 1000, max_detections: int = 100) -> list:
    """Detections of a featurized image pyramid: ``detector.predict`` on ``images`` resized by each
    of ``scales``, mapped back to the original pixels and merged (the module docstring).

    detector: a one-stage ``Detector`` of setting (a) c4 (others: ValueError); images (N, C, H, W)
    floating, any H and W (each scale is padded to multiples of 32); scales: e.g. (0.5, 1, 2).
    score_threshold, nms_iou, top_k, max_detections: as ``Detector.predict``'s; nms_iou and
    max_detections also merge the scales. Returns what ``predict`` returns: a list of N dicts with
    boxes (D, 4) float32 in the original image's pixels, scores (D,), labels (D,) int64, best first.
    With scales (1,) and sides that are multiples of 32 it is ``predict``'s output (NMS again keeps
    every box that NMS kept).
    """
    check_pyramid_detector(detector)
    scales = check_scales(scales)
    check_nchw(images, "predict_image_pyramid", "images")
    N, _, H, W = images.shape
    if N == 0:
        return []
    per_image = [[] for _ in range(N)]
    for scale in scales:
        resized, scaled = resize_for_scale(images, scale)
        found = detector.predict(resized, score_threshold, nms_iou, top_k, max_detections)
        for n, d in enumerate(found):
            per_image[n].append(dict(d, boxes=boxes_to_original(d["boxes"], scaled, (H, W))))
    return [merge_detections(d, (H, W), nms_iou, max_detections) for d in per_image]


class ImagePyramid:
    """A detector-like view of a featurized image pyramid: ``predict(images)`` is
    ``predict_image_pyramid(detector, images, scales)``; ``config`` and ``backend`` are the
    detector's, so code that evaluates a detector (``minifpn.train.evaluate_detector``) evaluates
    the pyramid. Checks the detector and the scales when made."""

    def __init__(self, detector, scales):
        check_pyramid_detector(detector)
        self.detector, self.scales = detector, check_scales(scales)

    @property
    def config(self):
        return self.detector.config

    @property
    def backend(self) -> str:
        return self.detector.backend

    def predict(self, images, score_threshold: float = 0.05, nms_iou: float = 0.5, top_k: int = 1000,
                max_detections: int = 100) -> list:
        """``predict_image_pyramid`` with this pyramid's detector and scales."""
        return predict_image_pyramid(self.detector, images, self.scales, score_threshold, nms_iou,
                                     top_k, max_detections)


__all__ = ["ImagePyramid", "PYRAMID_SETTINGS", "boxes_to_original", "check_pyramid_detector",
           "check_scales", "merge_detections", "predict_image_pyramid", "resize_for_scale", "scaled_size"]
