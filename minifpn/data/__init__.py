"""The multi-scale digits data set (host-only NumPy)."""
from .digits import (
                     AREA_RANGES,
                     MEDIUM_AREA,
                     SMALL_AREA,
                     DigitScenes,
                     SceneConfig,
                     box_iou,
                     load_source_digits,
                     make_scene,
                     size_bucket,
                     split_indices,
)

__all__ = ["AREA_RANGES", "MEDIUM_AREA", "SMALL_AREA", "DigitScenes", "SceneConfig", "box_iou",
           "load_source_digits", "make_scene", "size_bucket", "split_indices"]
