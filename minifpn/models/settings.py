"""The paper's Table 1 settings (a)-(f): which feature maps the detector's head runs on.

``SETTINGS`` lists the six rows in the paper's order, each with its letter, its name (the
``setting`` of ``DetectorConfig``), one description, and the maps the head sees; ``LETTERS`` maps
letters to names and ``resolve`` accepts either. The experiment that compares them (the paper's
numbers, the runner, the tables) is ``minifpn.table1``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    """One row of Table 1: its letter in the paper, its name here, what the head sees.
    ``head_maps``: the names of the maps the head runs on, finest first."""

    letter: str
    name: str
    description: str
    head_maps: tuple

    @property
    def label(self) -> str:
        """"(c) FPN: P2..P6, one anchor size per level": the row as tables print it."""
        return f"({self.letter}) {self.description}"

    @property
    def one_size_per_level(self) -> bool:
        """True where each map gets one anchor size (the pyramids); False where the one map the
        head sees gets every size (the single-scale baselines and P2 alone)."""
        return len(self.head_maps) > 1


PYRAMID = ("P2", "P3", "P4", "P5", "P6")  # strides 4..64; P6 subsamples P5
SETTINGS = {s.name: s for s in (  # in the paper's order, (a) to (f)
    Setting("a", "c4", "single-scale: head on C4, anchors of every size there", ("C4",)),
    Setting("b", "c5", "single-scale: head on C5, anchors of every size there", ("C5",)),
    Setting("c", "fpn", "FPN: P2..P6, one anchor size per level", PYRAMID),
    Setting("d", "bottom_up", "bottom-up pyramid, no top-down pathway", PYRAMID),
    Setting("e", "no_lateral", "top-down pyramid without lateral connections", PYRAMID),
    Setting("f", "p2_only", "only the finest level P2 of the full pathway, anchors of every size", ("P2",)),
)}
LETTERS = {s.letter: s.name for s in SETTINGS.values()}  # "c" -> "fpn"
# what resolve accepts, as its error message (and the CLI's) lists it
CHOICES = f"{', '.join(SETTINGS)} or a Table 1 letter {min(LETTERS)}-{max(LETTERS)}"


def resolve(setting: str) -> str:
    """A Table 1 setting by name ("fpn") or letter ("c") -> its name ("fpn")."""
    key = setting.strip() if isinstance(setting, str) else setting
    name = LETTERS.get(key, key)
    if name not in SETTINGS:
        raise ValueError(f"setting must be one of {CHOICES}, got {setting!r}")
    return name


__all__ = ["CHOICES", "LETTERS", "PYRAMID", "SETTINGS", "Setting", "resolve"]
