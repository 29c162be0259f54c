"""Text connectors streamed from host memory (nodes/streaming.py) through ComfyUI's real model
management, in one process: tests/integration/test_text_connectors.py runs it in a subprocess (a fresh
ComfyUI per scenario) and reads the JSON it prints last.

On a CPU-only machine the load and offload devices are both the CPU, so the loader leaves streaming
off; `streaming.enable(..., even_on_one_device=True)` turns it on anyway. Everything else is ComfyUI's
own path: `load_models_gpu` / `ModelPatcher.load` with the pack's `_load_list` and ON_LOAD callback,
the layers' `comfy_cast_weights` forward, `LowVramPatch` LoRA patches, unpatching on unload. What the
CPU cannot show is the host-to-GPU move itself, the pinning, and the VRAM it saves.

usage: python connector_streaming_check.py equal|lora|partial|sizes|pinning
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

import comfy.lora  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.nested_tensor  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.utils  # noqa: E402

from ltx2_quant.nodes import model_io, model_memory, streaming  # noqa: E402
from ltx2_quant.quant import checkpoint, conversion, ltx2  # noqa: E402
from ltx2_quant.quant.load_options import LoadOptions  # noqa: E402
from ltx2_quant.quant.policies import get_policy  # noqa: E402
from ltx2_quant.quant.safetensors_io import MemoryTensors  # noqa: E402

CONFIG = ltx2.tiny_config(num_layers=2, heads=4, head_dim=16, audio_heads=4, audio_head_dim=8)
STATE = ltx2.synthetic_state_dict(CONFIG, seed=3)
METADATA = ltx2.header_metadata(CONFIG)
SIGMAS = [1.0, 0.9875, 0.909375, 0.421875, 0.0]
CONNECTOR_LORA = "video_embeddings_connector.transformer_1d_blocks.0.ff.net.2"
LORA_LAYERS = [CONNECTOR_LORA, "audio_embeddings_connector.transformer_1d_blocks.0.attn1.to_q",
               "transformer_blocks.0.attn1.to_q"]


def build(policy: str, streamed: bool, scope: dict | None = None):
    loaded = conversion.load_converted(MemoryTensors(STATE, METADATA), get_policy(policy, **(scope or {})))
    patcher, _ = model_io.build_model(loaded, LoadOptions(policy, text_connectors_on_cpu=streamed))
    assert not streaming.streamed_modules(patcher)  # load device == offload device here: the loader leaves it off
    if streamed:
        assert streaming.enable(patcher, even_on_one_device=True) == 18  # 9 leaf layers per connector
    return patcher


def inputs(patcher):
    dm = patcher.model.diffusion_model
    width = dm.cross_attention_dim + dm.audio_cross_attention_dim
    g = torch.Generator().manual_seed(1)
    # Raw text-encoder context: the connectors run on it (unprocessed_ltxav_embeds).
    options = {"frame_rate": 24.0, "unprocessed_ltxav_embeds": True}
    positive, negative = ([[torch.randn(1, 16, width, generator=g), dict(options)]] for _ in range(2))
    latent = comfy.nested_tensor.NestedTensor((torch.zeros(1, 128, 2, 2, 3), torch.zeros(1, 8, 10, 16)))
    return latent, positive, negative


def sample(patcher) -> torch.Tensor:
    latent, positive, negative = inputs(patcher)
    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds(positive, negative)
    guider.set_cfg(2.0)
    noise = comfy.sample.prepare_noise(latent, 42)
    out = guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), torch.tensor(SIGMAS),
                        disable_pbar=True, seed=42)
    return torch.cat([t.flatten().float() for t in out.unbind()])


def connector_state(patcher) -> dict:
    """Per streamed layer: its low-VRAM flags and patch functions."""
    out = {}
    for name in streaming.streamed_modules(patcher):
        m = comfy.utils.get_attr(patcher.model, name)
        out[name] = {"cast": bool(m.comfy_cast_weights), "prev": hasattr(m, "prev_comfy_cast_weights"),
                     "functions": len(m.weight_function) + len(m.bias_function),
                     "device": str(next(iter(m.parameters())).device)}
    return out


def connector_weights(patcher) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in patcher.model.state_dict().items()
            if k.rsplit(".", 1)[0] in streaming.streamed_modules(patcher)}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def add_lora(patcher):
    """A rank-4 LoRA on two connector layers and a block layer, as core's LoraLoaderModelOnly adds it."""
    shapes = ltx2.model_shapes(CONFIG)
    g = torch.Generator().manual_seed(5)
    lora = {}
    for layer in LORA_LAYERS:
        out_features, in_features = shapes[layer + ".weight"]
        lora[f"diffusion_model.{layer}.lora_A.weight"] = torch.randn(4, in_features, generator=g) * in_features ** -0.5
        lora[f"diffusion_model.{layer}.lora_B.weight"] = torch.randn(out_features, 4, generator=g) * 0.5
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    patched = patcher.clone()
    added = patched.add_patches(comfy.lora.load_lora(lora, key_map), 1.0)
    assert len(added) == len(LORA_LAYERS), added
    return patched


def scenario_equal() -> dict:
    """Same sampled output with the connectors streamed and resident, over load/unload rounds."""
    result = {}
    for policy, scope in (("bf16", None), ("nvfp4", None), ("fp8-scaled-mm", None),
                          ("fp8-scaled-mm", {"connectors": True})):
        label = policy + (":connectors" if scope else "")
        resident, streamed = build(policy, False, scope), build(policy, True, scope)
        before = connector_weights(streamed)
        ref = sample(resident)
        first = sample(streamed)
        state = connector_state(streamed)
        mm.unload_all_models()
        second = sample(streamed)
        mm.unload_all_models()
        result[label] = {
            "equal": torch.equal(ref, first), "max_diff": float((ref - first).abs().max()),
            "rounds_equal": torch.equal(first, second),
            "state": sorted({(s["cast"], s["prev"], s["functions"]) for s in state.values()}),
            "weights_kept": same(before, connector_weights(streamed)),
            "callback_registered": streaming.CALLBACK_KEY in streamed.callbacks.get("on_load_after", {}),
        }
    return result


def scenario_lora() -> dict:
    """LoRA patches of streamed layers apply per call (LowVramPatch), never twice, and unloading
    leaves the original weights; a forced load (saving) merges them and unloading restores them."""
    result = {}
    for policy, scope in (("bf16", None), ("fp8-scaled-mm", {"connectors": True})):
        label = policy + (":connectors" if scope else "")
        resident, streamed = add_lora(build(policy, False, scope)), add_lora(build(policy, True, scope))
        plain = sample(build(policy, True, scope))
        before = connector_weights(streamed)
        ref = sample(resident)
        first = sample(streamed)
        state = connector_state(streamed)
        during = connector_weights(streamed)
        mm.unload_all_models()
        after_unload = connector_weights(streamed)
        second = sample(streamed)
        mm.unload_all_models()
        # Forced patched weights (what model_save.save_model asks when a LoRA patches a streamed layer).
        assert streaming.patches_streamed_layers(streamed)
        mm.load_models_gpu([streamed], force_full_load=True, force_patch_weights=True)
        merged = connector_weights(streamed)
        merged_state = connector_state(streamed)
        merged_out = sample(streamed)  # the model is loaded already: its merged weights serve
        mm.unload_all_models()
        restored = connector_weights(streamed)
        third = sample(streamed)
        mm.unload_all_models()
        lora_key = f"diffusion_model.{CONNECTOR_LORA}.weight"
        result[label] = {
            "rel_to_resident": rel(first, ref), "lora_effect": rel(plain, ref),
            "rounds_equal": torch.equal(first, second) and torch.equal(first, third),
            "patch_functions": state[f"diffusion_model.{CONNECTOR_LORA}"]["functions"],
            "weights_untouched": same(before, during) and same(before, after_unload) and same(before, restored),
            "merged_changed": not torch.equal(merged[lora_key], before[lora_key]),
            "merged_functions": merged_state[f"diffusion_model.{CONNECTOR_LORA}"]["functions"],
            "merged_rel": rel(merged_out, first),
        }
    return result


def scenario_partial() -> dict:
    """A partial load (the model does not fit) spends its budget on the other layers: the streamed
    ones are never counted or placed by ModelPatcher.load, and the connectors' output is unchanged."""
    result = {}
    for policy in ("bf16", "nvfp4"):
        resident, streamed = build(policy, False), build(policy, True)
        size = streamed.model_size()
        connector_bytes = sum(t.nbytes for t in connector_weights(streamed).values())
        budget = (size - connector_bytes) // 2
        device = streamed.load_device
        streamed.patch_model(device_to=device, lowvram_model_memory=budget)
        loaded = streamed.model.model_loaded_weight_memory
        listed = {entry[-3] for entry in streamed._load_list()}
        _, positive, _ = inputs(streamed)
        ctx = positive[0][0]
        with torch.inference_mode():
            out = streamed.model.diffusion_model.preprocess_text_embeds(ctx, unprocessed=True)
            resident.patch_model(device_to=device)
            ref = resident.model.diffusion_model.preprocess_text_embeds(ctx, unprocessed=True)
        state = connector_state(streamed)
        lowvram = streamed.model.model_lowvram
        streamed.unpatch_model(streamed.offload_device)
        resident.unpatch_model(resident.offload_device)
        result[policy] = {
            "lowvram": lowvram, "loaded_le_budget": loaded <= budget, "loaded": loaded, "budget": budget,
            "listed_streamed": len(listed & streaming.streamed_modules(streamed)),
            "equal": torch.equal(out, ref), "cast": all(s["cast"] for s in state.values()),
            "after_unpatch_prev": any(hasattr(comfy.utils.get_attr(streamed.model, n), "prev_comfy_cast_weights")
                                      for n in streaming.streamed_modules(streamed)),
        }
    return result


def scenario_pinning() -> dict:
    """Pinned host memory across partial load -> partial unload -> growth to a full load, three times
    (a text encoder or VAE takes room between prompts). A full load's `model.to(device)` gives every
    tensor new storage, here too (a stand-in for the host-to-GPU move), so a streamed layer still
    pinned then would leave its old pages registered. ComfyUI's pin/unpin are replaced by a registry
    of data pointers (the CPU cannot pin). Also: the model's size leaves the streamed layers out."""
    registry = {}

    def pin(t):
        if t.device.type != "cpu" or t.data_ptr() in registry:
            return False
        registry[t.data_ptr()] = t.nbytes
        return True

    def unpin(t):
        return registry.pop(t.data_ptr(), None) is not None
    mm.pin_memory, mm.unpin_memory = pin, unpin
    patcher = build("bf16", True)
    move = patcher.model.to

    def move_to_new_storage(*args, **kwargs):
        for module in patcher.model.modules():
            for t in module._parameters.values():
                if t is not None:
                    t.data = t.data.clone()
        return move(*args, **kwargs)
    patcher.model.to = move_to_new_storage
    connector_bytes = sum(t.nbytes for t in connector_weights(patcher).values())
    whole = mm.module_size(patcher.model)
    size = patcher.model_size()
    patcher.patch_model(device_to=patcher.load_device, lowvram_model_memory=size // 2)
    cycles = []
    for _ in range(3):
        patcher.partially_unload(patcher.offload_device, memory_to_free=size // 3)
        patcher.partially_load(patcher.load_device, extra_memory=10 * size)
        live = {t.data_ptr() for t in patcher.model.parameters()}
        cycles.append({"registered": sum(registry.values()),
                       "stale": sum(n for ptr, n in registry.items() if ptr not in live),
                       "loaded": patcher.model.model_loaded_weight_memory})
    patcher.unpatch_model(patcher.offload_device)
    return {"connector_bytes": connector_bytes, "whole": whole, "size": size, "cycles": cycles,
            "after_unpatch": sum(registry.values())}


def scenario_sizes() -> dict:
    """What the loader's `auto` weighs: with the connectors streamed, every policy's bytes less exactly
    the connector layers' (bf16 under every policy's default scope); on this CPU-only ComfyUI
    (offload device = load device) nothing streams."""
    info = checkpoint.inspect_checkpoint(MemoryTensors(STATE, METADATA))
    resident, streamed = model_memory.policy_sizes(info), model_memory.policy_sizes(info, streamed_connectors=True)
    connector_bytes = sum(t.nbytes for key, t in STATE.items()
                          if key.endswith(".weight") and key[: -len(".weight")] in info.layers
                          and ltx2.tensor_runs_once_per_prompt(key, CONFIG))
    return {"connector_bytes": connector_bytes,
            "differences": sorted({resident[name] - streamed[name] for name in resident}),
            "streams_here": model_memory.connectors_stream(mm.get_torch_device(), True)}


if __name__ == "__main__":
    scenario = {"equal": scenario_equal, "lora": scenario_lora, "partial": scenario_partial,
                "sizes": scenario_sizes, "pinning": scenario_pinning}[sys.argv[1]]
    print("RESULT " + json.dumps(scenario()))
