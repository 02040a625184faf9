"""Weights to and from torchvision, by name.

Our FPN keys are torchvision's ``FeaturePyramidNetwork`` keys in their original layout,
``inner_blocks.{i}.weight``; torchvision >= 0.13 wraps each conv in a ``Conv2dNormActivation``
and names it ``inner_blocks.{i}.0.weight``. Both layouts are read; either can be written.
The ResNet keys are ``torchvision.models.resnet18``'s (conv1, bn1, layer1..4), less avgpool/fc.
Values may be torch tensors or NumPy arrays; what we return is NumPy (or torch, on request).
"""
from __future__ import annotations

import re

from .backend import to_numpy

_FPN_NEW = re.compile(r"^(inner_blocks|layer_blocks)\.(\d+)\.0\.(weight|bias)$")
_FPN_OLD = re.compile(r"^(inner_blocks|layer_blocks)\.(\d+)\.(weight|bias)$")


def fpn_from_torchvision(state: dict) -> dict:
    """torchvision FeaturePyramidNetwork state dict (either layout) -> our FPN's keys."""
    out = {}
    for key, value in state.items():
        m = _FPN_NEW.match(key)
        out[f"{m[1]}.{m[2]}.{m[3]}" if m else key] = to_numpy(value)
    return out


def fpn_to_torchvision(state: dict, layout: str = "new", as_torch: bool = True) -> dict:
    """Our FPN state dict -> torchvision's keys; layout "new" (inner_blocks.i.0.weight, the
    current torchvision) or "old" (inner_blocks.i.weight)."""
    if layout not in ("new", "old"):
        raise ValueError(f"layout must be 'new' or 'old', got {layout!r}")
    out = {}
    for key, value in state.items():
        m = _FPN_OLD.match(key)
        if m and layout == "new":
            key = f"{m[1]}.{m[2]}.0.{m[3]}"
        out[key] = _convert(value, as_torch)
    return out


def resnet_from_torchvision(state: dict) -> dict:
    """torchvision resnet18 state dict -> our ResNet's keys (the classifier fc.* is dropped)."""
    return {k: to_numpy(v) for k, v in state.items() if not k.startswith("fc.")}


def resnet_to_torchvision(state: dict, as_torch: bool = True) -> dict:
    """Our ResNet state dict -> torchvision resnet18's keys (load with strict=False: no fc)."""
    return {k: _convert(v, as_torch) for k, v in state.items()}


def _convert(value, as_torch: bool):
    value = to_numpy(value)
    if not as_torch:
        return value
    import torch
    return torch.from_numpy(value.copy())
