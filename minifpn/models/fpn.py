"""The top-down pathway and lateral connections: C2..C5 -> P2..P6 (paper, Sec. 3).

    M5 = lateral5(C5)                                   a 1x1 conv starts the top-down pathway
    Mk = lateralk(Ck) + upsample(M(k+1), size of Ck)    for k = 4, 3, 2: 2x nearest, then add
    Pk = outputk(Mk)                                    a 3x3 conv on every merged map
    P6 = max_pool2d(P5, kernel_size=1, stride=2)        subsampling, for the largest anchors
No non-linearities. The same class switches to the paper's Table 1 ablations with ``variant``.
The names of the traced maps (``trace=True``) are listed in docs/fpn.md.
"""
from __future__ import annotations

from .. import functional as F
from ..backend import DEFAULT_DTYPE, default_rng, get_array_module
from ..functional._checks import integer
from ..nn import Conv2d, Module, ModuleList

VARIANTS = {
    "fpn": "(c) the full FPN: top-down pathway and lateral connections",
    "bottom_up": "(d) bottom-up pyramid: laterals and 3x3 outputs, no top-down pathway",
    "no_lateral": "(e) top-down pathway without lateral connections (only C5's 1x1 is used)",
    "p2_only": "(f) the full pathway, but only P2 is returned for prediction",
}
EXTRA_BLOCKS = ("maxpool", "p6p7", None)


class LastLevelP6P7(Module):
    """RetinaNet's extra levels: P6 = conv3x3/2(x), P7 = conv3x3/2(relu(P6)), x = P5 or C5.

    Names and init as torchvision's ``LastLevelP6P7`` (``extra_blocks.p6.weight`` ...);
    x is P5 when in_channels == out_channels, else C5 (torchvision's ``use_P5`` rule).
    """

    def __init__(self, in_channels, out_channels, dtype=DEFAULT_DTYPE, rng=None):
        super().__init__()
        self.p6 = Conv2d(in_channels, out_channels, 3, 2, 1, dtype=dtype, rng=rng)
        self.p7 = Conv2d(out_channels, out_channels, 3, 2, 1, dtype=dtype, rng=rng)
        self.use_P5 = in_channels == out_channels  # torchvision's rule
        self.relu_cache = None  # set by forward, used by backward

    def forward(self, x):
        p6 = self.p6(x)
        h, self.relu_cache = F.relu(p6)
        return p6, self.p7(h)

    def backward(self, dp6, dp7):
        """Returns the gradient of x (P5 or C5); dp6 or dp7 may be None."""
        self._need_cache(self.relu_cache)
        if dp7 is not None:  # P6 feeds P7 too: its gradient gets P7's share
            dp6 = _plus(dp6, F.relu_backward(self.p7.backward(dp7), self.relu_cache))
        return self.p6.backward(dp6)


class FPN(Module):
    """Feature Pyramid Network on top of a bottom-up pathway.

    in_channels_list: channels of [C2, C3, C4, C5] (finest first); out_channels: d.
    forward([C2, C3, C4, C5]) -> [P2, P3, P4, P5, P6] with Pk: (N, d, Hk, Wk), Hk = H of Ck,
    and P6: (N, d, ceil(H5 / 2), ceil(W5 / 2)) (plus P7 for "p6p7"; only [P2] for "p2_only").
    backward(list of dPk, same length) -> [dC2, dC3, dC4, dC5].
    fuse: "sum" (the paper) or "avg" (M = (lateral + top-down) / 2).
    p6p7_from: for extra_block="p6p7", whether P6 is computed from "p5" or "c5" (torchvision's
    LastLevelP6P7 rule: from P5 exactly when C5 already has out_channels channels).
    state_dict keys are torchvision's FeaturePyramidNetwork keys: inner_blocks.i (the 1x1
    laterals) and layer_blocks.i (the 3x3 outputs), index 0 the finest level.
    """

    def __init__(self, in_channels_list, out_channels=256, extra_block="maxpool", fuse="sum",
                 variant="fpn", p6p7_from="p5", dtype=DEFAULT_DTYPE, seed=0, trace=False):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"FPN: variant must be one of {list(VARIANTS)}, got {variant!r}")
        if extra_block not in EXTRA_BLOCKS:
            raise ValueError(f"FPN: extra_block must be one of {EXTRA_BLOCKS}, got {extra_block!r}")
        if fuse not in ("sum", "avg"):
            raise ValueError(f"FPN: fuse must be 'sum' or 'avg', got {fuse!r}")
        if variant == "p2_only" and extra_block is not None:
            raise ValueError("FPN: variant 'p2_only' predicts from P2 alone; use extra_block=None")
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
        if p6p7_from not in ("p5", "c5"):
            raise ValueError(f"FPN: p6p7_from must be 'p5' or 'c5', got {p6p7_from!r}")
        if extra_block == "p6p7":  # from C5 (RetinaNet's paper) needs C5's channels in
            p6_in = self.in_channels_list[-1] if p6p7_from == "c5" else out_channels
            self.extra_blocks = LastLevelP6P7(p6_in, out_channels, dtype, rng)
        self.trace = trace
        self.maps, self.grads = {}, {}
        self.upsample_caches = self.extra_cache = None  # set by forward, used by backward

    # ---- the names of what comes out ----------------------------------------------------
    @property
    def output_names(self) -> list[str]:
        """Names of the maps ``forward`` returns, e.g. ["P2", "P3", "P4", "P5", "P6"]."""
        if self.variant == "p2_only":
            return ["P2"]
        names = [f"P{k}" for k in self.levels]
        top = self.levels[-1]
        if self.extra_block == "maxpool":
            names.append(f"P{top + 1}")
        elif self.extra_block == "p6p7":
            names += [f"P{top + 1}", f"P{top + 2}"]
        return names

    @property
    def strides(self) -> list[int]:
        """Stride of each output map: 2 ** level (4, 8, 16, 32, 64, ...)."""
        return [2 ** int(name[1:]) for name in self.output_names]

    def _record(self, store, name, value):
        if self.trace:
            store[name] = value

    # ---- forward: the top-down pathway ------------------------------------------------
    def forward(self, features):
        self._check(features)
        self.maps, self.grads = {}, {}
        n = len(features)
        for k, c in zip(self.levels, features):
            self._record(self.maps, f"C{k}", c)
        merged = [None] * n
        self.upsample_caches = [None] * n
        top = n - 1
        merged[top] = self.inner_blocks[top](features[top])  # M5 = lateral5(C5)
        self._record(self.maps, f"lateral{self.levels[top]}", merged[top])
        for i in range(top - 1, -1, -1):  # k = 4, 3, 2: coarse to fine
            k = self.levels[i]
            lateral = None
            if self.variant != "no_lateral":
                lateral = self.inner_blocks[i](features[i])
                self._record(self.maps, f"lateral{k}", lateral)
            if self.variant == "bottom_up":
                merged[i] = lateral  # (d): no top-down pathway
            else:
                size = features[i].shape[2:]
                top_down, self.upsample_caches[i] = F.upsample_nearest(merged[i + 1], size)
                self._record(self.maps, f"topdown{k}", top_down)
                merged[i] = top_down if lateral is None else self._fuse(lateral, top_down)
        for i, k in enumerate(self.levels):
            self._record(self.maps, f"M{k}", merged[i])
        used = [0] if self.variant == "p2_only" else range(n)
        outputs = [self.layer_blocks[i](merged[i]) for i in used]  # Pk = outputk(Mk), 3x3
        outputs += self._extra_forward(outputs, features)
        for name, p in zip(self.output_names, outputs):
            self._record(self.maps, name, p)
        return outputs

    def _fuse(self, lateral, top_down):
        merged = F.add(lateral, top_down)[0]
        return merged * 0.5 if self.fuse == "avg" else merged

    def _extra_forward(self, outputs, features):
        if self.extra_block == "maxpool":  # P6 = subsample P5 (torchvision's LastLevelMaxPool)
            p6, self.extra_cache = F.max_pool2d(outputs[-1], kernel_size=1, stride=2)
            return [p6]
        if self.extra_block == "p6p7":
            x = outputs[-1] if self.extra_blocks.use_P5 else features[-1]
            return list(self.extra_blocks(x))
        return []

    # ---- backward: the top-down pathway walked in reverse -----------------------------
    def backward(self, grads):
        """grads: one dPk per output (an entry may be None). Returns [dC2, dC3, dC4, dC5]
        (None for a level that no gradient reaches)."""
        self._need_cache(self.upsample_caches)  # a list after any forward
        if len(grads) != len(self.output_names):
            raise ValueError(f"FPN.backward: expected {len(self.output_names)} gradients for "
                             f"{self.output_names}, got {len(grads)}")
        n, used = len(self.levels), self._n_used()
        d_outputs = list(grads[:used]) + [None] * (n - used)
        d_to_p5, d_to_c5 = self._extra_backward(grads[n:])  # P6 (and P7) hand back to P5 or C5
        d_outputs[n - 1] = _plus(d_outputs[n - 1], d_to_p5)
        for name, d in zip(self.output_names, d_outputs[:used] + list(grads[n:])):
            self._record(self.grads, name, d)  # P5's entry includes what P6 sent back
        # through each 3x3 output conv: dPk -> dMk
        d_merged = [None if d is None else self.layer_blocks[i].backward(d)
                    for i, d in enumerate(d_outputs)]
        d_features = [None] * n
        # fine to coarse: dMk splits into the lateral and the top-down branch; the upsample's
        # backward sums each 2x2 block of dMk into M(k+1)
        for i in range(n - 1):
            k, d_m = self.levels[i], d_merged[i]
            if d_m is None:
                continue
            self._record(self.grads, f"M{k}", d_m)
            if self.fuse == "avg" and self.variant in ("fpn", "p2_only"):
                d_m = d_m * 0.5  # M = (lateral + top-down) / 2
            if self.variant != "no_lateral":
                self._record(self.grads, f"lateral{k}", d_m)
                d_features[i] = self.inner_blocks[i].backward(d_m)
            if self.variant != "bottom_up":
                self._record(self.grads, f"topdown{k}", d_m)
                d_up = F.upsample_nearest_backward(d_m, self.upsample_caches[i])
                d_merged[i + 1] = _plus(d_merged[i + 1], d_up)
        top = n - 1
        if d_merged[top] is not None:  # M5 = lateral5(C5)
            self._record(self.grads, f"M{self.levels[top]}", d_merged[top])
            self._record(self.grads, f"lateral{self.levels[top]}", d_merged[top])
            d_features[top] = self.inner_blocks[top].backward(d_merged[top])
        d_features[top] = _plus(d_features[top], d_to_c5)
        for k, d in zip(self.levels, d_features):
            self._record(self.grads, f"C{k}", d)
        return d_features

    def _n_used(self) -> int:
        """How many levels get a 3x3 output conv: 1 for "p2_only", else all."""
        return 1 if self.variant == "p2_only" else len(self.levels)

    def _extra_backward(self, extra_grads):
        """Gradient that P6 (and P7) send back: (to P5, to C5)."""
        if self.extra_block == "maxpool" and extra_grads[0] is not None:
            return F.max_pool2d_backward(extra_grads[0], self.extra_cache), None
        if self.extra_block == "p6p7" and any(d is not None for d in extra_grads):
            d_x = self.extra_blocks.backward(*extra_grads)
            return (d_x, None) if self.extra_blocks.use_P5 else (None, d_x)
        return None, None

    # ---- input checks -------------------------------------------------------------------
    def _check(self, features):
        n = len(self.in_channels_list)
        if not isinstance(features, (list, tuple)) or len(features) != n:
            count = len(features) if isinstance(features, (list, tuple)) else type(features).__name__
            raise ValueError(f"FPN: expected a list of {n} maps [C2..C{n + 1}], got {count}")
        xp = get_array_module(*features)
        for k, c, expected in zip(self.levels, features, self.in_channels_list):
            if c.ndim != 4 or c.shape[1] != expected:
                raise ValueError(f"FPN: C{k} should have shape (N, {expected}, H, W) as "
                                 f"in_channels_list says, got {tuple(c.shape)}")
        for k, fine, coarse in zip(self.levels, features, features[1:]):
            for axis, name in ((2, "height"), (3, "width")):
                if coarse.shape[axis] not in (fine.shape[axis] // 2, (fine.shape[axis] + 1) // 2):
                    raise ValueError(
                        f"FPN: sizes must halve from level to level; C{k} has {name} "
                        f"{fine.shape[axis]}, so C{k + 1} should have {fine.shape[axis] // 2} or "
                        f"{(fine.shape[axis] + 1) // 2}, got {coarse.shape[axis]}")
            if coarse.shape[0] != fine.shape[0]:
                raise ValueError(f"FPN: batch sizes differ between C{k} and C{k + 1}")
        if not bool(xp.stack([xp.isfinite(c).all() for c in features]).all()):  # one sync for all
            for k, c in zip(self.levels, features):  # only on failure: find the level to name
                if not bool(xp.isfinite(c).all()):
                    raise ValueError(f"FPN: C{k} contains NaN or infinite values")


def _plus(a, b):
    """a + b, where None means "no gradient arrived here"."""
    if a is None:
        return b
    return a if b is None else a + b
