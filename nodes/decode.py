"""Video decode sized to the free memory: whole when ComfyUI's estimate fits, else core's tiled decode
with the largest tiles and chunks that fit (quant/decode_tiles.py); out of memory anyway, the pack's
advice. The VAE is loaded first through ComfyUI's model management, which unloads the models sampling
left on the GPU (the transformer, the upsampler) as far as the whole decode needs."""

from __future__ import annotations

import gc

import comfy.model_management

from ..quant.advice import call_or_advise_on_oom
from ..quant.decode_tiles import DecodePlan, plan_decode

ALL_FRAMES = 4096  # VAE Decode (Tiled)'s temporal size for "one chunk": the templates' value
ALL_FRAMES_OVERLAP = 4


def video_latent(samples: dict):
    latent = samples["samples"]
    return latent.unbind()[0] if latent.is_nested else latent


def plan_for(vae, video, free_bytes: int | None = None) -> tuple[DecodePlan, int]:
    """The decode plan for `video` (a latent) and the free bytes it was made for (asked of ComfyUI after
    making room for the whole decode, unless given)."""
    spatial, temporal = vae.spacial_compression_decode(), vae.temporal_compression_decode() or 1
    batch, channels, latent_frames, latent_height, latent_width = video.shape

    def need(width: int, height: int, frames: int) -> int:
        shape = (batch, channels, (frames - 1) // temporal + 1, height // spatial, width // spatial)
        return int(vae.memory_used_decode(shape, vae.vae_dtype))

    width, height, frames = latent_width * spatial, latent_height * spatial, (latent_frames - 1) * temporal + 1
    if free_bytes is None:
        comfy.model_management.load_models_gpu([vae.patcher], memory_required=need(width, height, frames))
        free_bytes = comfy.model_management.get_free_memory(vae.device)
    return plan_decode(width, height, frames, free_bytes, need), free_bytes


def decode_video(vae, samples: dict, free_bytes: int | None = None):
    """(images, what was decided) for a video or audio-video latent."""
    import nodes as comfy_nodes  # ComfyUI's own nodes module: its VAE Decode and VAE Decode (Tiled)
    video = video_latent(samples)
    plan, free_bytes = plan_for(vae, video, free_bytes)

    def decode():
        if plan.tile is None:
            return comfy_nodes.VAEDecode().decode(vae, {"samples": video})[0]
        return comfy_nodes.VAEDecodeTiled().decode(vae, {"samples": video}, plan.tile, plan.overlap,
                                                   plan.frames or ALL_FRAMES,
                                                   plan.temporal_overlap if plan.frames else ALL_FRAMES_OVERLAP)[0]

    def advice() -> str:
        return (f"LTX-2 Quant: out of GPU memory decoding the video ({plan.describe(free_bytes)}). Other programs "
                "may hold GPU memory; a shorter or smaller video needs less. The memory of the failed decode was "
                "released; the next prompt can run.")

    def release() -> None:
        gc.collect()
        comfy.model_management.soft_empty_cache()
    return call_or_advise_on_oom(decode, advice, release), plan.describe(free_bytes)
