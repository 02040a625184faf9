"""The multi-scale digits data set (host-only NumPy)."""
from .digits import (
                     AREA_RANGES,
                     DISTRACTOR_KINDS,
                     MEDIUM_AREA,
                     SMALL_AREA,
                     DigitScenes,
                     SceneConfig,
                     box_iou,
                     draw_distractors,
                     load_source_digits,
                     make_scene,
                     size_bucket,
                     split_indices,
)
from .jitter import scale_jitter

__all__ = ["AREA_RANGES", "DISTRACTOR_KINDS", "MEDIUM_AREA", "SMALL_AREA", "DigitScenes", "SceneConfig",
           "box_iou", "draw_distractors", "load_source_digits", "make_scene", "scale_jitter", "size_bucket",
           "split_indices"]
