"""Text connectors in host memory, streamed to the GPU only when they run (issue #4).

LTX-2.3's two 8-layer text connectors (and the caption projections where they run before them) run
only while the conditioning is encoded (`LTXAVModel.preprocess_text_embeds`, called from
`LTXAV.extra_conds`, once per sampling run), never during a denoising step; in bf16 they are ~3.7 GiB.
With `text_connectors_on_cpu` their layers stay on the patcher's offload device and go through
ComfyUI's own low-VRAM path: every layer is a cast op (`comfy_cast_weights`), whose forward moves
its tensors to the input's device per call (`cast_bias_weight(..., offloadable=True)`; this pack's
quantized Linear moves its packed tensors the same way), from pinned memory where ComfyUI pins.

Two pieces, both ComfyUI extension points, both kept by `ModelPatcher.clone()` (LoRA loaders,
the Compile and Attention nodes clone):
- `StreamingModelPatcher` leaves the streamed layers out of what `ModelPatcher.load` places
  (`_load_list`) and out of the model's size (`model_size`), so a partial load spends its VRAM
  budget on the transformer blocks, ComfyUI frees memory only for what will be resident, and
  `partially_unload` skips them, having nothing to free; before a full load it unpins them;
- `after_load`, an ON_LOAD callback, puts them in low-VRAM state after every load: tensors on the
  offload device (a full load's `model.to(device)` moved them along with everything else: moved
  back; ComfyUI counted the full load as `model_size()`, without them), pinned, `comfy_cast_weights` on
  (`prev_comfy_cast_weights` kept for `wipe_lowvram_weight`), and LoRA patches of their weights as
  per-call `LowVramPatch`es (merged into the host copy instead when the load forces patched
  weights, e.g. for saving: the backup ModelPatcher keeps restores the original on unpatch).
The rule for which modules stream is quant.ltx2.runs_once_per_prompt (quant.memory's VRAM estimate
uses the same rule).
"""

from __future__ import annotations

import logging

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils

from ..quant.ltx2 import runs_once_per_prompt
from ..quant.memory import GIB

log = logging.getLogger("ltx2_quant")

# On the BaseModel (shared by every clone of a patcher): the full names (under the BaseModel, as
# ModelPatcher names modules and weight keys) of the layers that stream, and their bytes.
STREAMED_ATTR = "ltx2_quant_streamed_modules"
STREAMED_BYTES_ATTR = "ltx2_quant_streamed_bytes"
CALLBACK_KEY = "ltx2_quant_text_connectors_on_cpu"
PREFIX = "diffusion_model."


def streamed_modules(patcher) -> frozenset[str]:
    return getattr(patcher.model, STREAMED_ATTR, frozenset())


class StreamingModelPatcher(comfy.model_patcher.ModelPatcher):
    """The classic ModelPatcher, except that the layers named in the model's STREAMED_ATTR are left
    to `after_load` (see the module docstring)."""

    def _load_list(self, *args, **kwargs):
        loading = super()._load_list(*args, **kwargs)
        streamed = streamed_modules(self)
        if not streamed:
            return loading
        # Each entry is sort criteria + (module_mem, name, module, params).
        return [entry for entry in loading if entry[-3] not in streamed]

    def model_size(self):
        # The streamed layers take no GPU memory between runs: what ComfyUI frees for this model, when a
        # load counts as full, and what is left to load are all reckoned without them.
        return super().model_size() - getattr(self.model, STREAMED_BYTES_ATTR, 0)

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        if full_load:
            # A full load ends in model.to(device), which takes the streamed layers along: unpin them
            # first (after_load moves them back and pins them again), else their pinned host pages
            # would outlive the tensors the move replaces.
            for name in streamed_modules(self):
                for param in comfy.utils.get_attr(self.model, name)._parameters:
                    self.unpin_weight(f"{name}.{param}")
        return super().load(device_to, lowvram_model_memory=lowvram_model_memory,
                            force_patch_weights=force_patch_weights, full_load=full_load)


def streams_between(load_device: torch.device, offload_device: torch.device) -> bool:
    """Whether streaming saves anything: the model runs on a device apart from its host memory. Not
    when it is offloaded where it runs (CPU-only ComfyUI, --gpu-only/--highvram), nor on unified
    memory (Apple MPS), where a host copy is no saving."""
    return (load_device != offload_device
            and comfy.model_management.vram_state != comfy.model_management.VRAMState.SHARED)


def connector_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The layers of a BaseModel that run once per prompt and can stream: leaf cast ops
    (`comfy_cast_weights`) holding tensors. Raw parameters of other modules (the connectors'
    learnable registers) stay with the model."""
    dm = model.diffusion_model
    before = bool(getattr(dm, "caption_proj_before_connector", False))
    found = {}
    for name, module in dm.named_modules():
        if not name or not runs_once_per_prompt(name, before) or not hasattr(module, "comfy_cast_weights"):
            continue
        own = dict(module.named_parameters(recurse=False))
        if any(n not in own for n, _ in module.named_parameters()):
            continue  # not a leaf as ModelPatcher._load_list sees it
        if _tensors(module):
            found[PREFIX + name] = module
    return found


def enable(patcher, even_on_one_device: bool = False) -> int:
    """Make `patcher` (a StreamingModelPatcher) keep its text connectors in host memory from its next
    load on; returns how many layers stream. Nothing streams when the model loads to its offload
    device (CPU-only ComfyUI, --gpu-only/--highvram), unless `even_on_one_device` (tests on a
    CPU-only machine: the layers then run through the same low-VRAM path, host to host)."""
    if not isinstance(patcher, StreamingModelPatcher):
        raise TypeError(f"text connectors stream only through {StreamingModelPatcher.__name__}")
    modules = connector_modules(patcher.model)
    if not streams_between(patcher.load_device, patcher.offload_device) and not even_on_one_device:
        modules = {}
    setattr(patcher.model, STREAMED_ATTR, frozenset(modules))
    setattr(patcher.model, STREAMED_BYTES_ATTR, sum(t.nbytes for m in modules.values() for t in _tensors(m)))
    patcher.remove_callbacks_with_key(comfy.patcher_extension.CallbacksMP.ON_LOAD, CALLBACK_KEY)
    if modules:
        patcher.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_LOAD, CALLBACK_KEY, after_load)
    return len(modules)


def _tensors(module: torch.nn.Module):
    return [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]


def after_load(patcher, device_to, lowvram_model_memory, force_patch_weights, full_load) -> None:
    """ON_LOAD callback (ComfyUI's signature): put the streamed layers in low-VRAM state (see the
    module docstring). Idempotent: a load that finds them in host memory moves nothing."""
    streamed = streamed_modules(patcher)
    if not streamed:
        return
    offload = patcher.offload_device
    moved_bytes = 0
    layers = 0
    function_bytes = 0
    patches = 0
    for name in sorted(streamed):
        module = comfy.utils.get_attr(patcher.model, name)
        resident = sum(t.nbytes for t in _tensors(module) if t.device != offload)
        if resident:
            module.to(offload)
            moved_bytes += resident
        module.comfy_force_cast_weights = patcher.force_cast_weights
        for kind in ("weight", "bias"):
            key = f"{name}.{kind}"
            functions = []
            if key in patcher.patches and key not in patcher.backup:  # in backup: already merged
                if force_patch_weights:
                    # Merge (on the load device, like ModelPatcher.load), keeping the original in backup;
                    # the original's pin goes first (unpinning later finds the tensor by its key).
                    patcher.unpin_weight(key)
                    patcher.patch_weight_to_device(key, device_to=device_to)
                    module.to(offload)
                else:
                    _, set_func, convert_func = comfy.model_patcher.get_key_weight(patcher.model, key)
                    functions.append(comfy.model_patcher.LowVramPatch(key, patcher.patches, convert_func, set_func))
                    patches += 1
            functions += patcher.weight_wrapper_patches.get(key, [])
            setattr(module, f"{kind}_function", functions)
        function_bytes += comfy.model_patcher.move_weight_functions(module, device_to)
        if not hasattr(module, "prev_comfy_cast_weights"):
            module.prev_comfy_cast_weights = module.comfy_cast_weights
        module.comfy_cast_weights = True
        for param in module._parameters:
            if module._parameters[param] is not None:
                patcher.pin_weight_to_device(f"{name}.{param}")
        layers += 1
    patcher.model.model_loaded_weight_memory += function_bytes
    streamed_bytes = getattr(patcher.model, STREAMED_BYTES_ATTR)
    log.info("LTX-2 Quant: %d text-connector layers (%.2f GiB) stay in host memory and stream to %s when they "
             "run%s%s", layers, streamed_bytes / GIB, device_to,
             f"; moved {moved_bytes / GIB:.2f} GiB back after the full load" if moved_bytes else "",
             f"; {patches} LoRA patches applied per call" if patches else "")


def describe(patcher, requested: bool) -> str:
    """The load report's line about the text connectors."""
    streamed = streamed_modules(patcher)
    if streamed:
        size = getattr(patcher.model, STREAMED_BYTES_ATTR)
        return (f"text connectors: {len(streamed)} layers ({size / GIB:.2f} GiB) stay in host memory, "
                f"streamed to the GPU once per prompt")
    if requested:
        return "text connectors: on the model's device (it loads where it is offloaded)"
    return ""


def patches_streamed_layers(patcher) -> bool:
    """Whether a LoRA patches a streamed layer (they apply per call unless the load forces patched
    weights: what reads the weights themselves, e.g. saving, must force it)."""
    streamed = streamed_modules(patcher)
    return any(key.rsplit(".", 1)[0] in streamed for key in patcher.patches)
