"""Random weights of the real shapes for every model of the distilled LTX-2.3 workflow (bench_workflow.py):
the transformer, video VAE, audio VAE + vocoder and text projection in one single-file checkpoint (as the
release), Gemma 3 12B as ComfyUI's text-encoder file, the x2 upsampler; and the FP8 files stock ComfyUI
reads (per-tensor scales) for core's fp8 template. Each file is written once, streamed tensor by tensor."""

from __future__ import annotations

import inspect
import json
import os
import zlib

import torch

from bench.random_tokenizer import sentencepiece_tokenizer
from quant import comfy_quant, conversion, ltx2, text_encoder, weights
from quant.policies import get_policy
from quant.safetensors_io import SafetensorsFile, TensorSpec, parse_json, write_streaming

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOKENIZER_VOCAB = 256
# ltx2.md: Conv3d 128 -> 1024, 4 ResBlocks, Conv2d + PixelShuffle(2), 4 ResBlocks, Conv3d 1024 -> 128.
UPSAMPLER_CONFIG = {"_class_name": "LatentUpsampler", "in_channels": 128, "mid_channels": 1024,
                    "num_blocks_per_stage": 4, "dims": 3, "spatial_upsample": True, "temporal_upsample": False,
                    "spatial_scale": 2.0, "rational_resampler": False}


def random_tensor(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """bf16 with std 1/sqrt(fan in) (0.02 for vectors; statistics kept positive), seeded by the key."""
    generator = torch.Generator(device=DEVICE).manual_seed(zlib.crc32(key.encode()))
    if key.endswith("std-of-means"):
        values = torch.rand(shape, generator=generator, device=DEVICE) + 0.5
    else:
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        std = fan_in ** -0.5 if len(shape) >= 2 else 0.02
        values = torch.randn(shape, generator=generator, device=DEVICE) * std
    return values.to(torch.bfloat16).cpu()


def module_shapes(build) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of a ComfyUI module, built on the meta device."""
    with torch.device("meta"):
        module = build()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def write(path: str, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str] | None = None,
          extra: dict[str, torch.Tensor] | None = None) -> None:
    specs = [TensorSpec(k, torch.bfloat16, s) for k, s in shapes.items()]
    specs += [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in (extra or {}).items()]
    tensors = (random_tensor(s.name, s.shape) if s.name in shapes else extra[s.name] for s in specs)
    write_streaming(path, specs, tensors, metadata)


def checkpoint_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    from comfy.ldm.lightricks.vae.audio_vae import AudioVAE
    from comfy.ldm.lightricks.vae.causal_video_autoencoder import VideoVAE
    shapes = {ltx2.CHECKPOINT_PREFIX + k: s for k, s in ltx2.model_shapes(config["transformer"]).items()}
    shapes.update({"vae." + k: s for k, s in module_shapes(lambda: VideoVAE(config=config["vae"])).items()})
    audio = module_shapes(lambda: AudioVAE({"config": config}))
    renamed = {"autoencoder.": "audio_vae.", "vocoder.": "vocoder."}  # the file's names for ComfyUI's modules
    for key, shape in audio.items():
        prefix = next((p for p in renamed if key.startswith(p)), None)
        if prefix is not None:
            shapes[renamed[prefix] + key[len(prefix):]] = shape
    shapes.update(text_encoder.projection_shapes(text_encoder.GEMMA3_12B))
    return shapes


def gemma_fp8(source: str, path: str) -> None:
    """ComfyUI's scaled-FP8 text-encoder layout as stock ComfyUI reads it: Gemma's Linears per-tensor FP8
    with `.comfy_quant` configs, the rest as stored."""
    from quant.safetensors_io import SafetensorsFile
    with SafetensorsFile(source) as f:
        specs, makers = [], []
        for key in f.keys():
            layer = key[: -len(".weight")]
            if key.endswith(".weight") and text_encoder.LINEAR_RE.match(layer):
                shape = tuple(f.tensors[key].shape)
                conf = comfy_quant.conf_tensor(weights.conf_for_format(weights.FP8_TENSOR))
                step = conversion.layer_step(layer, weights.FP8_TENSOR, shape, False, lambda key=key: weights.quantize_weight(
                    f.read(key).to(DEVICE).float(), weights.FP8_TENSOR).to("cpu"))
                specs += [*step.specs, TensorSpec(layer + ".comfy_quant", torch.uint8, tuple(conf.shape))]
                makers.append(lambda step=step, conf=conf: [*step.make(), conf])
            else:
                specs.append(TensorSpec(key, f.tensors[key].dtype, tuple(f.tensors[key].shape)))
                makers.append(lambda key=key: [f.read(key)])
        write_streaming(path, specs, (t for make in makers for t in make()), {})


def write_all(path: dict, config_from: str | None) -> None:
    if config_from is None:
        raise SystemExit("full-size runs need --config-from <a release LTX-2.3 checkpoint>: the video VAE, audio VAE "
                         "and vocoder shapes come from its header's config (only the header is read)")
    config = header_config(config_from)
    if not os.path.exists(path["checkpoint"]):
        write(path["checkpoint"], checkpoint_shapes(config), {"config": json.dumps(config)})
    if not os.path.exists(path["checkpoint_fp8"]):
        conversion.quantize_file(path["checkpoint"], path["checkpoint_fp8"],
                                 get_policy("fp8-scaled-mm", fp8_per_tensor=True), device=DEVICE)
    if not os.path.exists(path["gemma"]):
        shapes = {**text_encoder.language_shapes(text_encoder.GEMMA3_12B),
                  **text_encoder.vision_shapes(text_encoder.GEMMA3_12B.hidden_size)}
        write(path["gemma"], shapes, extra={text_encoder.TOKENIZER_KEY: sentencepiece_tokenizer(TOKENIZER_VOCAB)})
    if not os.path.exists(path["gemma_fp8"]):
        gemma_fp8(path["gemma"], path["gemma_fp8"])
    if not os.path.exists(path["upsampler"]):
        import comfy.ops
        from comfy.ldm.lightricks.latent_upsampler import LatentUpsampler
        # Newer ComfyUIs build the upsampler's convs and norms from an op namespace, as their loader does.
        takes_ops = "operations" in inspect.signature(LatentUpsampler.from_config).parameters
        ops = {"operations": comfy.ops.disable_weight_init} if takes_ops else {}
        shapes = module_shapes(lambda: LatentUpsampler.from_config(UPSAMPLER_CONFIG, **ops))
        write(path["upsampler"], shapes, {"config": json.dumps(UPSAMPLER_CONFIG)})


def header_config(path: str) -> dict:
    """The `config` JSON of a release checkpoint's header (only the header is read)."""
    with SafetensorsFile(path) as f:
        if "config" not in f.metadata:
            raise SystemExit(f"{path}: no 'config' in its header; --config-from takes a release LTX-2.3 checkpoint")
        return parse_json(f.metadata["config"])
