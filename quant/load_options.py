"""What a load of an LTX-2 transformer is asked for, as one value handed from the nodes to the functions
that quantize, build and size the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .calibration import load_calibration, require_channel_amax
from .outliers import NONE, Outliers


@dataclass(frozen=True)
class LoadOptions:
    policy: str = "auto"  # a policies.POLICIES name, or "auto" (resolved against the GPU and its free memory)
    nvfp4_mode: str = "fast"  # modes.NVFP4_MODES: how NVFP4 layers run
    scope: dict = field(default_factory=dict)  # scope changes, as policies.get_policy takes them (scopes.py)
    amax: dict[str, float] | None = None  # calibrated input amax per layer: static activation scales
    channel_amax: dict[str, torch.Tensor] | None = None  # the same file's per-channel amax (smoothing)
    calibration: str | None = None  # the calibration file's path, for messages
    outliers: Outliers = NONE  # smoothing and the low-rank branch on the policy's block Linears
    text_connectors_on_cpu: bool = True  # keep the text connectors in host memory, streamed when they run


def calibration_options(path: str | None, outliers: Outliers = NONE) -> dict:
    """The LoadOptions fields of a calibration file (`path`, None for none) and the outlier handling asked:
    its amax (static activation scales) and per-channel amax (smoothing, and the static scales of smoothed
    layers). Smoothing without per-channel amax raises CalibrationError naming the file, before any model
    is read."""
    amax, channels = load_calibration(path) if path else (None, None)
    if outliers.smooth_alpha:
        require_channel_amax(channels, path)
    return {"amax": amax, "channel_amax": channels, "calibration": path, "outliers": outliers}
