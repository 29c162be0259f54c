"""Model patches as plain functions (no node API imports, so benches and scripts use them too).

torch.compile over each transformer block: Inductor fuses the elementwise tail around the quantized
linears (norms, AdaLN modulation, gating, RoPE, and the per-token FP8 activation quantization into its
producer). Compiled per block, not as a whole model: every block has the same code, so one compiled
graph serves all 48, and ComfyUI's offload and LoRA paths (which act on the modules) keep working."""

from __future__ import annotations

import logging

import torch
from torch.utils._triton import has_triton

from ..quant.capability import capability
from ..quant.attention import IMPLEMENTATIONS, choose_attention
from .multi_gpu import MULTI_GPU
from comfy_api.torch_helpers import set_torch_compile_wrapper
from .attention_override import comfy_override

log = logging.getLogger("ltx2_quant")

# Inductor options per mode (torch.compile takes either `mode` or `options`).
# "cuda graphs" also records each block's kernels once and replays them (no per-kernel launch cost).
# "tuned kernels" times launch configurations for each fused kernel (coordinate descent): fp8-scaled-mm +
# cudnn-fp8 at 24,576 tokens 1.316 vs 1.330 s/step, for ~2 more minutes on the first compile of each size
# (H200, 48 blocks; kept in Inductor's on-disk cache afterwards; docs/BENCHMARKS.md, "Whole step on Hopper").
COMPILE_MODES = {"off": None, "blocks": {}, "blocks, cuda graphs": {"triton.cudagraphs": True},
                 "blocks, tuned kernels": {"coordinate_descent_tuning": True},
                 "blocks, max-autotune": {"max_autotune": True}}


def refuse_after_multi_gpu(patcher, node: str) -> None:
    """The Multi-GPU patch reads these patches when it is applied (its workers redo them)."""
    if MULTI_GPU in patcher.model_options:
        raise ValueError(f"Connect {node} before LTX-2 Multi-GPU: the GPU workers take the patches the model "
                         f"has when it is split")


def compile_blocks(patcher, mode: str, backend: str = "inductor"):
    """(a clone of `patcher` whose transformer blocks run through torch.compile at sampling time, report
    line). Where Inductor has no fast target (a CPU model, or no Triton for the GPU) the model is returned
    unchanged and the report says why: compiling there costs minutes and gains nothing. (`backend`: tests
    pass Dynamo's "eager", which runs the captured graphs on the CPU without Inductor.)

    Dynamo keeps all its guards, those on `transformer_options` included: an LTX-2.3 block reads only its
    branch flags and the attention override from it, so adding the Attention patch (or flipping a flag)
    recompiles once, and nothing that changes per call (sigmas, block index) is guarded on."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"Unknown compile mode {mode!r}; choose one of {list(COMPILE_MODES)}")
    refuse_after_multi_gpu(patcher, "Compile Blocks")
    if COMPILE_MODES[mode] is None:
        return patcher, "compile: off"
    blocks = getattr(patcher.model.diffusion_model, "transformer_blocks", None)
    if blocks is None:
        raise ValueError(f"{type(patcher.model.diffusion_model).__name__} has no transformer_blocks to compile")
    device = torch.device(patcher.load_device)
    if backend == "inductor" and (device.type != "cuda" or not has_triton()):
        why = "the model runs on the CPU" if device.type != "cuda" else "Triton is not installed"
        log.warning("LTX-2 Quant: Compile Blocks skipped: %s", why)
        return patcher, f"compile: skipped ({why}); the model runs uncompiled"
    # One cache entry per block instance and input shape would exceed Dynamo's default limit of 8.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 8 * len(blocks))
    clone = patcher.clone(disable_dynamic=True)
    set_torch_compile_wrapper(model=clone, backend=backend, dynamic=False, options=COMPILE_MODES[mode],
                              keys=[f"diffusion_model.transformer_blocks.{i}" for i in range(len(blocks))])
    text = f"compile: {mode}, {len(blocks)} transformer blocks (the first step at each new size compiles)"
    log.info("LTX-2 Quant: %s", text)
    return clone, text


def patch_attention(model, requested: str):
    """(a clone of `model` whose attention runs the implementation chosen for `requested`, report line).
    The choice is probed on the model's device in its compute dtype; ComfyUI's own attention still
    takes the calls the implementation cannot (masks, other dtypes or head sizes)."""
    refuse_after_multi_gpu(model, "Quant Attention")
    device = model.load_device
    name, reason = choose_attention(capability(device), requested, device,
                                    model.model.get_dtype_inference())
    patched = model.clone()
    options = patched.model_options["transformer_options"]
    replaced = options.get("optimized_attention_override")
    options["optimized_attention_override"] = comfy_override(IMPLEMENTATIONS[name])
    text = f"attention: {name} ({reason})"
    if replaced is not None:
        text += f"; replaces an earlier attention override ({getattr(replaced, 'attention', replaced)})"
    return patched, text
