"""Model patches as plain functions (no node API imports, so benches and scripts use them too).

torch.compile over each transformer block: Inductor fuses the elementwise tail around the quantized
linears (norms, AdaLN modulation, gating, RoPE, and the per-token FP8 activation quantization into its
producer). Compiled per block, not as a whole model: every block has the same code, so one compiled
graph serves all 48, and ComfyUI's offload and LoRA paths (which act on the modules) keep working."""

from __future__ import annotations

import logging

import torch
from torch.utils._triton import has_triton

from ..quant import runtime
from ..quant.attention import choose_attention, comfy_override
from comfy.patcher_extension import WrappersMP
from comfy_api.torch_helpers.torch_compile import COMPILE_KEY, TORCH_COMPILE_KWARGS, apply_torch_compile_factory

log = logging.getLogger("ltx2_quant")

# Inductor options per mode (torch.compile takes either `mode` or `options`; the guard filter needs options).
# "cuda graphs" also records each block's kernels once and replays them (no per-kernel launch cost).
COMPILE_MODES = {"off": None, "blocks": {}, "blocks, cuda graphs": {"triton.cudagraphs": True},
                 "blocks, max-autotune": {"max_autotune": True}}


# Guards on which keys transformer_options holds and on its type: its structure (an attention override
# present or not), which changes the graph; kept.
STRUCTURE_GUARDS = ("DICT_CONTAINS", "TYPE_MATCH")


def skip_transformer_options_guards(guard_entries):
    """transformer_options' values change per call (sigmas, block index): guarding on them would recompile.
    Kept: its keys, the attention override, and values that are switches (True/False/None, such as LTX's
    run_vx / run_ax branch flags), so a block compiled before the Attention patch was added or removed (or a
    branch switched) runs the graph of the new setting, not a stale one."""
    return [("transformer_options" not in entry.name or "optimized_attention_override" in entry.name
             or entry.guard_type in STRUCTURE_GUARDS
             or (entry.has_value and (entry.value is None or isinstance(entry.value, bool))))
            for entry in guard_entries]


def compile_blocks(patcher, mode: str):
    """(a clone of `patcher` whose transformer blocks run through torch.compile (Inductor) at sampling
    time, report line). Where Inductor has no fast target (a CPU model, or no Triton for the GPU) the
    model is returned unchanged and the report says why: compiling there costs minutes and gains nothing."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"Unknown compile mode {mode!r}; choose one of {list(COMPILE_MODES)}")
    if COMPILE_MODES[mode] is None:
        return patcher, "compile: off"
    blocks = getattr(patcher.model.diffusion_model, "transformer_blocks", None)
    if blocks is None:
        raise ValueError(f"{type(patcher.model.diffusion_model).__name__} has no transformer_blocks to compile")
    device = torch.device(patcher.load_device)
    if device.type != "cuda" or not has_triton():
        why = "the model runs on the CPU" if device.type != "cuda" else "Triton is not installed"
        log.warning("LTX-2 Quant: Compile Blocks skipped: %s", why)
        return patcher, f"compile: skipped ({why}); the model runs uncompiled"
    # One cache entry per block instance and input shape would exceed Dynamo's default limit of 8.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 8 * len(blocks))
    clone = patcher.clone(disable_dynamic=True)
    compile_each_block(clone, [f"diffusion_model.transformer_blocks.{i}" for i in range(len(blocks))],
                       backend="inductor", options=COMPILE_MODES[mode])
    text = f"compile: {mode}, {len(blocks)} transformer blocks (the first step at each new size compiles)"
    log.info("LTX-2 Quant: %s", text)
    return clone, text


def compile_each_block(patcher, keys: list[str], backend: str, options: dict) -> dict:
    """Install torch.compile of each module in `keys` on `patcher` the way ComfyUI's
    set_torch_compile_wrapper does (its wrapper key, so a later compile node replaces ours), but with
    one options dict per block: torch.compile pops `guard_filter_fn` out of the dict it is given, so a
    dict shared by all blocks would leave the filter on the first block's compile only. Returns
    {key: compiled module}."""
    patcher.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, COMPILE_KEY)
    compiled = {key: torch.compile(patcher.get_model_object(key), backend=backend, dynamic=False,
                                   options={"guard_filter_fn": skip_transformer_options_guards, **options})
                for key in keys}
    patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, COMPILE_KEY, apply_torch_compile_factory(compiled))
    patcher.model_options[TORCH_COMPILE_KWARGS] = {"backend": backend, "options": options, "mode": None,
                                                   "fullgraph": False, "dynamic": False}
    return compiled


def patch_attention(model, requested: str):
    """(a clone of `model` whose attention runs the implementation chosen for `requested`, report line).
    The choice is probed on the model's device in its compute dtype; ComfyUI's own attention still
    takes the calls the implementation cannot (masks, other dtypes or head sizes)."""
    device = model.load_device
    name, reason = choose_attention(runtime.capability(device), requested, device,
                                    model.model.get_dtype_inference())
    patched = model.clone()
    options = patched.model_options["transformer_options"]
    replaced = options.get("optimized_attention_override")
    options["optimized_attention_override"] = comfy_override(name)
    text = f"attention: {name} ({reason})"
    if replaced is not None:
        text += f"; replaces an earlier attention override ({getattr(replaced, 'attention', replaced)})"
    return patched, text
