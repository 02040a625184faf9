"""Weight initialisation. Values are drawn on the host from a NumPy Generator (so a seed gives
the same weights on every backend) and then moved to the parameter's backend and dtype."""
from __future__ import annotations

import math

from ..backend import backend_name, default_rng, to_device


def _fans(shape) -> tuple[int, int]:
    """(fan_in, fan_out) of a conv weight (OC, IC, KH, KW): IC*KH*KW and OC*KH*KW."""
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def _fill(param, values) -> None:
    param.data = to_device(values, backend_name(param.data)).astype(param.data.dtype)


def kaiming_uniform_(param, a: float = 1.0, rng=None) -> None:
    """U(-bound, bound) with bound = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + a^2)).

    With a=1 (gain 1) this is torchvision's FPN init: ``nn.init.kaiming_uniform_(w, a=1)``.
    """
    rng = default_rng() if rng is None else rng
    fan_in, _ = _fans(param.shape)
    bound = math.sqrt(2.0 / (1 + a * a)) * math.sqrt(3.0 / fan_in)
    _fill(param, rng.uniform(-bound, bound, size=param.shape))


def he_normal_(param, rng=None) -> None:
    """N(0, 2 / fan_out): torchvision ResNet's ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``."""
    rng = default_rng() if rng is None else rng
    _, fan_out = _fans(param.shape)
    _fill(param, rng.normal(0.0, math.sqrt(2.0 / fan_out), size=param.shape))


def normal_(param, std: float, rng=None) -> None:
    """N(0, std^2), e.g. std=0.01 for a detection head's last convs (Faster R-CNN)."""
    rng = default_rng() if rng is None else rng
    _fill(param, rng.normal(0.0, std, size=param.shape))

