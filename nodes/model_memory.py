"""GPU memory in ComfyUI: each policy's weight bytes for a file, `auto`'s choice against the free memory,
and the out-of-memory advice that says which policy or video size would fit (the numbers and the text
come from quant/memory.py and quant/advice.py)."""

from __future__ import annotations

import gc
from dataclasses import replace

import comfy.model_management
import comfy.patcher_extension
import torch

from ..quant import advice, checkpoint, ltx2, memory
from ..quant.capability import capability
from ..quant.load_options import LoadOptions
from ..quant.memory import GIB
from ..quant.outliers import NONE as NO_OUTLIERS, Outliers
from ..quant.policies import POLICIES, plan, summarize
from . import streaming
from .ops import compute_device

# Kept free for activations when `auto` sizes a policy against free VRAM (768x512x121 needs a few GiB).
ACTIVATION_HEADROOM = 6 * GIB
# Pixels per video latent cell: 32 x 32 spatially, 8 frames (ltx2.md).
LATENT_PIXELS, LATENT_FRAMES = 32, 8


def connectors_stream(device: torch.device, text_connectors_on_cpu: bool) -> bool:
    """Whether a model loaded for `device` will keep its text connectors in host memory (the rule
    streaming.enable applies to the patcher)."""
    return text_connectors_on_cpu and streaming.streams_between(device, comfy.model_management.unet_offload_device())


def policy_sizes(info: checkpoint.CheckpointInfo, streamed_connectors: bool = False,
                 handling: Outliers = NO_OUTLIERS) -> dict[str, int]:
    """Weight bytes of the checkpoint's layers under each policy with the outlier `handling` (its tensors
    at their bound, memory.outlier_bytes); with `streamed_connectors`, only the layers that stay on the GPU."""
    table = info.layer_table()
    if streamed_connectors:
        config = info.config if isinstance(info.config, dict) else {}
        table = [row for row in table if not ltx2.tensor_runs_once_per_prompt(row[0] + ".weight", config)]
    sizes = {}
    for name in POLICIES:
        decisions = plan(replace(POLICIES[name], outliers=handling), table, info.num_blocks)
        sizes[name] = summarize(decisions)["bytes_after"] + sum(map(memory.outlier_bytes, decisions))
    return sizes


def auto_policy(sizes: dict[str, int], device: torch.device) -> tuple[str, str]:
    free = comfy.model_management.get_free_memory(device) if device.type == "cuda" else None
    return advice.choose_auto_policy(capability(device), free, sizes, ACTIVATION_HEADROOM)


def memory_needs(sizes: dict[str, int], config: dict | None, options: LoadOptions,
                 latent_shapes=None) -> tuple[dict[str, int], str]:
    """GPU memory a run needs per policy, and how it was reckoned: quant.memory's estimate at the
    video's size while sampling (`latent_shapes` as ComfyUI passes them), else the weights plus
    ACTIVATION_HEADROOM."""
    if latent_shapes and len(latent_shapes[0]) == 5:
        _, _, frames, height, width = latent_shapes[0]
        width, height, frames = width * LATENT_PIXELS, height * LATENT_PIXELS, (frames - 1) * LATENT_FRAMES + 1
        device = compute_device()
        device_capability = capability(device) if device.type == "cuda" else memory.FP8_GPU
        needs = {name: memory.estimate_vram(name, width, height, frames, scope=options.scope,
                                            nvfp4_mode=options.nvfp4_mode, config=config,
                                            capability=device_capability,
                                            text_connectors_on_cpu=options.text_connectors_on_cpu,
                                            handling=options.outliers).total_bytes
                 for name in POLICIES}
        return needs, f"estimated for {width}x{height}x{frames}"
    return ({name: size + ACTIVATION_HEADROOM for name, size in sizes.items()},
            f"its weights plus {ACTIVATION_HEADROOM / GIB:.0f} GiB for activations")


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


def add_oom_advice(patcher, sizes: dict[str, int], config: dict | None, options: LoadOptions) -> None:
    """Sampling that runs out of GPU memory inside the model reports what would fit at that video
    size (an APPLY_MODEL wrapper: the model's frames are gone before ComfyUI's OOM handler unloads
    the models). `options` as the model was loaded (its policy resolved)."""
    def wrapper(executor, *args, **kwargs):
        def needs():
            return memory_needs(sizes, config, options, kwargs.get("latent_shapes"))
        return advise_on_oom("sampling", options.policy, needs, lambda: executor(*args, **kwargs))
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "ltx2_quant_oom_advice", wrapper)
