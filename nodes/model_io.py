"""Loading and quantizing LTX-2 models in ComfyUI: the plain functions behind the Loader and Quantize Model
nodes (saving: model_save.py; memory sizing and advice: model_memory.py)."""

from __future__ import annotations

import inspect
import json
import logging
import os
import time
from dataclasses import replace

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sd
import comfy.utils
import folder_paths
from comfy.ldm.lightricks.av_model import LTXAVModel

from ..quant import checkpoint, comfy_quant, conversion
from ..quant.calibration import layer_input_scale
from ..quant.conversion import LoadedCheckpoint
from ..quant.load_options import LoadOptions
from ..quant.memory import GIB
from ..quant.policies import Policy, get_policy, summarize
from ..quant.safetensors_io import MemoryTensors, SafetensorsFile
from . import streaming
from .model_memory import add_oom_advice, advise_on_oom, auto_policy, connectors_stream, memory_needs, policy_sizes
from .ops import compute_device, describe_paths, fuse_ffn_gelu, make_ops, quantized_layers

log = logging.getLogger("ltx2_quant")



def progress_bar(total_hint: int = 1):
    """A ComfyUI progress callback that also honours Cancel between tensors."""
    bar = comfy.utils.ProgressBar(total_hint)

    def update(done: int, total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)
    return update


def apply_calibration(loaded: LoadedCheckpoint, amax: dict[str, float],
                      channel_amax: dict[str, torch.Tensor] | None = None) -> int:
    """Static input scales for the layers a calibration file covers: FP8 or INT8 scales for W8A8
    layers (not ConvRot ones: a calibrated amax bounds their input, not its rotation), the NVFP4
    activation global scale for NVFP4 layers, a smoothed layer's from the amax of x * pre_quant_scale
    (the same file's `channel_amax`); returns how many."""
    count = 0
    for layer, value in amax.items():
        conf_key = layer + comfy_quant.CONF_SUFFIX
        if conf_key not in loaded.state_dict:
            continue
        scale = layer_input_scale(comfy_quant.conf_from_tensor(loaded.state_dict[conf_key]), value,
                                  (channel_amax or {}).get(layer), loaded.state_dict.get(layer + ".pre_quant_scale"))
        if scale is not None:
            loaded.state_dict[layer + ".input_scale"] = scale
            count += 1
    return count


def build_model(loaded: LoadedCheckpoint, options: LoadOptions):
    """A ComfyUI ModelPatcher over the converted state dict, built with our ops, for `options.policy`
    (a policy's name, not "auto"); with `options.text_connectors_on_cpu` its text connectors stay in
    host memory and stream to the GPU when they run (nodes/streaming.py)."""
    device = compute_device()
    ops = make_ops(device, options.nvfp4_mode)
    model_options = {"custom_operations": ops, "dtype": torch.bfloat16}
    # Our Linears own tensors besides weight/bias, which the dynamic-VRAM allocator does not know
    # about: use the classic ModelPatcher, whose partial loading and offload handle any module.
    patcher = comfy.sd.load_diffusion_model_state_dict(dict(loaded.state_dict), model_options=model_options,
                                                       metadata=loaded.metadata, disable_dynamic=True)
    if patcher is None:
        raise ValueError("ComfyUI did not recognise the converted model as LTX-2")
    # The classic patcher plus the streamed layers' rule; it holds no state of its own, and clones
    # (LoRA loaders, the Compile and Attention nodes) keep the class and the ON_LOAD callback.
    if type(patcher) is comfy.model_patcher.ModelPatcher:
        patcher.__class__ = streaming.StreamingModelPatcher
        if options.text_connectors_on_cpu:
            streaming.enable(patcher)
    patcher.model.ltx2_quant_metadata = loaded.metadata
    patcher.model.ltx2_quant_policy = options.policy
    paths = describe_paths(ops)
    moved = fuse_ffn_gelu(patcher.model.diffusion_model)
    if moved:
        paths += (f"\nFFN GELU moved into {moved} quantized Linears (inside their FP8 activation quantization "
                  "on W8A8 GPU paths)")
    return patcher, paths


def outlier_report(loaded: LoadedCheckpoint) -> str:
    """How many layers got smoothing and a low-rank branch, and the branches' bytes ("" for none)."""
    smoothed = sum(key.endswith(".pre_quant_scale") for key in loaded.state_dict)
    branches = [key for key in loaded.state_dict if key.endswith(".low_rank_down")]
    if not smoothed and not any(d.outliers.low_rank_bytes for d in loaded.decisions):
        return ""
    branch_bytes = sum(loaded.state_dict[k].nbytes + loaded.state_dict[k.replace("_down", "_up")].nbytes
                       for k in branches)
    return (f"outlier handling: {smoothed} layers smoothed, {len(branches)} with a low-rank branch "
            f"({branch_bytes / 2 ** 20:.1f} MiB)")


def report(loaded: LoadedCheckpoint, policy: Policy, why: str, paths: str, seconds: float, extra: str = "") -> str:
    s = summarize(loaded.decisions)
    lines = [f"policy: {policy.name} ({why})",
             f"layers by format: {s['layers_by_format']}",
             f"weights: {s['bytes_before'] / GIB:.2f} GiB -> {s['bytes_after'] / GIB:.2f} GiB ({s['ratio']:.2f}x smaller)",
             f"load + quantize: {seconds:.1f} s", "kernel paths:", paths or "(no quantized layers)"]
    if extra:
        lines.append(extra)
    return "\n".join(lines)


def check_comfyui_builds(info: checkpoint.CheckpointInfo) -> None:
    """A ComfyUI older than LTX-2.5 (v0.33) builds it with FFN biases and prompt AdaLN embedders the
    file does not have, and leaves them uninitialized: noise, with no error. Say so instead."""
    if info.family == "ltx2.5" and "ff_bias" not in inspect.signature(LTXAVModel.__init__).parameters:
        raise ValueError(f"{os.path.basename(info.path)} is an LTX-2.5 transformer, which this ComfyUI cannot build "
                         "(its LTX model has no bias-free feed-forward layers). Update ComfyUI: LTX-2.5 runs on "
                         "ComfyUI 0.33 and newer.")


def convert_and_build(source: SafetensorsFile | MemoryTensors, options: LoadOptions):
    """Pick the policy (`auto` sized against free VRAM), quantize `source` tensor by tensor (on the GPU
    when there is one) and build the MODEL (text connectors streamed from host memory when
    `options.text_connectors_on_cpu`); returns it with the node's report text."""
    start = time.perf_counter()
    device = compute_device()
    info = checkpoint.inspect_checkpoint(source)
    check_comfyui_builds(info)
    why = "chosen by you"
    streams = connectors_stream(device, options.text_connectors_on_cpu)  # what build_model's patcher will do
    sizes = policy_sizes(info, streams, options.outliers)
    if options.policy == "auto":
        chosen, why = auto_policy(sizes, device)
        options = replace(options, policy=chosen)
    policy = replace(get_policy(options.policy, **options.scope), outliers=options.outliers)
    quantize_on = device if device.type == "cuda" else torch.device("cpu")

    def load_and_build():
        loaded = conversion.load_converted(source, policy, progress_bar(len(source.keys())), quantize_on,
                                           options.channel_amax, options.calibration)
        extra = "\n".join(filter(None, (outlier_report(loaded), options.amax and (
            f"calibrated static activation scales: {apply_calibration(loaded, options.amax, options.channel_amax)} "
            "layers"))))
        patcher, paths = build_model(loaded, options)
        extra = "\n".join(filter(None, (extra, streaming.describe(patcher, options.text_connectors_on_cpu))))
        return patcher, report(loaded, policy, why, paths, time.perf_counter() - start, extra)
    # quant.memory estimates an LTX-2.3/2.5 layout: the file's when its config gives it, else LTX-2.3's.
    layout_keys = (*checkpoint.BLOCK_LAYOUT_KEYS, *checkpoint.MODEL_LAYOUT_KEYS)
    usable = (info.family in checkpoint.CONFIG_FAMILIES and isinstance(info.config, dict)
              and all(k in info.config for k in layout_keys))
    config = info.config if usable else None
    held = replace(options, text_connectors_on_cpu=streams)  # sized as the patcher will hold the model
    patcher, text = advise_on_oom("loading and quantizing the model", options.policy,
                                  lambda: memory_needs(sizes, config, held), load_and_build)
    add_oom_advice(patcher, sizes, config, held)
    return patcher, text


def load_and_quantize(path: str, options: LoadOptions):
    with SafetensorsFile(path) as f:
        return convert_and_build(f, options)


def model_metadata(patcher) -> dict[str, str]:
    """The header metadata for a model: the one it was loaded with, or its config rebuilt from
    ComfyUI's model config (models loaded by core loaders)."""
    metadata = getattr(patcher.model, "ltx2_quant_metadata", None)
    if metadata is not None:
        return dict(metadata)
    unet_config = getattr(patcher.model.model_config, "unet_config", {})
    config = {k: v for k, v in unet_config.items() if isinstance(v, (bool, int, float, str, list, dict, type(None)))}
    return {"config": json.dumps({"transformer": config})}


def quantize_model(patcher, options: LoadOptions):
    """A new MODEL with `patcher`'s diffusion model converted to a policy; its LoRA patches and model
    options carry over."""
    diffusion_model = patcher.model.diffusion_model
    if quantized_layers(diffusion_model):
        raise ValueError("this model was already quantized by LTX-2 Quant; quantize the original model instead")
    source = MemoryTensors(diffusion_model.state_dict(), model_metadata(patcher), "the input MODEL")
    new, text = convert_and_build(source, options)
    new.patches = {k: list(v) for k, v in patcher.patches.items()}
    new.patches_uuid = patcher.patches_uuid
    new.model_options = comfy.model_patcher.create_model_options_clone(patcher.model_options)
    return new, text


def official_or_local(name: str) -> tuple[str | None, str]:
    """(full path or None, folder name) for a loader choice: local files in diffusion_models or
    checkpoints, else an official file that may be downloaded."""
    for folder in ("diffusion_models", "checkpoints"):
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return path, folder
    return None, ""


VAE_PREFIX = "vae."


def load_vae(path: str):
    """The LTX-2 video VAE from a full checkpoint, reading only its `vae.` tensors (the transformer in the
    same file is never read)."""
    with SafetensorsFile(path) as f:
        keys = [k for k in f.keys() if k.startswith(VAE_PREFIX)]
        if not keys:
            raise ValueError(f"{path} has no '{VAE_PREFIX}*' tensors: pick a full LTX-2 checkpoint (from "
                             f"checkpoints), not a transformer-only file")
        state_dict = {k[len(VAE_PREFIX):]: f.read(k) for k in keys}
        metadata = f.metadata
    return comfy.sd.VAE(sd=state_dict, metadata=metadata)
