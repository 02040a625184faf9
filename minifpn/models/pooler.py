"""The multi-level RoI pooler of the paper's two-stage detector (Sec. 4.2): each RoI is pooled
with RoIAlign from the one pyramid level that Eq. (1) assigns it, as torchvision's
``MultiScaleRoIAlign``.

Glossary: R RoIs, rows (batch_index, x1, y1, x2, y2) in image pixels; level k has stride 2**k
(P2..P5: 4..32) and maps (N, C, H_k, W_k); OH, OW the pooled size (7 x 7 in the paper).
"""
from __future__ import annotations

from itertools import accumulate

from .. import functional as F
from ..backend import backend_name, get_array_module, to_device, to_numpy
from ..detection.levels import check_level_args, map_levels
from ..functional.checks import check_float, check_nchw, is_int, pair
from ..nn import Module
from .inputs import halved_sizes


def _check_levels(levels) -> tuple[int, ...]:
    """Consecutive, increasing level numbers (2, 3, 4, 5): Eq. (1) steps one level at a time."""
    try:
        levels = tuple(levels)
    except TypeError:
        levels = None
    if (not levels or not all(is_int(k) and k >= 0 for k in levels)
            or any(b != a + 1 for a, b in zip(levels, levels[1:]))):
        raise ValueError(f"RoIPooler: levels must be consecutive increasing level numbers k >= 0 "
                         f"(stride 2**k), e.g. (2, 3, 4, 5) for P2..P5, got {levels!r}")
    return tuple(int(k) for k in levels)


class RoIPooler(Module):
    """Pool each RoI from the level k = floor(k0 + log2(sqrt(w h) / canonical_size)) (Eq. 1),
    clamped to ``levels``, with RoIAlign at spatial_scale 1 / 2**k.

    forward(features, rois): features: a list of (N, C, H_k, W_k), one per level in ``levels``,
    finest first (P2, P3, P4, P5), each map half the size of the one before (rounded either way);
    rois: (R, 5), same dtype, on the maps' device or a host (NumPy) array, as the detector's
    bookkeeping makes them -> pooled: (R, C, OH, OW), in the order of ``rois``.
    backward(dpooled (R, C, OH, OW)) -> a list of (N, C, H_k, W_k): each RoI's gradient goes to
    the map it was pooled from; a level that no RoI went to gets zeros.

    Device -> host syncs per forward: one to read how many RoIs each level gets (none for host
    rois: Eq. (1) then runs on the host), plus roi_align's one per level that pools any RoI
    (two with an adaptive grid): 5 for P2..P5 with device rois, 4 with host rois. Backward: none.

    canonical_size = 32, not the paper's 224. The paper's 224 px is the ImageNet pre-training
    size for ~800-px images, whose P2..P5 anchors are 32..256 px. Our images are 128 px with
    digits of 3.5-73 px and anchors of 8/16/32/64 px on P2..P5 (``ANCHOR_SIZES``). With 32, the
    P4 anchor size, a box of side s in [a_k, 2 a_k) is pooled from the level k whose anchors
    have size a_k, and the digits spread over
    all four levels: < 16 px on P2, 16-32 px on P3, 32-64 px on P4, >= 64 px on P5. (Scaling
    the paper's ratio of canonical size to P4 anchor, 224 / 128, would give 56 and leave P5
    to boxes of 112 px or more, larger than any digit.)
    aligned = True: the half-cell shift of Detectron2's RoIAlign. A 4-px digit on P2 spans about
    one cell, where torchvision's default (aligned=False) would be off by half a cell and
    stretch the box to at least 1 x 1 cell. sampling_ratio = 2 (2 x 2 samples per bin), as
    torchvision's Faster R-CNN: a fixed grid needs no device sync to size its samples.
    """

    def __init__(self, levels=(2, 3, 4, 5), output_size=7, sampling_ratio=2, canonical_size=32,
                 canonical_level=4, aligned=True):
        super().__init__()
        self.levels = _check_levels(levels)
        self.output_size = pair(output_size, "output_size", "RoIPooler", 1)
        if not is_int(sampling_ratio):
            raise ValueError(f"RoIPooler: sampling_ratio must be an int (<= 0: adaptive), got "
                             f"{sampling_ratio!r}")
        self.sampling_ratio = int(sampling_ratio)
        _, _, self.canonical_size, self.canonical_level = check_level_args(
            self.levels[0], self.levels[-1], canonical_size, canonical_level, "RoIPooler")
        if not isinstance(aligned, bool):
            raise ValueError(f"RoIPooler: aligned must be True or False, got {aligned!r}")
        self.aligned = aligned
        self.cache = None  # (R, C, OH, OW) and, per level, (RoI indices, roi_align cache)

    def _check_features(self, features, rois):
        """Check the maps and the RoIs; return the RoIs on the maps' device (host rois are copied
        there: a host -> device copy, not a sync)."""
        if not isinstance(features, (list, tuple)) or len(features) != len(self.levels):
            count = len(features) if isinstance(features, (list, tuple)) else type(features).__name__
            raise ValueError(f"RoIPooler: expected a list of {len(self.levels)} feature maps, one per "
                             f"level {self.levels}, got {count}")
        for k, fmap in zip(self.levels, features):
            check_nchw(fmap, "RoIPooler", f"the P{k} map")
        if backend_name(rois) == "numpy":  # the bookkeeping's host rois go with maps on any device
            rois = to_device(rois, backend_name(features[0]))
        check_float(*features, rois, op="RoIPooler", names=(*(f"P{k}" for k in self.levels), "rois"))
        N, C = features[0].shape[:2]
        for k, fine, coarse in zip(self.levels[1:], features, features[1:]):
            halved = all(c in halved_sizes(f) for f, c in zip(fine.shape[2:], coarse.shape[2:]))
            if coarse.shape[:2] != (N, C) or not halved:
                raise ValueError(f"RoIPooler: the P{k} map {tuple(coarse.shape)} does not follow the "
                                 f"P{k - 1} map {tuple(fine.shape)}: expected the same N and C and "
                                 f"half the height and width (maps finest first, one per level)")
        if rois.ndim != 2 or rois.shape[1] != 5:
            raise ValueError(f"RoIPooler: expected rois of shape (R, 5), rows (batch_index, x1, y1, "
                             f"x2, y2), got shape {tuple(rois.shape)}")
        return rois

    def _sort_by_level(self, rois):
        """order (R,) int64: the RoIs sorted by their Eq. (1) level (stable), on the rois' device;
        and per level the (start, stop) of its RoIs in ``order``, as host ints (one read)."""
        xp = get_array_module(rois)
        assigned = map_levels(rois[:, 1:], self.levels[0], self.levels[-1], self.canonical_size,
                              self.canonical_level)  # (R,) the level of each RoI
        order = xp.argsort(assigned, kind="stable")
        levels = xp.arange(self.levels[0], self.levels[-1] + 1)[:, None]
        counts = to_numpy((assigned == levels).sum(axis=1)).tolist()  # CuPy's bincount: 2 more syncs
        return order, [(stop - n, stop) for n, stop in zip(counts, accumulate(counts))]

    def forward(self, features, rois):
        """features: list of (N, C, H_k, W_k) per level; rois: (R, 5) -> (R, C, OH, OW)."""
        on_device = self._check_features(features, rois)
        xp = get_array_module(on_device)
        order, bounds = self._sort_by_level(rois)  # where the rois are: on the host, no sync
        R, C = rois.shape[0], features[0].shape[1]
        pooled = xp.zeros((R, C, *self.output_size), dtype=features[0].dtype)
        per_level = []
        for k, fmap, (start, stop) in zip(self.levels, features, bounds):
            index = order[start:stop]  # the RoIs Eq. (1) sends to level k
            out, cache = F.roi_align(fmap, on_device[index], self.output_size, 1.0 / 2 ** k,
                                     self.sampling_ratio, self.aligned)
            pooled[index] = out
            per_level.append((index, cache))
        self.cache = (pooled.shape, per_level)
        return pooled

    def backward(self, dpooled):
        """dpooled: (R, C, OH, OW) -> list of (N, C, H_k, W_k), finest level first."""
        shape, per_level = self._need_cache(self.cache)
        if tuple(dpooled.shape) != tuple(shape):
            raise ValueError(f"RoIPooler.backward: expected a gradient of shape (R, C, OH, OW) = "
                             f"{tuple(shape)}, got {tuple(dpooled.shape)}")
        # every RoI was pooled from one level only: its gradient goes back to that level alone
        return [F.roi_align_backward(dpooled[index], cache) for index, cache in per_level]

    def extra_repr(self):
        return (f"levels={self.levels}, output_size={self.output_size}, sampling_ratio="
                f"{self.sampling_ratio}, canonical_size={self.canonical_size}, canonical_level="
                f"{self.canonical_level}, aligned={self.aligned}")
