"""Everything that fixes a detector's shape, saved with every checkpoint (as JSON)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..detection.anchors import ANCHOR_SIZES, ASPECT_RATIOS
from ..functional.checks import integer, is_int, is_real
from .resnet import check_freeze_at, check_norm, resnet_fields
from .settings import SETTINGS, resolve

NORMALIZERS = ("sampled", "positives")  # what Detector.loss divides by: the sampled anchors, or the positives


# (0 allowed, 1 allowed) for each labelling number: IoUs >= positive_iou are objects, < negative_iou
# background; positive_fraction is the largest share of positives among the sampled anchors
LABELLING_RANGES = {"positive_iou": (False, True), "negative_iou": (True, False),
                    "positive_fraction": (False, True)}


def _positive_number(value) -> bool:
    return is_real(value) and value > 0


@dataclass
class DetectorConfig:
    """Everything that fixes a detector's shape; saved with every checkpoint."""

    setting: str = "fpn"
    num_classes: int = 10
    in_channels: int = 1
    widths: tuple = (16, 32, 64, 128)
    blocks: tuple = (1, 1, 1, 1)
    stem_kernel: int = 3
    channels: int = 64  # d, the pyramid's (and the head's) width
    anchor_sizes: tuple = tuple(ANCHOR_SIZES.values())  # P2..P6: 8..128 px (paper: 32..512 on 800 px)
    aspect_ratios: tuple = ASPECT_RATIOS  # height / width: 1:2, 1:1, 2:1
    # Anchor labelling. The paper (Sec. 4.1) uses IoU >= 0.7 positive, < 0.3 negative and 256
    # sampled anchors per image; with one anchor size per level at twice the stride only ~11%
    # of digits reach 0.7 with any anchor, so the 10-digit detector learns from too few
    # positives in a 5-minute budget. Its defaults: 0.4 / 0.3 and 64 anchors (docs/results.md).
    # `minifpn ablation` uses the paper's values.
    positive_iou: float = 0.4
    negative_iou: float = 0.3
    anchors_per_image: int = 64
    positive_fraction: float = 0.5
    normalize_by: str = "sampled"  # divide the loss by the sampled anchors, or the positives
    seed: int = 0
    # The paper's regime (docs/fpn.md, "Pre-training and freezing"): start the backbone from the
    # shipped pre-trained digit classifier of this seed (minifpn.weights.find_backbone), freeze
    # its bottom as detectron2's FREEZE_AT (2: the stem and C2's stage), and fix its batch norms.
    pretrained: bool = False
    freeze_at: int = 0  # 0 nothing ... 5 the whole backbone (minifpn.models.resnet.FREEZE_AT)
    norm: str = "bn"  # "bn": batch statistics; "frozen_bn": fixed scale and shift (FrozenBatchNorm2d)

    def __post_init__(self):
        self.setting = resolve(self.setting)  # a Table 1 letter ("c") becomes its name
        # NumPy integer scalars become Python ints (the config is saved as JSON); bools and
        # floats such as 2.5 are refused, with the field's name
        for name in ("num_classes", "in_channels", "stem_kernel", "channels", "anchors_per_image"):
            setattr(self, name, integer(getattr(self, name), name, "DetectorConfig", 1))
        self.seed = integer(self.seed, "seed", "DetectorConfig", 0)
        self.widths = tuple(integer(w, "each of widths", "DetectorConfig", 1) for w in self.widths)
        self.blocks = tuple(integer(b, "each of blocks", "DetectorConfig", 1) for b in self.blocks)
        self._check_anchors()
        self._check_labelling()
        self.freeze_at = check_freeze_at(self.freeze_at, "DetectorConfig")
        self.norm = check_norm(self.norm, "DetectorConfig")
        if not isinstance(self.pretrained, bool):
            raise ValueError(f"DetectorConfig: pretrained must be True or False, got {self.pretrained!r}")
        if self.pretrained:  # refuse now, by what is shipped, rather than when the weights load
            from ..weights import find_backbone
            find_backbone(self.backbone_fields(), self.seed)

    def _check_anchors(self) -> None:
        """Positive sizes and ratios; one size per map where the setting is a pyramid (its anchor
        rows must line up with the head's output rows, map by map)."""
        self.anchor_sizes = tuple(int(s) if is_int(s) else s for s in self.anchor_sizes)
        self.aspect_ratios = tuple(self.aspect_ratios)
        for name in ("anchor_sizes", "aspect_ratios"):
            values = getattr(self, name)
            if not values or not all(_positive_number(v) for v in values):
                raise ValueError(f"DetectorConfig: {name} must be positive numbers, got {values!r}")
        maps = SETTINGS[self.setting].head_maps
        if SETTINGS[self.setting].one_size_per_level and len(self.anchor_sizes) != len(maps):
            raise ValueError(f"DetectorConfig: setting {self.setting!r} puts one anchor size on each of "
                             f"{', '.join(maps)}: anchor_sizes needs {len(maps)} sizes, got "
                             f"{len(self.anchor_sizes)} {self.anchor_sizes}")

    def _check_labelling(self) -> None:
        """The anchor labelling's thresholds, share and normaliser (Detector.loss explains them)."""
        for name, (zero, one) in LABELLING_RANGES.items():
            value = getattr(self, name)
            above = is_real(value) and (0 <= value if zero else 0 < value)
            if not (above and (value <= 1 if one else value < 1)):
                interval = f"{'[' if zero else '('}0, 1{']' if one else ')'}"
                raise ValueError(f"DetectorConfig: {name} must be a number in {interval}, got {value!r}")
        if self.negative_iou >= self.positive_iou:
            raise ValueError(f"DetectorConfig: negative_iou must be below positive_iou (an anchor cannot "
                             f"be both), got {self.negative_iou!r} >= {self.positive_iou!r}")
        if self.normalize_by not in NORMALIZERS:
            raise ValueError(f"DetectorConfig: normalize_by must be one of "
                             f"{', '.join(map(repr, NORMALIZERS))}, got {self.normalize_by!r}")

    def backbone_fields(self) -> dict:
        """What fixes the bottom-up ResNet's shape: in_channels, widths, blocks, stem_kernel."""
        return resnet_fields(self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DetectorConfig:
        """The config saved in a checkpoint; checkpoints before 2026-12 also saved an unused
        ``extra: {}``, which is dropped."""
        d = dict(d)
        if d.get("extra") == {}:
            del d["extra"]
        return cls(**d)
