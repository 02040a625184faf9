"""The record of one forward pass of a ``Detector``: what ``loss_of``, ``proposals`` and
``predict`` read (and a two-stage detector's second stage: the features and C2..C5 it pools from)."""
from __future__ import annotations

from dataclasses import dataclass

from ..backend import get_array_module, to_numpy


@dataclass
class DetectorOutput:
    """One forward pass: bottom_up [C2, C3, C4, C5]; features, the maps the head ran on (finest
    first, named in ``Detector.head_maps``; what ``Detector.features`` returns); logits
    (N, T, K + 1) and deltas (N, T, 4), one row per anchor; anchors, per map a host (T_l, 4);
    sizes, per map (H_l, W_l); image_size (H, W); checks, [(0-d device flag, function that
    raises)]: the finite checks, not yet read."""

    bottom_up: list
    features: list
    logits: object
    deltas: object
    anchors: list
    sizes: list
    image_size: tuple
    checks: list

    def read(self, *values):
        """Copy ``values`` (0-d device arrays) to the host together with the checks' flags, in
        one read; raise the first failing check's own error; return the host values."""
        xp = get_array_module(self.logits)
        flags = [flag.astype(self.logits.dtype) for flag, _ in self.checks]
        host = to_numpy(xp.stack([*values, *flags]))
        for ok, (_, fail) in zip(host[len(values):], self.checks):
            if not ok:
                fail()
        return host[:len(values)]


@dataclass
class LossCache:
    """What ``loss_of`` keeps for ``head_backward``."""

    logits_shape: tuple
    deltas_shape: tuple
    cls_index: object
    box_index: object
    cls_cache: tuple
    box_cache: tuple
    sizes: list


__all__ = ["DetectorOutput", "LossCache"]
