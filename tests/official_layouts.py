"""Quantized layers in the layouts of official files, made by comfy-kitchen (ComfyUI's own quantizer,
the byte-for-byte oracle) rather than by quant.formats, so the pack's reader is checked against an
independent producer. Lightricks' LTX-2.5 transformer files for ComfyUI (`comfy-int8-convrot` and the
distilled NVFP4 file) hold each quantized layer with a `<layer>.comfy_quant` JSON tensor and no
`_quantization_metadata` header."""

from __future__ import annotations

import json

import comfy_kitchen as ck
import torch
from comfy_kitchen.backends.eager.quantization import dequantize_int8_convrot_weight, quantize_int8_convrot_weight

# The per-layer config of the official int8-convrot file: ComfyUI's int8_tensorwise with ConvRot.
INT8_CONVROT_CONF = {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256}
NVFP4_CONF = {"format": "nvfp4"}


def comfy_quant_tensor(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)


def ck_nvfp4(w: torch.Tensor):
    """Lightricks' / ComfyUI's NVFP4 layout, made by comfy-kitchen: (U8 packed, swizzled e4m3 scales, fp32 global)."""
    global_scale = (w.float().abs().amax() / (448.0 * 6.0)).reshape(())
    packed, block_scales = ck.quantize_nvfp4(w.float(), global_scale, pad_16x=True, hi_first=True)
    return packed, block_scales, global_scale


def official_layers(state: dict[str, torch.Tensor], layers: list[str], conf: dict
                    ) -> dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Replace each of `layers` (keys as `state` has them, without `.weight`) by its `conf` form
    (INT8_CONVROT_CONF or NVFP4_CONF) and `<layer>.comfy_quant`, in place. Returns layer ->
    (comfy-kitchen's dequantized weight, the stored tensors)."""
    made = {}
    for layer in layers:
        w = state.pop(layer + ".weight")
        if conf == INT8_CONVROT_CONF:
            q, scale = quantize_int8_convrot_weight(w, conf["convrot_groupsize"])
            tensors = {"weight": q, "weight_scale": scale}
            reference = dequantize_int8_convrot_weight(q, scale, conf["convrot_groupsize"])
        else:
            packed, block_scales, global_scale = ck_nvfp4(w)
            tensors = {"weight": packed, "weight_scale": block_scales, "weight_scale_2": global_scale}
            reference = ck.dequantize_nvfp4(packed, global_scale, block_scales, output_type=torch.float32)
            reference = reference[: w.shape[0], : w.shape[1]]
        state.update({f"{layer}.{suffix}": t for suffix, t in tensors.items()})
        state[layer + ".comfy_quant"] = comfy_quant_tensor(conf)
        made[layer] = (reference, tensors)
    return made
