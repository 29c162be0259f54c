"""The Save node's work: a loaded model written as a ComfyUI-native quantized file into a diffusion_models
folder, under a file name every system can hold."""

from __future__ import annotations

import os
import re

import torch

import comfy.model_management
import folder_paths

from ..quant import comfy_quant, conversion, runtime, weights
from ..quant.safetensors_io import TensorSpec, check_output_path
from . import streaming
from .model_io import model_metadata, progress_bar
from .ops import quantized_layers

# Workflows move between systems, and many ComfyUI users are on Windows: names it reserves for devices
# (with any extension: "nul.safetensors" is the NUL device there) and characters it forbids are refused
# everywhere.
WINDOWS_DEVICE_NAME = re.compile(r"^(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³])\s*(\..*)?$", re.IGNORECASE)
WINDOWS_FORBIDDEN_CHARACTERS = '<>:"|?*\\'


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
    model = patcher.model.diffusion_model
    layers = quantized_layers(model)
    if comfy_compatible:  # before anything is loaded or written
        for layer, module in layers.items():
            why = conversion.stock_refusal(layer, module.quant.format, module._parameters)
            if why:
                option = "low_rank" if "low_rank_down" in module._parameters else "smooth"
                raise ValueError(f"{why}. Turn comfy_compatible off to keep it (the file then loads only with this "
                                 f"pack), or load the model with {option} 0 (the Loader's or Quantize node's input)")
    # Applies LoRA patches; those of streamed layers are merged into their host copy only when forced.
    comfy.model_management.load_models_gpu([patcher], force_full_load=True,
                                           force_patch_weights=streaming.patches_streamed_layers(patcher))
    layers = quantized_layers(model)  # again: object patches (static scales) swap layers in as the model loads
    layer_of_param = {f"{name}.{p}": name for name, m in layers.items() for p in m._parameters if p != "bias"}
    steps: list[conversion.Step] = []
    quant_layers: dict[str, dict] = {}
    for key, tensor in model.state_dict().items():
        layer = layer_of_param.get(key)
        if layer is None:
            spec = TensorSpec(key, tensor.dtype, tuple(tensor.shape))
            steps.append(conversion.Step([spec], lambda tensor=tensor: [tensor]))
            continue
        if not key.endswith(".weight"):
            continue
        module = layers[layer]
        fmt = module.quant.format
        if fmt == weights.FP8_ROWWISE and comfy_compatible:
            fmt = weights.FP8_TENSOR
        quant_layers[layer] = comfy_quant.conf_in_format(module.quant.conf, fmt)
        down = module._parameters.get("low_rank_down")
        steps.append(conversion.layer_step(
            layer, fmt, module.quant.shape, "input_scale" in module._parameters,
            lambda module=module, fmt=fmt: runtime.to_file_format(module.stored_form(torch.device("cpu")), fmt),
            "pre_quant_scale" in module._parameters, 0 if down is None else down.shape[0]))
    metadata = comfy_quant.with_layer_confs(model_metadata(patcher), quant_layers)
    conversion.write_quantized(path, steps, metadata, overwrite=overwrite, progress=progress_bar(len(steps)))
    return path
