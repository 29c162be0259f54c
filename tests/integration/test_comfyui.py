"""The pack inside a real ComfyUI server (headless, CPU): load a tiny random LTX-2.3 model through the
loader with every policy, sample through /prompt, and compare with bf16; LoRA on quantized models;
saved files loading in a ComfyUI without the pack. Skips when COMFYUI_PATH is unset."""

from __future__ import annotations

import json
import os

import pytest
import torch
from support.comfy_server import (TINY_CONFIG, ComfyServer, loader_node, missing_requirements, rel, sampling_graph, saved_latent,
                                          write_lora, write_tiny_model)
from quant import ltx2

REASON = missing_requirements()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

POLICY_BOUNDS = {"bf16": 1e-6, "fp8-cast": 0.03, "fp8-scaled-mm": 0.03, "mxfp8": 0.03, "nvfp4": 0.08}
LORA_LAYERS = [f"transformer_blocks.{b}.{m}" for b in range(2)
               for m in ("attn1.to_q", "attn1.to_v", "attn2.to_out.0", "ff.net.0.proj", "audio_ff.net.2")]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy")
    models = root / "models" / "diffusion_models"
    loras = root / "models" / "loras"
    models.mkdir(parents=True)
    loras.mkdir(parents=True)
    config = ltx2.tiny_config(**TINY_CONFIG)
    write_tiny_model(models / "ltx2q_test_tiny.safetensors", seed=3)
    write_lora(loras / "ltx2q_test_lora.safetensors", config, LORA_LAYERS, seed=5, b_scale=0.6)
    shapes = ltx2.model_shapes(config)
    calibration_dir = root / "models" / "ltx2_calibration"
    calibration_dir.mkdir()
    amax = {f"{layer[: -len('.weight')]}.input_quantizer": 64.0 for layer in shapes
            if ltx2.BLOCK_LINEAR_RE.match(layer[: -len(".weight")] if layer.endswith(".weight") else "")}
    (calibration_dir / "ltx2q_test_amax.json").write_text(json.dumps({"amax_values": amax}))
    return root


def models_folder(base) -> str:
    return os.path.join(str(base), "models", "diffusion_models")


def sample(server, base, model_node: dict, name: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    server.run(sampling_graph(model_node, name, **kwargs))
    return tuple(saved_latent(base, name).values())


def test_object_info_lists_the_nodes(server):
    info = server.get("/object_info")
    for node in ("LTX2QuantLoader", "LTX2QuantQuantizeModel", "LTX2QuantSave"):
        assert info[node]["category"] == "LTX-2 Quant"
    loader = info["LTX2QuantLoader"]["input"]["required"]
    assert "ltx2q_test_tiny.safetensors" in loader["ckpt_name"][0] if isinstance(loader["ckpt_name"][0], list) \
        else "ltx2q_test_tiny.safetensors" in loader["ckpt_name"][1]["options"]


@pytest.mark.parametrize("policy", ["bf16", "fp8-cast", "fp8-scaled-mm", "mxfp8", "nvfp4", "auto"])
def test_every_policy_samples_close_to_bf16(server, base, policy):
    ref_v, ref_a = sample(server, base, loader_node("ltx2q_test_tiny.safetensors", "bf16"), "ref_bf16")
    v, a = sample(server, base, loader_node("ltx2q_test_tiny.safetensors", policy), f"policy_{policy}")
    assert torch.isfinite(v).all() and torch.isfinite(a).all()
    bound = POLICY_BOUNDS.get(policy, 1e-6)  # auto picks bf16 on a CPU
    assert rel(v, ref_v) < bound and rel(a, ref_a) < bound, (rel(v, ref_v), rel(a, ref_a))
    if policy not in ("bf16", "auto"):
        assert rel(v, ref_v) > 0  # the quantized path really ran


@pytest.mark.parametrize("policy", ["fp8-scaled-mm", "nvfp4"])
def test_text_connectors_scope_quantizes_the_connectors_that_run(server, base, policy):
    """The 'text connectors' scope preset: on raw text-encoder output (the connectors run) the output
    stays close to bf16 and differs from the same policy with bf16 connectors."""
    def run(policy_name, scope, name):
        return sample(server, base, loader_node("ltx2q_test_tiny.safetensors", policy_name, scope=scope), name,
                      unprocessed=True)
    ref = run("bf16", "all block linears", "connectors_ref")
    blocks_only = run(policy, "all block linears", f"connectors_off_{policy}")
    with_connectors = run(policy, "policy default + text connectors", f"connectors_on_{policy}")
    for got, want in zip(with_connectors, ref):
        assert torch.isfinite(got).all() and rel(got, want) < POLICY_BOUNDS[policy], rel(got, want)
    assert rel(with_connectors[0], blocks_only[0]) > 0


def test_audio_8bit_preset_lowers_nvfp4_audio_error(server, base):
    """The 'audio branch 8-bit (nvfp4)' preset: audio-side Linears in FP8, the rest NVFP4; the audio
    stream, whose own Linears were the 4-bit ones, ends closer to bf16 than with plain nvfp4."""
    def run(policy, scope, name):
        return sample(server, base, loader_node("ltx2q_test_tiny.safetensors", policy, scope=scope), name)
    ref = run("bf16", "all block linears", "audio8_ref")
    plain = run("nvfp4", "all block linears", "audio8_off")
    mixed = run("nvfp4", "audio branch 8-bit (nvfp4)", "audio8_on")
    assert all(torch.isfinite(t).all() for t in mixed)
    assert rel(mixed[1], ref[1]) < rel(plain[1], ref[1]), (rel(mixed[1], ref[1]), rel(plain[1], ref[1]))
    assert rel(mixed[0], ref[0]) < POLICY_BOUNDS["nvfp4"]


def test_sigmas_node_gives_the_distilled_schedule(server, base):
    manual = sample(server, base, loader_node("ltx2q_test_tiny.safetensors", "nvfp4"), "sigmas_manual")
    graph = sampling_graph(loader_node("ltx2q_test_tiny.safetensors", "nvfp4"), "sigmas_node")
    graph["5"] = {"class_type": "LTX2QuantSigmas", "inputs": {"preset": "distilled stage 1", "steps": 30,
                                                             "terminal": 0.1}}
    server.run(graph)
    node = tuple(saved_latent(base, "sigmas_node").values())
    assert all(torch.equal(a, b) for a, b in zip(node, manual))
    info = server.get("/object_info/LTX2QuantSigmas")["LTX2QuantSigmas"]
    assert info["category"] == "LTX-2 Quant"
    graph["5"] = {"class_type": "LTX2QuantSigmas", "inputs": {"preset": "LTX-2 scheduler (non-distilled)",
                                                             "steps": 4, "terminal": 0.1, "latent": ["2", 2]}}
    graph["8"]["inputs"]["name"] = "sigmas_scheduler"
    server.run(graph)
    scheduled = tuple(saved_latent(base, "sigmas_scheduler").values())
    assert all(torch.isfinite(t).all() for t in scheduled)
    assert not torch.equal(scheduled[0], node[0])


def test_calibrated_static_scales(server, base):
    ref_v, _ = sample(server, base, loader_node("ltx2q_test_tiny.safetensors", "bf16"), "calib_ref")
    dynamic_v, _ = sample(server, base, loader_node("ltx2q_test_tiny.safetensors", "fp8-scaled-mm"), "calib_dynamic")
    node = loader_node("ltx2q_test_tiny.safetensors", "fp8-scaled-mm", calibration="ltx2q_test_amax.json")
    static_v, _ = sample(server, base, node, "calib_static")
    assert torch.isfinite(static_v).all()
    assert rel(static_v, dynamic_v) > 0  # the static scales were used
    assert rel(static_v, ref_v) < POLICY_BOUNDS["fp8-scaled-mm"]


@pytest.mark.parametrize("sampler", ["gradient_estimation", "euler_ancestral_cfg_pp"])
def test_other_samplers_run_on_a_quantized_model(server, base, sampler):
    v, a = sample(server, base, loader_node("ltx2q_test_tiny.safetensors", "nvfp4"), f"sampler_{sampler}", sampler=sampler)
    assert torch.isfinite(v).all() and torch.isfinite(a).all()


@pytest.mark.parametrize("policy", ["fp8-scaled-mm", "nvfp4"])
def test_lora_changes_quantized_output_like_bf16(server, base, policy):
    lora = {"9": {"class_type": "LoraLoaderModelOnly",
                  "inputs": {"model": ["1", 0], "lora_name": "ltx2q_test_lora.safetensors", "strength_model": 1.0}}}
    base_bf16 = sample(server, base, loader_node("ltx2q_test_tiny.safetensors", "bf16"), "lora_base_bf16")[0]
    lora_bf16 = sample(server, base, loader_node("ltx2q_test_tiny.safetensors", "bf16"), "lora_on_bf16",
                       extra=lora, model_ref=["9", 0])[0]
    base_q = sample(server, base, loader_node("ltx2q_test_tiny.safetensors", policy), f"lora_base_{policy}")[0]
    lora_q = sample(server, base, loader_node("ltx2q_test_tiny.safetensors", policy), f"lora_on_{policy}",
                    extra=lora, model_ref=["9", 0])[0]
    delta_ref, delta_q = (lora_bf16 - base_bf16).flatten(), (lora_q - base_q).flatten()
    assert delta_ref.norm() > 0.05 * base_bf16.norm()  # the LoRA matters
    cosine = float(torch.nn.functional.cosine_similarity(delta_q, delta_ref, dim=0))
    assert cosine > 0.9, cosine
    assert 0.8 < float(delta_q.norm() / delta_ref.norm()) < 1.2


def test_quantize_model_node_matches_the_loader(server, base):
    core = {"class_type": "UNETLoader", "inputs": {"unet_name": "ltx2q_test_tiny.safetensors", "weight_dtype": "default"}}
    quantize = {"9": {"class_type": "LTX2QuantQuantizeModel",
                      "inputs": {"model": ["1", 0], "policy": "fp8-scaled-mm", "nvfp4_mode": "fast",
                                 "scope": "all block linears"}}}
    v, _ = sample(server, base, core, "quantize_node", extra=quantize, model_ref=["9", 0])
    loader_v, _ = sample(server, base, loader_node("ltx2q_test_tiny.safetensors", "fp8-scaled-mm"), "quantize_loader")
    # UNETLoader keeps bf16 weights in ComfyUI's compute dtype; the loader reads the file directly:
    # same quantized weights up to the bf16 -> fp32 path of the non-quantized layers.
    assert rel(v, loader_v) < 0.01


@pytest.mark.parametrize("policy,scope", [("fp8-cast", "all block linears"), ("nvfp4", "all block linears"),
                                          ("mxfp8", "all block linears"),
                                          ("nvfp4", "policy default + text connectors"),
                                          ("nvfp4", "audio branch 8-bit (nvfp4)"),
                                          ("nvfp4", "audio branch + audio-video attention 8-bit (nvfp4)")])
def test_saved_file_loads_without_the_pack(server, base, policy, scope):
    # A name no ComfyUI checkout has: its own model folders come first in the search order.
    name = f"ltx2q_test_saved_{policy}_{len(scope)}_{os.getpid()}.safetensors"
    graph = {"1": loader_node("ltx2q_test_tiny.safetensors", policy, scope=scope),
             "2": {"class_type": "LTX2QuantSave", "inputs": {"model": ["1", 0], "folder": models_folder(base), "filename": name,
                                                             "comfy_compatible": True, "overwrite": True}}}
    server.run(graph)
    assert os.path.exists(os.path.join(base, "models", "diffusion_models", name))
    connectors = "connectors" in scope  # then let them run: raw text-encoder context
    with_pack = sample(server, base, loader_node(name, "bf16"), f"reload_pack_{policy}", unprocessed=connectors)
    plain = ComfyServer(str(base), with_pack=False)
    try:
        assert "LTX2QuantLoader" not in plain.get("/object_info")
        core = {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}
        without_pack = sample(plain, base, core, f"reload_core_{policy}", unprocessed=connectors)
    finally:
        plain.stop()
    # Same stored weights; weight-only policies compute the same function in both. mxfp8 (and the
    # video-token FP8 layers of a mixed nvfp4 model) run W8A8 in the pack (FP8 activations) and
    # dequantized in core's CPU path.
    bound = 0.03 if policy == "mxfp8" or "audio-video" in scope else 2e-3
    for ours, core_out in zip(with_pack, without_pack):
        assert rel(ours, core_out) < bound, (policy, rel(ours, core_out))


def test_save_refuses_to_overwrite_and_bad_names(server, base):
    graph = {"1": loader_node("ltx2q_test_tiny.safetensors", "nvfp4"),
             "2": {"class_type": "LTX2QuantSave", "inputs": {"model": ["1", 0], "folder": models_folder(base),
                                                             "filename": f"ltx2q_test_keep_{os.getpid()}.safetensors",
                                                             "comfy_compatible": True, "overwrite": False}}}
    server.run(graph)
    target = os.path.join(base, "models", "diffusion_models", f"ltx2q_test_keep_{os.getpid()}.safetensors")
    before = os.path.getmtime(target)
    with pytest.raises(RuntimeError, match="exists"):
        server.run({**graph, "2": {**graph["2"], "inputs": {**graph["2"]["inputs"]}}})
    assert os.path.getmtime(target) == before
    escape = {**graph, "2": {"class_type": "LTX2QuantSave",
                             "inputs": {"model": ["1", 0], "folder": models_folder(base),
                                        "filename": "../escape.safetensors",
                                        "comfy_compatible": True, "overwrite": True}}}
    with pytest.raises(RuntimeError, match="plain name"):
        server.run(escape)
    assert not os.path.exists(os.path.join(base, "models", "escape.safetensors"))


@pytest.mark.parametrize("policy", ["nvfp4", "fp8-scaled-mm"])
def test_text_connectors_on_cpu_option_keeps_the_output(server, base, policy):
    """The loader's text_connectors_on_cpu, on and off, on raw text context (the connectors run). On this
    CPU-only server the model loads where it is offloaded, so the report says the connectors stay there;
    tests/integration/test_text_connectors.py streams them through ComfyUI's low-VRAM path."""
    outputs = {}
    for on in (True, False):
        node = loader_node("ltx2q_test_tiny.safetensors", policy, text_connectors_on_cpu=on)
        entry = server.run(sampling_graph(node, f"connectors_cpu_{policy}_{on}", unprocessed=True))
        outputs[on] = saved_latent(base, f"connectors_cpu_{policy}_{on}")
        report = json.dumps(entry["outputs"].get("1", {}))
        assert ("text connectors: on the model's device" in report) == on, report
    assert all(torch.equal(outputs[True][k], outputs[False][k]) for k in outputs[False])
