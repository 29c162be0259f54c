"""The pack's text-encoder loader (nodes/text_encoder.py) on the tiny Gemma-3-shaped model, in one ComfyUI
process (CPU): tests/integration/test_text_encoder_comfyui.py runs it in a subprocess and reads the JSON
it prints last.

usage: python text_encoder_check.py GEMMA_FILE PROJECTION_CHECKPOINT WORK_FOLDER
"""

from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(REPO, "scripts"))
from comfyui_pack import import_pack  # noqa: E402

import_pack(cpu=True)
import torch  # noqa: E402

from ltx2_quant.nodes import text_encoder as nodes_te  # noqa: E402
from ltx2_quant.quant import text_encoder as te  # noqa: E402
from ltx2_quant.quant.formats import FP8_DTYPE, fp8_scale, quantize_fp8  # noqa: E402
from ltx2_quant.quant.policies import POLICIES  # noqa: E402
from ltx2_quant.quant.safetensors_io import CheckpointError, SafetensorsFile, save_tensors  # noqa: E402


def layers_by_format(loaded) -> dict:
    counts: dict[str, int] = {}
    for d in loaded.decisions:
        if len(d.shape) == 2:
            counts[d.target_format] = counts.get(d.target_format, 0) + 1
    return counts


def policies(gemma: str, projection: str) -> dict:
    """Every policy against the files as stored (bf16): agreement, bytes, formats, the conditioning's shape."""
    out = {}
    for name in POLICIES:
        clip, _, agreement, loaded = nodes_te.load_text_encoder(gemma, projection, name, compare_to_bf16=True)
        out[name] = {"agreement": agreement, "weight_bytes": loaded.weight_bytes, "formats": layers_by_format(loaded),
                     "shape": list(nodes_te.encode(clip).shape)}
    return out


def offload(gemma: str, projection: str) -> dict:
    """Resident, partially loaded (ComfyUI's low-VRAM path: layers cast per call) and device=cpu encode alike."""
    clip, _, _, loaded = nodes_te.load_text_encoder(gemma, projection, "fp8-scaled-mm")
    resident = nodes_te.encode(clip)
    patcher = clip.patcher
    patcher.unpatch_model()
    budget = patcher.model_size() // 4
    patcher.patch_model(device_to=patcher.load_device, lowvram_model_memory=budget)
    # ComfyUI marks the layers a partial load leaves offloaded (cast to the device per call) this way.
    offloaded = sum(1 for m in patcher.model.modules()
                    if hasattr(m, "prev_comfy_cast_weights") and getattr(m, "quant", None) is not None)
    partial = nodes_te.encode(clip)
    cpu_clip, _, _, _ = nodes_te.load_text_encoder(gemma, projection, "fp8-scaled-mm", device_choice="cpu")
    return {"offloaded_quantized_layers": offloaded, "partial_equal": torch.equal(resident, partial),
            "cpu_equal": torch.equal(resident, nodes_te.encode(cpu_clip))}


def saved(gemma: str, projection: str, folder: str) -> dict:
    """A quantized Gemma saved and loaded back: kept as stored (policy bf16, or the same policy), same output."""
    out = {}
    for name in ("fp8-scaled-mm", "int8-convrot", "nvfp4"):
        clip, _, _, loaded = nodes_te.load_text_encoder(gemma, projection, name)
        path = nodes_te.save_text_encoder(loaded, os.path.join(folder, f"saved_{name}.safetensors"))
        expected = nodes_te.encode(clip)
        again = {}
        for policy in ("bf16", name):
            reloaded_clip, _, _, reloaded = nodes_te.load_text_encoder(path, projection, policy)
            again[policy] = {"equal": torch.equal(expected, nodes_te.encode(reloaded_clip)),
                             "formats": layers_by_format(reloaded)}
        out[name] = {"formats": layers_by_format(loaded), "reloaded": again}
    return out


def scaled_fp8(gemma: str, projection: str, folder: str) -> dict:
    """ComfyUI's older scaled-FP8 text-encoder layout (`scaled_fp8` marker, `scale_weight`): read as stored."""
    tensors = {}
    with SafetensorsFile(gemma) as f:
        for key in f.keys():
            tensor = f.read(key)
            layer = key[: -len(".weight")]
            if key.endswith(".weight") and te.LINEAR_RE.match(layer):
                scale = fp8_scale(tensor.float())
                tensors[key] = quantize_fp8(tensor.float(), scale)
                tensors[layer + ".scale_weight"] = scale.reshape(1)
            else:
                tensors[key] = tensor
    tensors[te.SCALED_FP8_MARKER] = torch.empty(0, dtype=FP8_DTYPE)
    path = os.path.join(folder, "gemma_fp8_scaled.safetensors")
    save_tensors(path, tensors)
    out = {}
    for policy in ("bf16", "fp8-scaled-mm", "nvfp4"):
        _, _, agreement, loaded = nodes_te.load_text_encoder(path, projection, policy, compare_to_bf16=True)
        out[policy] = {"formats": layers_by_format(loaded), "agreement": agreement}
    bf16_clip, _, _, _ = nodes_te.load_text_encoder(gemma, projection, "bf16")
    fp8_clip, _, _, _ = nodes_te.load_text_encoder(path, projection, "bf16")
    out["vs_bf16_file"] = nodes_te.conditioning_agreement(nodes_te.encode(bf16_clip), nodes_te.encode(fp8_clip), None)
    return out


def out_of_memory(gemma: str, projection: str) -> dict:
    """Gemma running out of GPU memory mid-encode (raised where its forward runs): the pack's advice."""
    clip, _, _, _ = nodes_te.load_text_encoder(gemma, projection, "fp8-scaled-mm")

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    clip.cond_stage_model.gemma3_12b.encode_token_weights = exhausted
    try:
        nodes_te.encode(clip)
    except torch.OutOfMemoryError as e:
        return {"message": str(e)}
    return {"message": None}


def refusals(gemma: str, projection: str) -> dict:
    out = {}
    for label, args in {"projection_as_gemma": (projection, projection), "gemma_as_checkpoint": (gemma, gemma)}.items():
        try:
            te.load_text_encoder(*args, POLICIES["fp8-scaled-mm"])
            out[label] = None
        except CheckpointError as e:
            out[label] = str(e)
    return out


if __name__ == "__main__":
    gemma_path, projection_path, work = sys.argv[1:4]
    result = {"policies": policies(gemma_path, projection_path), "offload": offload(gemma_path, projection_path),
              "saved": saved(gemma_path, projection_path, work),
              "scaled_fp8": scaled_fp8(gemma_path, projection_path, work),
              "out_of_memory": out_of_memory(gemma_path, projection_path),
              "refusals": refusals(gemma_path, projection_path)}
    print("RESULT " + json.dumps(result))
