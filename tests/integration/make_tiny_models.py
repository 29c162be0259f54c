"""Write a tiny random full LTX-2.3 checkpoint (transformer + video VAE, as the official single-file
release lays them out) and a tiny random spatial upsampler, built from ComfyUI's own model classes so
ComfyUI's loaders detect and load them. Run in a subprocess with COMFYUI_PATH set (it imports comfy).

usage: python make_tiny_models.py CHECKPOINT_PATH UPSAMPLER_PATH
"""

from __future__ import annotations

import inspect
import json
import os
import sys

COMFYUI_PATH = os.environ["COMFYUI_PATH"]
sys.path.insert(0, COMFYUI_PATH)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True

import torch  # noqa: E402
from comfy.ldm.lightricks.latent_upsampler import LatentUpsampler  # noqa: E402
from comfy.ldm.lightricks.vae.causal_video_autoencoder import VideoVAE  # noqa: E402

from comfy_server import TINY_CONFIG  # noqa: E402
from quant import ltx2  # noqa: E402
from quant.safetensors_io import save_tensors  # noqa: E402

TRANSFORMER = ltx2.tiny_config(**TINY_CONFIG)
# 32x spatial and 8x temporal compression like the real VAE (patch 4, three compress_all), tiny widths.
VAE = {"dims": 3, "in_channels": 3, "out_channels": 3, "latent_channels": 128,
       "encoder_blocks": [["compress_all", 1], ["compress_all", 1], ["compress_all", 1], ["res_x", 1]],
       "decoder_blocks": [["compress_all", 1], ["compress_all", 1], ["compress_all", 1], ["res_x", 1]],
       "encoder_base_channels": 8, "decoder_base_channels": 8, "norm_layer": "pixel_norm", "patch_size": 4,
       "latent_log_var": "uniform", "causal_decoder": False}
UPSAMPLER = {"_class_name": "LatentUpsampler", "in_channels": 128, "mid_channels": 32, "num_blocks_per_stage": 1,
             "dims": 3, "spatial_upsample": True, "temporal_upsample": False, "spatial_scale": 2.0,
             "rational_resampler": False}


def randomized(module: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights (ComfyUI's ops leave them uninitialized), scaled so activations stay O(1)."""
    out = {}
    for name, value in module.state_dict().items():
        if name.endswith("std-of-means"):
            out[name] = torch.rand(value.shape, generator=generator) + 0.5
        elif value.ndim >= 2:
            fan_in = value[0].numel()
            out[name] = torch.randn(value.shape, generator=generator) * fan_in ** -0.5
        else:
            out[name] = torch.randn(value.shape, generator=generator) * 0.1
    return out


def upsampler_operations() -> dict:
    """The op namespace argument, where this ComfyUI's LatentUpsampler takes one (newer trees build
    its convs and norms from `operations`, as their upscale-model loader does)."""
    if "operations" in inspect.signature(LatentUpsampler.from_config).parameters:
        import comfy.ops
        return {"operations": comfy.ops.disable_weight_init}
    return {}


def main(checkpoint_path: str, upsampler_path: str) -> None:
    generator = torch.Generator().manual_seed(11)
    tensors = {ltx2.CHECKPOINT_PREFIX + k: v for k, v in ltx2.synthetic_state_dict(TRANSFORMER, seed=3).items()}
    tensors.update({"vae." + k: v for k, v in randomized(VideoVAE(config=VAE), generator).items()})
    save_tensors(checkpoint_path, tensors, {"config": json.dumps({"transformer": TRANSFORMER, "vae": VAE})})
    upsampler = LatentUpsampler.from_config(UPSAMPLER, **upsampler_operations())
    save_tensors(upsampler_path, randomized(upsampler, generator), {"config": json.dumps(UPSAMPLER)})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
