"""What a load of an LTX-2 transformer is asked for, as one value handed from the nodes to the functions
that quantize, build and size the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

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
