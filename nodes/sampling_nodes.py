"""Sigma schedules for LTX-2 as a node (the distilled lists and the non-distilled scheduler)."""

from __future__ import annotations

import math

import torch
from comfy_api.latest import io

from ..quant import sampling
from . import sampling_pipeline

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


def upscale_weights_input(name: str, optional: bool = False):
    return io.Combo.Input(name, options=list(sampling_pipeline.UPSAMPLER_WEIGHTS), default="as loaded",
                          optional=optional,
                          tooltip="fp8: the upsampler's conv weights stored FP8 with per-channel scales "
                                  "(half the memory)")


class LTX2QuantTwoStageSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LTX2QuantTwoStageSampler",
            display_name="LTX-2 Two-Stage Sampler",
            category="LTX-2 Quant",
            description="The distilled two-stage flow: stage 1 at half width and height, x2 latent upsample, "
                        "re-noise with the first stage-2 sigma, stage 2 at full size. Give it the full-size latent.",
            inputs=[
                io.Model.Input("model", tooltip="Stage 1 (and stage 2 unless model_stage2 is connected)"),
                io.Conditioning.Input("positive"),
                io.Latent.Input("latent", tooltip="The full-size (audio-)video latent; width and height multiples "
                                                  "of 64, frames 8k+1"),
                io.LatentUpscaleModel.Input("upscale_model", tooltip="The x2 spatial upsampler"),
                io.Vae.Input("vae", tooltip="The LTX-2 video VAE (its latent statistics; encodes the image)"),
                io.Int.Input("noise_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Combo.Input("sampler", options=list(sampling_pipeline.SAMPLER_CHOICES), default="euler"),
                io.Float.Input("ge_gamma", default=2.0, min=0.0, max=10.0, step=0.1,
                               tooltip="gradient_estimation only"),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="1.0 for the distilled model (the negative is then unused)"),
                io.Sigmas.Input("sigmas_stage1", optional=True, tooltip="Default: the distilled 8-step list"),
                io.Sigmas.Input("sigmas_stage2", optional=True,
                                tooltip="Default: Lightricks' 0.909375, 0.725, 0.421875, 0.0"),
                io.Model.Input("model_stage2", optional=True, tooltip="A second model (e.g. another precision) "
                                                                       "for stage 2"),
                io.Conditioning.Input("negative", optional=True),
                io.Image.Input("image", optional=True, tooltip="Image-to-video: the first frame, encoded at "
                                                               "each stage's size"),
                io.Float.Input("image_strength", default=1.0, min=0.0, max=1.0, step=0.01, optional=True),
                upscale_weights_input("upscale_weights", optional=True),
            ],
            outputs=[io.Latent.Output(display_name="latent"),
                     io.Latent.Output(display_name="stage1_latent", tooltip="The half-size stage-1 result")],
        )

    @classmethod
    def execute(cls, model, positive, latent, upscale_model, vae, noise_seed, sampler, ge_gamma, cfg,
                sigmas_stage1=None, sigmas_stage2=None, model_stage2=None, negative=None, image=None,
                image_strength=1.0, upscale_weights="as loaded") -> io.NodeOutput:
        if sigmas_stage1 is None:
            sigmas_stage1 = torch.tensor(sampling.DISTILLED_STAGE1)
        if sigmas_stage2 is None:
            sigmas_stage2 = torch.tensor(sampling.STAGE2_REFERENCE)
        out, stage1 = sampling_pipeline.two_stage_sample(
            model, positive, negative, latent, upscale_model, vae, seed=noise_seed, sigmas_stage1=sigmas_stage1,
            sigmas_stage2=sigmas_stage2, sampler_choice=sampler, ge_gamma=ge_gamma, cfg=cfg,
            model_stage2=model_stage2, image=image, image_strength=image_strength, upscale_weights=upscale_weights)
        return io.NodeOutput(out, stage1)


class LTX2QuantLatentUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LTX2QuantLatentUpscale",
            display_name="LTX-2 Latent Upscale",
            category="LTX-2 Quant",
            description="An LTX latent upsampler (spatial x2 / x1.5, or LTX-2.5's temporal x2) on a video or "
                        "audio-video latent, loaded under ComfyUI's model management; optionally with FP8-stored "
                        "weights.",
            inputs=[
                io.Latent.Input("samples"),
                io.LatentUpscaleModel.Input("upscale_model"),
                io.Vae.Input("vae", tooltip="The LTX-2 video VAE (per-channel latent statistics)"),
                upscale_weights_input("weights"),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, samples, upscale_model, vae, weights) -> io.NodeOutput:
        upscale_model = sampling_pipeline.prepare_upsampler(upscale_model, weights)
        video, audio = sampling_pipeline.split_av(samples["samples"])
        if video.ndim != 5:
            raise ValueError(f"Expected a video latent [batch, channels, frames, height, width], got {list(video.shape)}")
        out = {key: value for key, value in samples.items() if key != "noise_mask"}
        out["samples"] = sampling_pipeline.join_av(sampling_pipeline.upsample_video(upscale_model, vae, video), audio)
        return io.NodeOutput(out)
