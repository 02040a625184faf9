"""The top-down pathway and lateral connections: C2..C5 -> P2..P6 (paper, Sec. 3).

    M5 = lateral5(C5)                                   a 1x1 conv starts the top-down pathway
    Mk = lateralk(Ck) + upsample(M(k+1), size of Ck)    for k = 4, 3, 2: 2x nearest, then add
    Pk = outputk(Mk)                                    a 3x3 conv on every merged map
    P6 = max_pool2d(P5, kernel_size=1, stride=2)        subsampling, for the largest anchors
No non-linearities. The same class builds the paper's Table 1 ablations with ``variant``
(described in ``minifpn.models.settings``), decided once in ``__init__`` as which branches each
merge has (``has_lateral``, ``has_top_down``) and which levels are output (``predicting``), so that
``forward`` reads as the four equations. The traced maps (``trace=True``) are listed in docs/fpn.md.
"""
from __future__ import annotations

from .. import functional as F
from ..backend import DEFAULT_DTYPE, default_rng, get_array_module
from ..functional.checks import integer
from ..nn import Conv2d, Module, ModuleList
from .inputs import halved_sizes

VARIANTS = ("fpn", "bottom_up", "no_lateral", "p2_only")  # Table 1's (c), (d), (e), (f)
EXTRA_BLOCKS = ("maxpool", "p6p7", None)


# ---- the extra levels above P5: one interface, as torchvision's ExtraFPNBlock -------------
# forward(p5, c5) -> [the extra maps]; backward([their gradients]) -> (dP5, dC5), None for none.

class LastLevelMaxPool(Module):
    """P6 = max_pool2d(P5, kernel_size=1, stride=2): plain subsampling, for the largest anchors
    (paper, Sec. 4.1; torchvision's ``LastLevelMaxPool``). No parameters.
    p5 (N, d, H5, W5) -> [P6 (N, d, ceil(H5 / 2), ceil(W5 / 2))]."""

    def __init__(self):
        super().__init__()
        self.pool_cache = None  # set by forward, used by backward

    def forward(self, p5, c5):
        p6, self.pool_cache = F.max_pool2d(p5, kernel_size=1, stride=2)
        return [p6]

    def backward(self, d_extra):
        """[dP6] -> (dP5, None): P6's gradient lands on the P5 pixels it copied."""
        self._need_cache(self.pool_cache)
        if d_extra[0] is None:
            return None, None
        return F.max_pool2d_backward(d_extra[0], self.pool_cache), None


class LastLevelP6P7(Module):
    """RetinaNet's extra levels: P6 = conv3x3/2(x), P7 = conv3x3/2(relu(P6)), x = P5 or C5.

    Names and init as torchvision's ``LastLevelP6P7`` (``extra_blocks.p6.weight`` ...);
    x is P5 when in_channels == out_channels, else C5 (torchvision's ``use_P5`` rule).
    p5 (N, d, H5, W5), c5 (N, C5, H5, W5) -> [P6 (N, d, ceil(H5 / 2), ...), P7 (N, d, ceil(H6 / 2), ...)].
    """

    def __init__(self, in_channels, out_channels, dtype=DEFAULT_DTYPE, rng=None):
        super().__init__()
        self.p6 = Conv2d(in_channels, out_channels, 3, 2, 1, dtype=dtype, rng=rng)
        self.p7 = Conv2d(out_channels, out_channels, 3, 2, 1, dtype=dtype, rng=rng)
        self.use_P5 = in_channels == out_channels  # torchvision's rule
        self.relu_cache = None  # set by forward, used by backward

    def forward(self, p5, c5):
        p6 = self.p6(p5 if self.use_P5 else c5)
        h, self.relu_cache = F.relu(p6)
        return [p6, self.p7(h)]

    def backward(self, d_extra):
        """[dP6, dP7] (either may be None) -> (dP5, None) or (None, dC5), by ``use_P5``."""
        self._need_cache(self.relu_cache)
        dp6, dp7 = d_extra
        if dp6 is None and dp7 is None:
            return None, None
        if dp7 is not None:  # P6 feeds P7 too: its gradient gets P7's share
            dp6 = _plus(dp6, F.relu_backward(self.p7.backward(dp7), self.relu_cache))
        d_x = self.p6.backward(dp6)
        return (d_x, None) if self.use_P5 else (None, d_x)


class FPN(Module):
    """Feature Pyramid Network on top of a bottom-up pathway.

    in_channels_list: channels of [C2, C3, C4, C5] (finest first); out_channels: d.
    forward([C2, C3, C4, C5]) -> [P2, P3, P4, P5, P6] with Pk: (N, d, Hk, Wk), Hk = H of Ck,
    and P6: (N, d, ceil(H5 / 2), ceil(W5 / 2)) (plus P7 for "p6p7"; only [P2] for "p2_only").
    backward(list of dPk, same length) -> [dC2, dC3, dC4, dC5].
    variant: "fpn" (c), "bottom_up" (d), "no_lateral" (e) or "p2_only" (f) of Table 1.
    extra_block: "maxpool" (P6 by subsampling, the paper), "p6p7" (RetinaNet's) or None.
    fuse: "sum" (the paper) or "avg" (M = (lateral + top-down) / 2).
    p6p7_from: for extra_block="p6p7", whether P6 is computed from "p5" or "c5" (torchvision's
    LastLevelP6P7 rule: from P5 exactly when C5 already has out_channels channels).
    levels: the pyramid levels k of C2..C5, [2, 3, 4, 5]; list index i holds level k = i + 2.
    state_dict keys are torchvision's FeaturePyramidNetwork keys: inner_blocks.i (the 1x1
    laterals) and layer_blocks.i (the 3x3 outputs), index 0 the finest level.
    """

    def __init__(self, in_channels_list, out_channels=256, extra_block="maxpool", fuse="sum",
                 variant="fpn", p6p7_from="p5", dtype=DEFAULT_DTYPE, seed=0, trace=False):
        super().__init__()
        _check_options(variant, extra_block, fuse, p6p7_from)
        rng = default_rng(seed)
        in_channels_list = [integer(c, "each of in_channels_list", "FPN", 1) for c in in_channels_list]
        out_channels = integer(out_channels, "out_channels", "FPN", 1)
        self.in_channels_list = in_channels_list
        self.out_channels, self.extra_block, self.fuse, self.variant = (
            out_channels, extra_block, fuse, variant)
        self.levels = [k + 2 for k in range(len(self.in_channels_list))]  # 2, 3, 4, 5
        # kaiming-uniform(a=1) weights and zero biases: Conv2d's default, as torchvision's FPN
        self.inner_blocks = ModuleList(
            [Conv2d(c, out_channels, 1, dtype=dtype, rng=rng) for c in self.in_channels_list])
        self.layer_blocks = ModuleList(
            [Conv2d(out_channels, out_channels, 3, padding=1, dtype=dtype, rng=rng)
             for _ in self.in_channels_list])
        self.extra_blocks = None
        if extra_block == "maxpool":
            self.extra_blocks = LastLevelMaxPool()
        elif extra_block == "p6p7":  # from C5 (RetinaNet's paper) needs C5's channels in
            p6_in = self.in_channels_list[-1] if p6p7_from == "c5" else out_channels
            self.extra_blocks = LastLevelP6P7(p6_in, out_channels, dtype, rng)
        # the Table 1 variant, decided here once: which branches each merge has, what is output
        n = len(self.levels)
        self.has_lateral = [variant != "no_lateral" or i == n - 1 for i in range(n)]  # (e): C5's only
        self.has_top_down = variant != "bottom_up"  # (d) has none
        self.predicting = [0] if variant == "p2_only" else list(range(n))  # list indices of the Pk out
        n_extra = {"maxpool": 1, "p6p7": 2, None: 0}[extra_block]
        self.output_levels = ([self.levels[i] for i in self.predicting]
                              + [self.levels[-1] + j for j in range(1, n_extra + 1)])  # 2..6 (7)
        self.trace = trace
        self.maps, self.grads = {}, {}
        self.upsample_caches = None  # set by forward, used by backward

    # ---- the names of what comes out ----------------------------------------------------
    @property
    def output_names(self) -> list[str]:
        """Names of the maps ``forward`` returns, e.g. ["P2", "P3", "P4", "P5", "P6"]."""
        return [f"P{k}" for k in self.output_levels]

    @property
    def strides(self) -> list[int]:
        """Stride of each output map: 2 ** level (4, 8, 16, 32, 64, ...)."""
        return [2 ** k for k in self.output_levels]

    # ---- forward: the top-down pathway ------------------------------------------------
    def forward(self, features, check_finite: bool = True):
        """The top-down pathway and lateral connections on [C2, C3, C4, C5] -> [P2, ..., P6].

            M5 = lateral5(C5)
            Mk = lateralk(Ck) + upsample(M(k+1), size of Ck)      k = 4, 3, 2
            Pk = outputk(Mk)                                      k = 2, 3, 4, 5
            P6 = max_pool2d(P5, 1, stride 2)                      (or RetinaNet's P6, P7)
        Shapes are in the class docstring. Index i of each list is level k = i + 2.
        ``check_finite=False`` leaves the NaN/inf check of C2..C5 (one device read) to a caller
        that reads ``inputs_finite(features)`` with its own results, as ``Detector.forward`` does.
        """
        self._start(features, check_finite)
        top = len(features) - 1
        merged = [None] * len(features)
        merged[top] = self._trace("M", top, self._lateral(top, features[top]))  # M5 = lateral5(C5)
        for i in range(top - 1, -1, -1):  # k = 4, 3, 2: coarse to fine
            top_down = self._top_down(i, merged[i + 1], features[i].shape[2:])
            merged[i] = self._merge(i, self._lateral(i, features[i]), top_down)
        outputs = [self.layer_blocks[i](merged[i]) for i in self.predicting]  # Pk = outputk(Mk), 3x3
        if self.extra_blocks is not None:  # P6 (and P7) from P5 (or C5)
            outputs += self.extra_blocks(outputs[-1], features[-1])
        self._record_outputs(features, outputs)
        return outputs

    def _start(self, features, check_finite: bool) -> None:
        """Check the inputs (and their values: one sync for all levels); empty the trace."""
        self._check(features)
        if check_finite and not bool(self.inputs_finite(features)):
            self.raise_not_finite(features)
        self.maps, self.grads = {}, {}
        self.upsample_caches = [None] * len(features)

    def _record_outputs(self, features, outputs) -> None:
        """Trace the outputs P2..P6 and the inputs C2..C5 by name (with ``trace``)."""
        for name, value in zip(self.output_names, outputs):
            self._record(self.maps, name, value)
        for k, c in zip(self.levels, features):
            self._record(self.maps, f"C{k}", c)

    def _lateral(self, i, c):
        """lateral_k(C_k): the 1x1 conv to d channels. None in (e), which keeps only C5's."""
        if not self.has_lateral[i]:
            return None
        return self._trace("lateral", i, self.inner_blocks[i](c))

    def _top_down(self, i, coarser, size):
        """upsample(M_(k+1)) to the size of C_k, nearest. None in (d), the bottom-up pyramid."""
        if not self.has_top_down:
            return None
        top_down, self.upsample_caches[i] = F.upsample_nearest(coarser, size)
        return self._trace("topdown", i, top_down)

    def _merge(self, i, lateral, top_down):
        """M_k = lateral + top-down (elementwise; "avg" halves it), or the one branch there is."""
        if lateral is None or top_down is None:
            return self._trace("M", i, top_down if lateral is None else lateral)
        merged = F.add(lateral, top_down)[0]
        return self._trace("M", i, merged * 0.5 if self.fuse == "avg" else merged)

    # ---- backward: the top-down pathway walked in reverse -----------------------------
    def backward(self, grads):
        """grads: one dPk per output (an entry may be None). Returns [dC2, dC3, dC4, dC5]
        (None for a level that no gradient reaches). Forward's steps, in reverse order:
        P6 -> P5; dMk = outputk^T dPk; fine to coarse, each dMk splits into its lateral and its
        top-down branch (whose backward sums each 2x2 block into dM(k+1)); M5 -> C5."""
        self._need_cache(self.upsample_caches)  # a list after any forward
        if len(grads) != len(self.output_names):
            raise ValueError(f"FPN.backward: expected {len(self.output_names)} gradients for "
                             f"{self.output_names}, got {len(grads)}")
        n, n_out = len(self.levels), len(self.predicting)
        d_p = list(grads[:n_out]) + [None] * (n - n_out)
        d_c = [None] * n
        if self.extra_blocks is not None:  # P6 (and P7) hand their gradient back to P5 or C5
            d_p5, d_c[-1] = self.extra_blocks.backward(list(grads[n_out:]))
            d_p[-1] = _plus(d_p[-1], d_p5)
        for name, d in zip(self.output_names, d_p[:n_out] + list(grads[n_out:])):
            self._record(self.grads, name, d)  # P5's entry includes what P6 sent back
        d_m = [None if d is None else self.layer_blocks[i].backward(d) for i, d in enumerate(d_p)]
        for i in range(n - 1):  # k = 2, 3, 4: fine to coarse, so each dMk is complete here
            d_lateral, d_top_down = self._merge_backward(i, d_m[i])
            d_c[i] = self._lateral_backward(i, d_lateral)
            d_m[i + 1] = _plus(d_m[i + 1], self._top_down_backward(i, d_top_down))
        d_m5 = self._trace("M", n - 1, d_m[-1], self.grads)  # M5 = lateral5(C5)
        d_c[-1] = _plus(self._lateral_backward(n - 1, self._trace("lateral", n - 1, d_m5, self.grads)),
                        d_c[-1])
        for k, d in zip(self.levels, d_c):
            self._record(self.grads, f"C{k}", d)
        return d_c

    def _merge_backward(self, i, d_m):
        """dM_k -> (d lateral_k, d top-down_k): an add hands its gradient to both branches."""
        if d_m is None:
            return None, None
        self._trace("M", i, d_m, self.grads)
        has_lateral, has_top_down = self.has_lateral[i], self.has_top_down
        if has_lateral and has_top_down and self.fuse == "avg":
            d_m = d_m * 0.5  # M = (lateral + top-down) / 2
        return (self._trace("lateral", i, d_m, self.grads) if has_lateral else None,
                self._trace("topdown", i, d_m, self.grads) if has_top_down else None)

    def _lateral_backward(self, i, d_lateral):
        return None if d_lateral is None else self.inner_blocks[i].backward(d_lateral)

    def _top_down_backward(self, i, d_top_down):
        """Nearest upsampling's backward: each pixel of M(k+1) gets the sum over its copies."""
        if d_top_down is None:
            return None
        return F.upsample_nearest_backward(d_top_down, self.upsample_caches[i])

    # ---- the trace: every intermediate map and gradient, by the paper's names ---------------
    def traced(self, features) -> dict:
        """A forward of [C2..C5] with the trace on (and then off again): returns ``maps``, every
        named map (C_k, lateral_k, topdown_k, M_k, P_k), as ``plot_pyramid`` draws them."""
        was, self.trace = self.trace, True
        try:
            self.forward(features)
            return self.maps
        finally:
            self.trace = was

    def _trace(self, stage, i, value, store=None):
        """Record ``value`` as "{stage}{k}" (k = i + 2) in ``store`` (default: maps); return it."""
        self._record(self.maps if store is None else store, f"{stage}{self.levels[i]}", value)
        return value

    def _record(self, store, name, value):
        if self.trace and value is not None:
            store[name] = value

    # ---- input checks -------------------------------------------------------------------
    def _check(self, features):
        n = len(self.in_channels_list)
        if not isinstance(features, (list, tuple)) or len(features) != n:
            count = len(features) if isinstance(features, (list, tuple)) else type(features).__name__
            raise ValueError(f"FPN: expected a list of {n} maps [C2..C{n + 1}], got {count}")
        for k, c, expected in zip(self.levels, features, self.in_channels_list):
            if c.ndim != 4 or c.shape[1] != expected:
                raise ValueError(f"FPN: C{k} should have shape (N, {expected}, H, W) as "
                                 f"in_channels_list says, got {tuple(c.shape)}")
        for k, fine, coarse in zip(self.levels, features, features[1:]):
            _check_halving(k, fine, coarse)

    def inputs_finite(self, features):
        """A 0-d device bool: no NaN or infinity in any of C2..C5 (read it to know)."""
        xp = get_array_module(*features)
        return xp.stack([xp.isfinite(c).all() for c in features]).all()

    def finite_check(self, features):
        """(``inputs_finite(features)``, a function that raises its error): for a caller that
        reads the flag together with its own results, in one device read (``Detector.forward``)."""
        return self.inputs_finite(features), lambda: self.raise_not_finite(features)

    def raise_not_finite(self, features):
        """After ``inputs_finite`` said False: name the first level with NaN or infinity."""
        xp = get_array_module(*features)
        for k, c in zip(self.levels, features):
            if not bool(xp.isfinite(c).all()):
                raise ValueError(f"FPN: C{k} contains NaN or infinite values")


def _check_halving(k, fine, coarse):
    """C(k+1) must be C_k halved (floor or ceil) in height and width, with the same batch."""
    for axis, name in ((2, "height"), (3, "width")):
        if coarse.shape[axis] not in halved_sizes(fine.shape[axis]):
            raise ValueError(
                f"FPN: sizes must halve from level to level; C{k} has {name} "
                f"{fine.shape[axis]}, so C{k + 1} should have "
                f"{' or '.join(map(str, halved_sizes(fine.shape[axis])))}, got {coarse.shape[axis]}")
    if coarse.shape[0] != fine.shape[0]:
        raise ValueError(f"FPN: batch sizes differ between C{k} and C{k + 1}")


def _check_options(variant, extra_block, fuse, p6p7_from):
    if variant not in VARIANTS:
        raise ValueError(f"FPN: variant must be one of {list(VARIANTS)}, got {variant!r}")
    if extra_block not in EXTRA_BLOCKS:
        raise ValueError(f"FPN: extra_block must be one of {EXTRA_BLOCKS}, got {extra_block!r}")
    if fuse not in ("sum", "avg"):
        raise ValueError(f"FPN: fuse must be 'sum' or 'avg', got {fuse!r}")
    if p6p7_from not in ("p5", "c5"):
        raise ValueError(f"FPN: p6p7_from must be 'p5' or 'c5', got {p6p7_from!r}")
    if variant == "p2_only" and extra_block is not None:
        raise ValueError("FPN: variant 'p2_only' predicts from P2 alone; use extra_block=None")


def _plus(a, b):
    """a + b, where None means "no gradient arrived here"."""
    if a is None:
        return b
    return a if b is None else a + b
