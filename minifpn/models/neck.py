"""The neck: the maps a Table 1 setting's head runs on, built once from the setting.

    (a) C4, (b) C5      one map of the bottom-up pathway (``SingleMap``), every anchor size there
    (c), (d), (e)       an ``FPN`` of that variant: P2..P6, one anchor size per level
    (f)                 the FPN's P2 alone, every anchor size there

``build_neck`` is the one place where a setting decides how the maps are made. Every neck has
``forward(c2_to_c5) -> maps`` (finest first), ``backward(d_maps) -> [dC2, dC3, dC4, dC5]`` (None
where no gradient goes), ``output_names``, ``strides``, ``out_channels``, and
``finite_check(c2_to_c5)``: a (0-d device flag, function that raises) pair for the caller to read
with its own results, or None where the neck checks nothing.
"""
from __future__ import annotations

from ..backend import DEFAULT_DTYPE
from ..nn import Module
from .fpn import FPN
from .settings import SETTINGS


class SingleMap(Module):
    """One map of the bottom-up pathway, C_level, as the head's only input (the single-scale
    baselines (a) C4 and (b) C5). No parameters: forward picks the map, backward puts its
    gradient back in place. c2_to_c5: [C2, C3, C4, C5] -> [C_level]."""

    def __init__(self, level: int, in_channels_list):
        super().__init__()
        self.level = level
        self.output_names, self.strides = [f"C{level}"], [2 ** level]
        self.out_channels = in_channels_list[level - 2]

    def forward(self, c2_to_c5, check_finite: bool = True):
        return [c2_to_c5[self.level - 2]]

    def backward(self, d_maps):
        grads = [None, None, None, None]
        grads[self.level - 2] = d_maps[0]
        return grads

    def finite_check(self, c2_to_c5):
        return None  # the backbone's map is the head's input as it is


def build_neck(config, dtype=DEFAULT_DTYPE) -> Module:
    """The neck of ``config.setting`` (a ``DetectorConfig``): a ``SingleMap`` for a backbone map,
    else the ``FPN`` of that variant (with P6 by subsampling where the setting uses P6). The
    FPN's laterals on the maps of frozen backbone stages (``config.freeze_at``) skip their input
    gradient: nothing trained lies below them."""
    maps = SETTINGS[config.setting].head_maps
    if maps[0].startswith("C"):
        return SingleMap(int(maps[0][1:]), list(config.widths))
    fpn = FPN(list(config.widths), config.channels, extra_block="maxpool" if "P6" in maps else None,
              variant=config.setting, dtype=dtype, seed=config.seed + 1)
    for k in fpn.levels[:max(config.freeze_at - 1, 0)]:  # C_k of a frozen stage: a constant
        fpn.inner_blocks[k - 2].needs_input_grad = False
    return fpn


__all__ = ["SingleMap", "build_neck"]
