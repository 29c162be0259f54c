"""Loading, quantizing and saving LTX-2 models in ComfyUI: the plain functions behind the nodes."""

from __future__ import annotations

import gc
import inspect
import json
import logging
import os
import re
import time

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sd
import comfy.utils
import folder_paths
from comfy.ldm.lightricks.av_model import LTXAVModel

from ..quant import advice, checkpoint, comfy_quant, ltx2, memory, runtime, weights
from ..quant.capability import capability
from ..quant.calibration import layer_input_scale
from ..quant.checkpoint import LoadedCheckpoint
from ..quant.policies import POLICIES, Policy, get_policy, plan, summarize
from ..quant.safetensors_io import MemoryTensors, SafetensorsFile, TensorSpec, check_output_path
from . import streaming
from .ops import compute_device, describe_paths, fuse_ffn_gelu, make_ops, quantized_layers

log = logging.getLogger("ltx2_quant")

# Kept free for activations when `auto` sizes a policy against free VRAM (768x512x121 needs a few GiB).
ACTIVATION_HEADROOM = 6 * 2 ** 30
# Pixels per video latent cell: 32 x 32 spatially, 8 frames (ltx2.md).
LATENT_PIXELS, LATENT_FRAMES = 32, 8
# Workflows move between systems, and many ComfyUI users are on Windows: names it reserves for devices
# (with any extension: "nul.safetensors" is the NUL device there) and characters it forbids are refused
# everywhere.
WINDOWS_DEVICE_NAME = re.compile(r"^(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³])\s*(\..*)?$", re.IGNORECASE)
WINDOWS_FORBIDDEN_CHARACTERS = '<>:"|?*\\'



def progress_bar(total_hint: int = 1):
    """A ComfyUI progress callback that also honours Cancel between tensors."""
    bar = comfy.utils.ProgressBar(total_hint)

    def update(done: int, total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)
    return update


def connectors_stream(device: torch.device, text_connectors_on_cpu: bool) -> bool:
    """Whether a model loaded for `device` will keep its text connectors in host memory (the rule
    streaming.enable applies to the patcher)."""
    return text_connectors_on_cpu and streaming.streams_between(device, comfy.model_management.unet_offload_device())


def policy_sizes(info: checkpoint.CheckpointInfo, streamed_connectors: bool = False) -> dict[str, int]:
    """Weight bytes of the checkpoint's layers under each policy; with `streamed_connectors`, only the
    layers that stay on the GPU."""
    table = info.layer_table()
    if streamed_connectors:
        config = info.config if isinstance(info.config, dict) else {}
        table = [row for row in table if not ltx2.tensor_runs_once_per_prompt(row[0] + ".weight", config)]
    return {name: summarize(plan(POLICIES[name], table, info.num_blocks))["bytes_after"] for name in POLICIES}


def auto_policy(sizes: dict[str, int], device: torch.device) -> tuple[str, str]:
    free = comfy.model_management.get_free_memory(device) if device.type == "cuda" else None
    return advice.choose_auto_policy(capability(device), free, sizes, ACTIVATION_HEADROOM)


def memory_needs(sizes: dict[str, int], config: dict | None, scope: dict, nvfp4_mode: str,
                 latent_shapes=None, text_connectors_on_cpu: bool = True) -> tuple[dict[str, int], str]:
    """GPU memory a run needs per policy, and how it was reckoned: quant.memory's estimate at the
    video's size while sampling (`latent_shapes` as ComfyUI passes them), else the weights plus
    ACTIVATION_HEADROOM."""
    if latent_shapes and len(latent_shapes[0]) == 5:
        _, _, frames, height, width = latent_shapes[0]
        width, height, frames = width * LATENT_PIXELS, height * LATENT_PIXELS, (frames - 1) * LATENT_FRAMES + 1
        device = compute_device()
        device_capability = capability(device) if device.type == "cuda" else memory.FP8_GPU
        needs = {name: memory.estimate_vram(name, width, height, frames, scope=scope, nvfp4_mode=nvfp4_mode,
                                            config=config, capability=device_capability,
                                            text_connectors_on_cpu=text_connectors_on_cpu).total_bytes
                 for name in POLICIES}
        return needs, f"estimated for {width}x{height}x{frames}"
    return ({name: size + ACTIVATION_HEADROOM for name, size in sizes.items()},
            f"its weights plus {ACTIVATION_HEADROOM / 2 ** 30:.0f} GiB for activations")


def advise_on_oom(stage: str, policy_name: str, needs, call):
    """call(); out of GPU memory, the error says which policy or video size would fit (`needs()`
    gives memory_needs' answer, reckoned only then), and the failed call's memory is released
    first (ComfyUI then unloads its models, as for any OOM)."""
    device = compute_device()

    def advice_text() -> str:
        total = comfy.model_management.get_total_memory(device) if device.type == "cuda" else None
        need_bytes, basis = needs()
        return advice.out_of_memory_advice(stage, policy_name, need_bytes, total, basis)

    def release() -> None:
        gc.collect()
        comfy.model_management.soft_empty_cache()
    return advice.call_or_advise_on_oom(call, advice_text, release)


def add_oom_advice(patcher, policy_name: str, sizes: dict[str, int], config: dict | None, scope: dict,
                   nvfp4_mode: str, text_connectors_on_cpu: bool = True) -> None:
    """Sampling that runs out of GPU memory inside the model reports what would fit at that video
    size (an APPLY_MODEL wrapper: the model's frames are gone before ComfyUI's OOM handler unloads
    the models)."""
    def wrapper(executor, *args, **kwargs):
        def needs():
            return memory_needs(sizes, config, scope, nvfp4_mode, kwargs.get("latent_shapes"), text_connectors_on_cpu)
        return advise_on_oom("sampling", policy_name, needs, lambda: executor(*args, **kwargs))
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "ltx2_quant_oom_advice", wrapper)


def apply_calibration(loaded: LoadedCheckpoint, amax: dict[str, float]) -> int:
    """Static input scales for the layers a calibration file covers: FP8 or INT8 scales for W8A8
    layers (not ConvRot ones: a calibrated amax bounds their input, not its rotation), the NVFP4
    activation global scale for NVFP4 layers; returns how many."""
    count = 0
    for layer, value in amax.items():
        conf_key = layer + comfy_quant.CONF_SUFFIX
        if conf_key not in loaded.state_dict:
            continue
        scale = layer_input_scale(comfy_quant.conf_from_tensor(loaded.state_dict[conf_key]), value)
        if scale is not None:
            loaded.state_dict[layer + ".input_scale"] = scale
            count += 1
    return count


def build_model(loaded: LoadedCheckpoint, policy_name: str, nvfp4_mode: str, text_connectors_on_cpu: bool = True):
    """A ComfyUI ModelPatcher over the converted state dict, built with our ops; with
    `text_connectors_on_cpu` its text connectors stay in host memory and stream to the GPU when
    they run (nodes/streaming.py)."""
    device = compute_device()
    ops = make_ops(device, nvfp4_mode)
    options = {"custom_operations": ops, "dtype": torch.bfloat16}
    # Our Linears own tensors besides weight/bias, which the dynamic-VRAM allocator does not know
    # about: use the classic ModelPatcher, whose partial loading and offload handle any module.
    patcher = comfy.sd.load_diffusion_model_state_dict(dict(loaded.state_dict), model_options=options,
                                                       metadata=loaded.metadata, disable_dynamic=True)
    if patcher is None:
        raise ValueError("ComfyUI did not recognise the converted model as LTX-2")
    # The classic patcher plus the streamed layers' rule; it holds no state of its own, and clones
    # (LoRA loaders, the Compile and Attention nodes) keep the class and the ON_LOAD callback.
    if type(patcher) is comfy.model_patcher.ModelPatcher:
        patcher.__class__ = streaming.StreamingModelPatcher
        if text_connectors_on_cpu:
            streaming.enable(patcher)
    patcher.model.ltx2q_metadata = loaded.metadata
    patcher.model.ltx2q_policy = policy_name
    paths = describe_paths(ops)
    moved = fuse_ffn_gelu(patcher.model.diffusion_model)
    if moved:
        paths += (f"\nFFN GELU moved into {moved} quantized Linears (inside their FP8 activation quantization "
                  "on W8A8 GPU paths)")
    return patcher, paths


def report(loaded: LoadedCheckpoint, policy: Policy, why: str, paths: str, seconds: float, extra: str = "") -> str:
    s = summarize(loaded.decisions)
    gib = 2 ** 30
    lines = [f"policy: {policy.name} ({why})",
             f"layers by format: {s['layers_by_format']}",
             f"weights: {s['bytes_before'] / gib:.2f} GiB -> {s['bytes_after'] / gib:.2f} GiB ({s['ratio']:.2f}x smaller)",
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


def convert_and_build(source: SafetensorsFile | MemoryTensors, policy_name: str, nvfp4_mode: str, scope: dict,
                      amax: dict[str, float] | None = None, text_connectors_on_cpu: bool = True):
    """Pick the policy (`auto` sized against free VRAM), quantize `source` tensor by tensor (on the GPU
    when there is one) and build the MODEL (text connectors streamed from host memory when
    `text_connectors_on_cpu`); returns it with the node's report text."""
    start = time.perf_counter()
    device = compute_device()
    info = checkpoint.inspect_checkpoint(source)
    check_comfyui_builds(info)
    why = "chosen by you"
    streams = connectors_stream(device, text_connectors_on_cpu)  # what build_model's patcher will do
    sizes = policy_sizes(info, streams)
    if policy_name == "auto":
        policy_name, why = auto_policy(sizes, device)
    policy = get_policy(policy_name, **scope)
    quantize_on = device if device.type == "cuda" else torch.device("cpu")

    def load_and_build():
        loaded = checkpoint.load_converted(source, policy, progress_bar(len(source.keys())), quantize_on)
        extra = ""
        if amax:
            extra = f"calibrated static activation scales: {apply_calibration(loaded, amax)} layers"
        patcher, paths = build_model(loaded, policy_name, nvfp4_mode, text_connectors_on_cpu)
        extra = "\n".join(filter(None, (extra, streaming.describe(patcher, text_connectors_on_cpu))))
        return patcher, report(loaded, policy, why, paths, time.perf_counter() - start, extra)
    # quant.memory estimates an LTX-2.3/2.5 layout: the file's when its config gives it, else LTX-2.3's.
    layout_keys = (*checkpoint.BLOCK_LAYOUT_KEYS, *checkpoint.MODEL_LAYOUT_KEYS)
    usable = (info.family in checkpoint.CONFIG_FAMILIES and isinstance(info.config, dict)
              and all(k in info.config for k in layout_keys))
    config = info.config if usable else None
    patcher, text = advise_on_oom("loading and quantizing the model", policy_name,
                                  lambda: memory_needs(sizes, config, scope, nvfp4_mode, text_connectors_on_cpu=streams),
                                  load_and_build)
    add_oom_advice(patcher, policy_name, sizes, config, scope, nvfp4_mode, streams)
    return patcher, text


def load_and_quantize(path: str, policy_name: str, nvfp4_mode: str, scope: dict,
                      amax: dict[str, float] | None = None, text_connectors_on_cpu: bool = True):
    with SafetensorsFile(path) as f:
        return convert_and_build(f, policy_name, nvfp4_mode, scope, amax, text_connectors_on_cpu)


def model_metadata(patcher) -> dict[str, str]:
    """The header metadata for a model: the one it was loaded with, or its config rebuilt from
    ComfyUI's model config (models loaded by core loaders)."""
    metadata = getattr(patcher.model, "ltx2q_metadata", None)
    if metadata is not None:
        return dict(metadata)
    unet_config = getattr(patcher.model.model_config, "unet_config", {})
    config = {k: v for k, v in unet_config.items() if isinstance(v, (bool, int, float, str, list, dict, type(None)))}
    return {"config": json.dumps({"transformer": config})}


def quantize_model(patcher, policy_name: str, nvfp4_mode: str, scope: dict, text_connectors_on_cpu: bool = True):
    """A new MODEL with `patcher`'s diffusion model converted to a policy; its LoRA patches and model
    options carry over."""
    diffusion_model = patcher.model.diffusion_model
    if quantized_layers(diffusion_model):
        raise ValueError("this model was already quantized by LTX-2 Quant; quantize the original model instead")
    source = MemoryTensors(diffusion_model.state_dict(), model_metadata(patcher), "the input MODEL")
    new, text = convert_and_build(source, policy_name, nvfp4_mode, scope, text_connectors_on_cpu=text_connectors_on_cpu)
    new.patches = {k: list(v) for k, v in patcher.patches.items()}
    new.patches_uuid = patcher.patches_uuid
    new.model_options = comfy.model_patcher.create_model_options_clone(patcher.model_options)
    return new, text


def safe_output_path(folder: str, filename: str, extension: str = ".safetensors") -> str:
    """`filename` inside `folder`: a bare name, no directories, `extension` added if missing; a name
    that is not printable text, that Windows cannot hold, or that is too long for the folder is refused
    (before anything is computed)."""
    name = filename.strip()
    if not name or os.path.basename(name) != name or name in (".", "..") or "\x00" in name:
        raise ValueError(f"file name {filename!r} must be a plain name without folders")
    if not name.isprintable():
        raise ValueError(f"file name {filename!r} holds characters that are not printable text (a newline, a tab, "
                         "a terminal escape or a lone surrogate)")
    forbidden = sorted(set(name) & set(WINDOWS_FORBIDDEN_CHARACTERS))
    if forbidden:
        raise ValueError(f"file name {filename!r} holds {' '.join(forbidden)}, which Windows does not allow in "
                         "file names")
    if WINDOWS_DEVICE_NAME.match(name):
        raise ValueError(f"file name {filename!r} is a device on Windows (CON, PRN, AUX, NUL, COM0-9 and LPT0-9 are, "
                         "with any extension); choose another name")
    if not name.endswith(extension):
        name += extension
    path = os.path.realpath(os.path.join(folder, name))
    if os.path.dirname(path) != os.path.realpath(folder):
        raise ValueError(f"file name {filename!r} would leave the folder {folder}")
    check_output_path(path)
    return path


def save_model(patcher, folder: str, filename: str, comfy_compatible: bool, overwrite: bool) -> str:
    """Write the diffusion model as a ComfyUI-native file into one of the diffusion_models folders
    (atomically: temp file, fsync, rename), with a progress bar that honours Cancel."""
    if folder not in folder_paths.get_folder_paths("diffusion_models"):
        raise ValueError(f"{folder} is not one of ComfyUI's diffusion_models folders")
    os.makedirs(folder, exist_ok=True)  # ComfyUI lists model folders that may not exist yet
    path = safe_output_path(folder, filename)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; enable overwrite to replace it")
    # Applies LoRA patches; those of streamed layers are merged into their host copy only when forced.
    comfy.model_management.load_models_gpu([patcher], force_full_load=True,
                                           force_patch_weights=streaming.patches_streamed_layers(patcher))
    model = patcher.model.diffusion_model
    layers = quantized_layers(model)
    layer_of_param = {f"{name}.{p}": name for name, m in layers.items() for p in m._parameters if p != "bias"}
    steps: list[checkpoint.Step] = []
    quant_layers: dict[str, dict] = {}
    for key, tensor in model.state_dict().items():
        layer = layer_of_param.get(key)
        if layer is None:
            steps.append(checkpoint.Step([TensorSpec(key, tensor.dtype, tuple(tensor.shape))], lambda tensor=tensor: [tensor]))
            continue
        if not key.endswith(".weight"):
            continue
        module = layers[layer]
        fmt = module.quant.format
        if fmt == weights.FP8_ROWWISE and comfy_compatible:
            fmt = weights.FP8_TENSOR
        quant_layers[layer] = comfy_quant.conf_in_format(module.quant.conf, fmt)
        steps.append(checkpoint.layer_step(
            layer, fmt, module.quant.shape, "input_scale" in module._parameters,
            lambda module=module, fmt=fmt: runtime.to_file_format(module.stored_form(torch.device("cpu")), fmt)))
    metadata = comfy_quant.with_layer_confs(model_metadata(patcher), quant_layers)
    checkpoint.write_quantized(path, steps, metadata, overwrite=overwrite, progress=progress_bar(len(steps)))
    return path


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
