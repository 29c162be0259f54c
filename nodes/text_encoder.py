"""The LTX-2 text encoder quantized at load, built as ComfyUI's LTXAVTextEncoderLoader builds it: ComfyUI's
LTXAVTEModel (Gemma 3 + the LTX projection) and CLIP wrapper, with this pack's op namespace, so ComfyUI's
model management loads, offloads and partially loads it like any text encoder."""

from __future__ import annotations

import gc
import json
import os
import time

import torch

import comfy.model_management
import comfy.ops
import comfy.sd
import comfy.text_encoders.lt as comfy_lt
import folder_paths

from ..quant import text_encoder as te
from ..quant.advice import call_or_advise_on_oom, text_encoder_out_of_memory_advice
from ..quant.policies import POLICIES, get_policy, summarize
from ..quant.quality import cosine_similarity
from ..quant.safetensors_io import save_tensors
from ..quant.weights import QuantizedWeight, format_from_conf
from .model_io import progress_bar
from .model_save import safe_output_path
from .ops import compute_device, describe_paths, make_ops

# The prompt the node compares bf16 and quantized conditioning on (fixed, so numbers compare across runs).
REFERENCE_PROMPT = ("A woman with long brown hair walks along a beach at sunset, waves rolling in, the camera "
                    "tracking her from the side; she turns and smiles as seagulls call overhead.")
# ComfyUI's LTXAVTEModel builds its projection only for the types it names; the pack builds it from the file.
PROJECTION_BUILT_BY_PACK = "built from the file by LTX-2 Quant"


def text_encoder_ops(device: torch.device) -> type:
    """The pack's op namespace with an Embedding that reads a row-quantized table (FP8, one scale per
    row): each token's row is gathered where the table lives and dequantized there, so an offloaded
    table moves only the prompt's rows."""
    base = make_ops(device)

    class LTX2QuantTextEncoderOps(base):
        class Embedding(base.Embedding):
            quant: str | None = None

            def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs):
                conf_tensor = state_dict.pop(prefix + "comfy_quant", None)
                if conf_tensor is None:
                    return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                         unexpected_keys, error_msgs)
                conf = json.loads(bytes(conf_tensor.tolist()).decode("utf-8"))
                stored = {s: state_dict.pop(prefix + s) for s in ("weight", "weight_scale") if prefix + s in state_dict}
                qw = QuantizedWeight.from_tensors(format_from_conf(conf), (self.num_embeddings, self.embedding_dim),
                                                  stored)
                self.weight = torch.nn.Parameter(qw.data, requires_grad=False)
                self.weight_scale = torch.nn.Parameter(qw.scale, requires_grad=False)
                self.quant = qw.format

            def forward(self, input, out_dtype=None):
                if self.quant is None:
                    return super().forward(input, out_dtype=out_dtype)
                comfy.ops.run_every_op()
                ids = input.to(self.weight.device)
                rows = self.weight[ids].float() * self.weight_scale[ids].float()
                return rows.to(input.device, out_dtype or torch.bfloat16)

    return LTX2QuantTextEncoderOps


def oom_advice(loaded: te.LoadedTextEncoder, policy_name: str) -> str:
    """The advice after an encode ran out of GPU memory: the text encoder's weights per policy at these
    files' shapes (with the vision tower, which ComfyUI builds whether the file holds it or not), and the
    GPU's size."""
    device = compute_device()
    sizes = {name: te.weight_bytes(policy, loaded.layout, loaded.projection_outputs)
             for name, policy in POLICIES.items()}
    total = comfy.model_management.get_total_memory(device) if device.type == "cuda" else None
    return text_encoder_out_of_memory_advice(policy_name, sizes, total)


def text_encoder_model(loaded: te.LoadedTextEncoder, policy_name: str):
    """ComfyUI's LTXAVTEModel for these files: its Gemma from ComfyUI's Gemma 3 12B class (sizes read from
    the file, so a smaller Gemma-3-shaped model builds too) and the projection of the checkpoint's shapes;
    an encode that runs out of GPU memory ends with the pack's advice."""
    dtype_llama = loaded.gemma["model.norm.weight"].dtype
    gemma_config = None if loaded.layout == te.GEMMA3_12B else loaded.layout.comfy_config()
    outputs = loaded.projection_outputs

    class LTX2QuantTextEncoderModel(comfy_lt.LTXAVTEModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            if gemma_config is not None:  # ComfyUI's SDClipModel reads config overrides from this key
                model_options = {**model_options, "_model_config": gemma_config}
            super().__init__(dtype_llama=dtype_llama, device=device, dtype=dtype_llama,
                             text_projection_type=PROJECTION_BUILT_BY_PACK, model_options=model_options)
            config = self.gemma3_12b.transformer.model.config
            inputs = config.hidden_size * (config.num_hidden_layers + 1)
            ops = self.gemma3_12b.operations
            if "video_aggregate_embed" in outputs:
                self.text_projection_type = "dual_linear"
                self.text_embedding_projection = comfy_lt.DualLinearProjection(
                    inputs, outputs["video_aggregate_embed"], outputs["audio_aggregate_embed"], dtype=dtype_llama,
                    device=device, operations=ops)
            else:
                self.text_projection_type = "single_linear"
                self.text_embedding_projection = ops.Linear(inputs, outputs[""], bias=False, dtype=dtype_llama,
                                                            device=device)

        def encode_token_weights(self, token_weight_pairs):
            encode = super().encode_token_weights
            return call_or_advise_on_oom(lambda: encode(token_weight_pairs), lambda: oom_advice(loaded, policy_name),
                                         forget_dropped_models)

        def load_sd(self, sd):
            if any(k.startswith("model.layers.") for k in sd):  # ComfyUI tells Gemma by its 48th layer
                return self.gemma3_12b.load_sd(sd)
            return super().load_sd(sd)

    return LTX2QuantTextEncoderModel


def build_clip(loaded: te.LoadedTextEncoder, policy_name: str, device_choice: str, ops: type):
    """A ComfyUI CLIP holding the converted text encoder (as comfy.sd.load_clip builds one)."""
    target = type("ClipTarget", (), {})()
    target.params, target.tokenizer = {}, comfy_lt.LTXAVGemmaTokenizer
    target.clip = text_encoder_model(loaded, policy_name)
    model_options: dict = {"custom_operations": ops}
    if device_choice == "cpu":
        model_options["load_device"] = model_options["offload_device"] = torch.device("cpu")
    return comfy.sd.CLIP(target, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                         tokenizer_data={"spiece_model": loaded.gemma[te.TOKENIZER_KEY]},
                         parameters=loaded.weight_bytes // 2, state_dict=[loaded.gemma, loaded.projection],
                         model_options=model_options)


def encode(clip, prompt: str = REFERENCE_PROMPT) -> torch.Tensor:
    """The conditioning LTX's connectors receive for `prompt` (video and audio context side by side)."""
    with torch.no_grad():
        return clip.encode_from_tokens(clip.tokenize(prompt)).detach().float().cpu()


def forget_dropped_models() -> None:
    """After the last reference to a model is dropped: collect it and let ComfyUI forget it and its memory."""
    gc.collect()
    comfy.model_management.cleanup_models()
    comfy.model_management.soft_empty_cache()


def conditioning_agreement(reference: torch.Tensor, quantized: torch.Tensor, video_width: int | None) -> dict:
    """Cosine of the quantized conditioning to the bf16 one (all features; video and audio parts)."""
    out = {"cosine": cosine_similarity(quantized, reference),
           "relative_error": float((quantized - reference).norm() / reference.norm().clamp_min(1e-30))}
    if video_width is not None and reference.shape[-1] > video_width:
        out["video_cosine"] = cosine_similarity(quantized[..., :video_width], reference[..., :video_width])
        out["audio_cosine"] = cosine_similarity(quantized[..., video_width:], reference[..., video_width:])
    return out


def size_text(nbytes: int) -> str:
    return f"{nbytes / 2 ** 30:.2f} GiB" if nbytes >= 2 ** 30 else f"{nbytes / 2 ** 20:.2f} MiB"


def load_text_encoder(gemma_path: str, checkpoint_path: str, policy_name: str, device_choice: str = "default",
                      compare_to_bf16: bool = False):
    """(CLIP, report text, measured agreement or None, the converted state). With `compare_to_bf16` the
    files are first loaded as stored, the reference prompt encoded and that model dropped, then loaded quantized."""
    policy = get_policy(policy_name)
    agreement = None
    reference = None
    if compare_to_bf16 and policy.weight_format is not None:
        stored = te.load_text_encoder(gemma_path, checkpoint_path, get_policy("bf16"))
        reference_clip = build_clip(stored, "bf16", device_choice, text_encoder_ops(compute_device()))
        del stored
        reference = encode(reference_clip)
        reference_clip.patcher.detach(unpatch_all=True)
        del reference_clip
        forget_dropped_models()
    start = time.perf_counter()
    device = compute_device()
    ops = text_encoder_ops(device)
    # Quantizing on the GPU is what keeps NVFP4's scale search to seconds; ComfyUI moves the model later.
    loaded = te.load_text_encoder(gemma_path, checkpoint_path, policy, device if device.type == "cuda" else "cpu",
                                  progress_bar())
    clip = build_clip(loaded, policy.name, device_choice, ops)
    seconds = time.perf_counter() - start
    summary = summarize([d for d in loaded.decisions if len(d.shape) == 2])
    lines = [f"policy {policy.name}: matrices {size_text(summary['bytes_before'])} -> "
             f"{size_text(summary['bytes_after'])} "
             f"({size_text(loaded.weight_bytes)} with norms and biases), matrices by format "
             f"{summary['layers_by_format']}, loaded in {seconds:.1f} s"]
    paths = describe_paths(ops)
    if paths:
        lines.append(paths)
    if reference is not None:
        video_width = loaded.projection_outputs.get("video_aggregate_embed")
        agreement = conditioning_agreement(reference, encode(clip), video_width)
        parts = ", ".join(f"{k} {v:.5f}" for k, v in agreement.items())
        lines.append(f"conditioning vs the file as stored, on a fixed prompt: {parts}")
    return clip, "\n".join(lines), agreement, loaded


def save_path(filename: str) -> str:
    """Where `filename` goes in the first text_encoders folder; refused (before anything is loaded) if
    the name is not a safe file name or the file exists."""
    folder = folder_paths.get_folder_paths("text_encoders")[0]
    os.makedirs(folder, exist_ok=True)  # ComfyUI lists model folders that may not exist yet
    path = safe_output_path(folder, filename)
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; choose another name (the text encoder loader never replaces a file)")
    return path


def save_text_encoder(loaded: te.LoadedTextEncoder, path: str) -> str:
    """Write the converted Gemma (each quantized layer with its `.comfy_quant` config, the tokenizer
    kept, atomically); the node loads it back as it is."""
    save_tensors(path, loaded.gemma, {"ltx2_quant": json.dumps({"text_encoder": True})})
    return path
