"""Sigma schedules for LTX-2 as a node (the distilled lists and the non-distilled scheduler)."""

from __future__ import annotations

import math

import torch
from comfy_api.latest import io

from ..quant import sampling

SCHEDULER = "LTX-2 scheduler (non-distilled)"


def latent_tokens(latent: dict | None) -> int | None:
    """Video tokens of a LATENT (the video part of an audio-video latent)."""
    if latent is None:
        return None
    samples = latent["samples"]
    video = samples.unbind()[0] if getattr(samples, "is_nested", False) else samples
    return math.prod(video.shape[2:])


class LTX2QuantSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LTX2QuantSigmas",
            display_name="LTX-2 Sigmas",
            category="LTX-2 Quant",
            description="The distilled stage-1/stage-2 sigma lists, or the non-distilled LTX-2 scheduler.",
            inputs=[
                io.Combo.Input("preset", options=[*sampling.SIGMA_PRESETS, SCHEDULER], default="distilled stage 1"),
                io.Int.Input("steps", default=30, min=1, max=1000, tooltip="Non-distilled scheduler only"),
                io.Float.Input("terminal", default=0.1, min=0.0, max=0.99, step=0.01,
                               tooltip="Non-distilled scheduler: last non-zero sigma after stretching"),
                io.Latent.Input("latent", optional=True, tooltip="Non-distilled scheduler: shift by token count"),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, preset, steps, terminal, latent=None) -> io.NodeOutput:
        if preset in sampling.SIGMA_PRESETS:
            return io.NodeOutput(torch.tensor(sampling.SIGMA_PRESETS[preset], dtype=torch.float32))
        return io.NodeOutput(sampling.ltx2_scheduler(steps, latent_tokens(latent), terminal=terminal))
