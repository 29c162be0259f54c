"""Static activation scales from an amax calibration file (the JSON layout Lightricks documented:
{"amax_values": {"transformer_blocks.0.attn1.to_q.input_quantizer": 12.5, ...}})."""

from __future__ import annotations

import json
import math

import torch

from . import formats
from .ltx2 import CHECKPOINT_PREFIX, strip_prefix

SUFFIX = ".input_quantizer"


class CalibrationError(ValueError):
    pass


def layer_name(entry: str) -> str:
    """Our unprefixed layer name for a calibration entry, in either naming: theirs ends in
    `.input_quantizer`; the attention module may be written `attn` for `attn1`."""
    name = strip_prefix(entry, CHECKPOINT_PREFIX)
    if name.endswith(SUFFIX):
        name = name[: -len(SUFFIX)]
    return name.replace(".attn.", ".attn1.")


def load_amax(path: str) -> dict[str, float]:
    """Layer -> activation amax. Errors name the file and the bad entry."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CalibrationError(f"{path}: not a readable calibration JSON ({e})") from None
    values = raw.get("amax_values") if isinstance(raw, dict) else None
    if not isinstance(values, dict):
        raise CalibrationError(f"{path}: expected an object with 'amax_values' mapping layer names to numbers")
    amax = {}
    for entry, value in values.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise CalibrationError(f"{path}: amax for {entry!r} must be a positive finite number, got {value!r}")
        amax[layer_name(entry)] = float(value)
    return amax


def save_amax(path: str, amax: dict[str, float]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"amax_values": {f"{layer}{SUFFIX}": value for layer, value in sorted(amax.items())}}, f, indent=1)


def input_scale(amax: float) -> torch.Tensor:
    """The static FP8 activation decode scale for an amax: activations are clamped to it."""
    return torch.tensor(amax / formats.FP8_MAX, dtype=torch.float32)
