"""Write tiny random LTX models as the official releases lay them out, built from ComfyUI's own model
classes so ComfyUI's loaders detect and load them. Run in a subprocess with COMFYUI_PATH set (it
imports comfy).

LTX-2.3: a full single-file checkpoint (transformer + video VAE) and a spatial upsampler.
LTX-2.5 (ComfyUI v0.33+): one file per component: the transformer (ComfyUI's LTXAVModel built from the
LTX-2.5 config, checked to be what ComfyUI detects from the written file), the convolutional video VAE,
and the spatial and temporal x2 upsamplers.

The LTX-2 text encoder: a Gemma-3-shaped language model (ComfyUI's Gemma3_12B class with small sizes,
its tokenizer a small SentencePiece model with Gemma's special ids) and an LTX-2.3 text projection whose
video and audio widths are the tiny transformer's, so its conditioning drives the tiny model.

usage: python make_tiny_models.py ltx2.3 CHECKPOINT_PATH UPSAMPLER_PATH
       python make_tiny_models.py ltx2.5 TRANSFORMER_PATH VAE_PATH UPSAMPLER_PATH TEMPORAL_UPSAMPLER_PATH
       python make_tiny_models.py gemma3 TEXT_ENCODER_PATH PROJECTION_CHECKPOINT_PATH
"""

from __future__ import annotations

import inspect
import json
import os
import sys

COMFYUI_PATH = os.environ["COMFYUI_PATH"]
sys.path.insert(0, COMFYUI_PATH)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))  # the repository
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True

import torch  # noqa: E402
from comfy.ldm.lightricks.latent_upsampler import LatentUpsampler  # noqa: E402
from comfy.ldm.lightricks.vae.causal_video_autoencoder import VideoVAE  # noqa: E402

from bench.random_tokenizer import sentencepiece_tokenizer  # noqa: E402
from comfy_server import LTX25_METADATA, TINY_CONFIG, TINY_LTX25_CONFIG  # noqa: E402
from quant import ltx2, text_encoder  # noqa: E402
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
TEMPORAL_UPSAMPLER = {**UPSAMPLER, "spatial_upsample": False, "temporal_upsample": True, "spatial_scale": 1.0}
# ComfyUI's Gemma 3 config takes head_dim as a fixed class attribute (256), so only the other sizes shrink.
TINY_GEMMA = text_encoder.GemmaLayout(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=256)



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


def save_upsampler(path: str, config: dict, generator: torch.Generator) -> None:
    upsampler = LatentUpsampler.from_config(config, **upsampler_operations())
    save_tensors(path, randomized(upsampler, generator), {"config": json.dumps(config)})


def ltx23(checkpoint_path: str, upsampler_path: str) -> None:
    generator = torch.Generator().manual_seed(11)
    tensors = {ltx2.CHECKPOINT_PREFIX + k: v for k, v in ltx2.synthetic_state_dict(TRANSFORMER, seed=3).items()}
    tensors.update({"vae." + k: v for k, v in randomized(VideoVAE(config=VAE), generator).items()})
    save_tensors(checkpoint_path, tensors, {"config": json.dumps({"transformer": TRANSFORMER, "vae": VAE})})
    save_upsampler(upsampler_path, UPSAMPLER, generator)


def comfyui_ltxav(config: dict) -> torch.nn.Module:
    """ComfyUI's LTXAVModel for `config`, on the meta device (shapes only)."""
    import comfy.ops
    from comfy.ldm.lightricks.av_model import LTXAVModel
    with torch.device("meta"):
        return LTXAVModel(**config, operations=comfy.ops.disable_weight_init, dtype=torch.bfloat16)


def ltx25(transformer_path: str, vae_path: str, upsampler_path: str, temporal_upsampler_path: str) -> None:
    import comfy.model_detection
    generator = torch.Generator().manual_seed(12)
    tensors = randomized(comfyui_ltxav(TINY_LTX25_CONFIG), generator)
    # ComfyUI's detection, on the file it will read, must give the model that holds exactly these tensors.
    detected = comfy.model_detection.model_config_from_unet(tensors, "", metadata=LTX25_METADATA)
    built = comfyui_ltxav({k: v for k, v in detected.unet_config.items() if k != "image_model"}).state_dict()
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if type(detected).__name__ != "LTXAV" or {k: tuple(v.shape) for k, v in built.items()} != shapes:
        raise SystemExit(f"ComfyUI detects {type(detected).__name__} {detected.unet_config}, not the LTX-2.5 "
                         "model written")
    if shapes != ltx2.model_shapes(TINY_LTX25_CONFIG):  # e.g. a ComfyUI that builds FFN biases whatever the config
        raise SystemExit("this ComfyUI's LTXAVModel does not build LTX-2.5's layout")
    save_tensors(transformer_path, {ltx2.CHECKPOINT_PREFIX + k: v.bfloat16() for k, v in tensors.items()},
                 LTX25_METADATA)
    save_tensors(vae_path, randomized(VideoVAE(config=VAE), generator), {"config": json.dumps({"vae": VAE})})
    save_upsampler(upsampler_path, UPSAMPLER, generator)
    save_upsampler(temporal_upsampler_path, TEMPORAL_UPSAMPLER, generator)


def gemma3(text_encoder_path: str, projection_path: str) -> None:
    import comfy.ops
    from comfy.text_encoders.llama import Gemma3_12B
    generator = torch.Generator().manual_seed(13)
    with torch.device("meta"):
        model = Gemma3_12B(TINY_GEMMA.comfy_config(), torch.bfloat16, "meta", comfy.ops.disable_weight_init)
    # The language model only: the vision tower (400M parameters whatever the sizes) runs for image prompts.
    language = {k: v for k, v in randomized(model, generator).items() if k.startswith("model.")}
    if {k: tuple(v.shape) for k, v in language.items()} != text_encoder.language_shapes(TINY_GEMMA):
        raise SystemExit("ComfyUI's Gemma3_12B does not build the layout quant/text_encoder.py describes")
    tensors = {k: v.bfloat16() for k, v in language.items()}
    tensors[text_encoder.TOKENIZER_KEY] = sentencepiece_tokenizer(TINY_GEMMA.vocab_size - 64)
    save_tensors(text_encoder_path, tensors)
    widths = ltx2.tiny_config(**TINY_CONFIG)
    outputs = {"video_aggregate_embed": widths["cross_attention_dim"],
               "audio_aggregate_embed": widths["audio_cross_attention_dim"]}
    projection = {}
    for key, shape in text_encoder.projection_shapes(TINY_GEMMA, outputs).items():
        scale = shape[-1] ** -0.5 if len(shape) == 2 else 0.1
        projection[key] = (torch.randn(shape, generator=generator) * scale).bfloat16()
    save_tensors(projection_path, projection)


if __name__ == "__main__":
    {"ltx2.3": ltx23, "ltx2.5": ltx25, "gemma3": gemma3}[sys.argv[1]](*sys.argv[2:])
