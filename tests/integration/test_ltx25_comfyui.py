"""LTX-2.5 end to end in a real ComfyUI server (headless, CPU), on tiny random models that ComfyUI's own
classes built and its detection reads back as LTX-2.5 (make_tiny_models.py ltx2.5: the transformer,
the convolutional video VAE, the spatial and temporal x2 upsamplers, one file each as the release
ships them): the loader with every policy, the two-stage sampler and the latent upscaler, LoRAs on the
bias-free FFN Linears, saved files and the official int8-convrot and NVFP4 layouts loading in stock
ComfyUI without the pack. On a ComfyUI without LTX-2.5 only the loader's refusal runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from support.comfy_server import (HERE, LTX25_METADATA, REPO, TINY_LTX25_CONFIG, ComfyServer, loader_node, ltx25_missing,
                                          missing_requirements, rel, sampling_graph, saved_latent, write_lora)
from quant import ltx2, weights
from quant.policies import POLICIES
from quant.safetensors_io import SafetensorsFile, save_tensors

sys.path.insert(0, os.path.join(REPO, "tests"))
from official_layouts import INT8_CONVROT_CONF, NVFP4_CONF, official_layers  # noqa: E402

REASON = missing_requirements()
NO_LTX25 = REASON or ltx25_missing()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")
needs_ltx25 = pytest.mark.skipif(NO_LTX25 is not None, reason=NO_LTX25 or "")

TRANSFORMER = "ltx2q_test_ltx25.safetensors"
VAE = "ltx2q_test_ltx25_vae.safetensors"
UPSAMPLER = "ltx2q_test_ltx25_upsampler.safetensors"
TEMPORAL_UPSAMPLER = "ltx2q_test_ltx25_temporal_upsampler.safetensors"
OFFICIAL = {"int8-convrot": ("ltx2q_test_ltx25_comfy_int8_convrot.safetensors", INT8_CONVROT_CONF),
            "nvfp4": ("ltx2q_test_ltx25_nvfp4.safetensors", NVFP4_CONF)}
LORA = "ltx2q_test_ltx25_lora.safetensors"
# The bias-free FFN Linears and an attention projection of each block.
LORA_LAYERS = [f"transformer_blocks.{b}.{m}" for b in range(2)
               for m in ("ff.net.0.proj", "ff.net.2", "audio_ff.net.2", "attn1.to_v")]
BLOCK_LINEARS = [k[: -len(".weight")] for k in ltx2.model_shapes(TINY_LTX25_CONFIG)
                 if k.endswith(".weight") and ltx2.BLOCK_LINEAR_RE.match(k[: -len(".weight")])]
# Relative L2 distance of the final latents from bf16's, per policy: the LTX-2.3 suite's bounds
# (test_comfyui.POLICY_BOUNDS) with the INT8 W8A8 policies at fp8-scaled-mm's.
POLICY_BOUNDS = {"bf16": 1e-6, "fp8-cast": 0.03, "fp8-scaled-mm": 0.03, "int8-scaled-mm": 0.03, "int8-convrot": 0.03,
                 "mxfp8": 0.03, "nvfp4": 0.08}

# Relative L2 distance of the pack's final latents from stock ComfyUI's on the same file. Same stored
# weights; on the CPU stock ComfyUI runs every FP8/MXFP8/NVFP4 layer weight-only, as the pack does
# fp8-cast's and NVFP4's (runtime.REFERENCE): the same function. The pack emulates the other 8-bit
# formats' W8A8 there, core its own INT8 (test_comfyui.test_saved_file_loads_without_the_pack).
PACK_VS_CORE_BOUNDS = {policy: 2e-3 if policy in ("fp8-cast", "nvfp4") else 0.03 for policy in POLICIES}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy_ltx25")
    folders = {name: root / "models" / name for name in ("diffusion_models", "vae", "latent_upscale_models", "loras")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    if NO_LTX25 is not None:  # a synthetic LTX-2.5 file, for the refusal
        save_tensors(folders["diffusion_models"] / TRANSFORMER, ltx2.synthetic_state_dict(TINY_LTX25_CONFIG),
                     LTX25_METADATA)
        return root
    subprocess.run([sys.executable, os.path.join(HERE, "make_tiny_models.py"), "ltx2.5",
                    str(folders["diffusion_models"] / TRANSFORMER), str(folders["vae"] / VAE),
                    str(folders["latent_upscale_models"] / UPSAMPLER),
                    str(folders["latent_upscale_models"] / TEMPORAL_UPSAMPLER)], check=True)
    with SafetensorsFile(folders["diffusion_models"] / TRANSFORMER) as f:
        bf16 = {key: f.read(key) for key in f.keys()}
    for name, conf in OFFICIAL.values():
        state = dict(bf16)
        official_layers(state, [ltx2.CHECKPOINT_PREFIX + layer for layer in BLOCK_LINEARS], conf)
        save_tensors(folders["diffusion_models"] / name, state, LTX25_METADATA)
    # Deltas at 0.6x the weights' own size (b_scale 0.3, rank 4; output change 12%). At the LTX-2.3
    # suite's 0.6 they are 1.2x the weights and saturate the NVFP4 blocks of these 256-wide FFN Linears,
    # whose scales a merged LoRA keeps (weights.requantize_like): LoRA-on-nvfp4 vs LoRA-on-bf16 0.11
    # (0.021 without the LoRA), delta norm ratio 0.81 at the bound's edge; at 0.3: 0.048, ratio 0.98.
    write_lora(folders["loras"] / LORA, TINY_LTX25_CONFIG, LORA_LAYERS, seed=5, b_scale=0.3)
    return root


@pytest.fixture(scope="module")
def plain(base):
    """A ComfyUI without the pack (stock v0.33 reading the files)."""
    s = ComfyServer(str(base), with_pack=False)
    yield s
    s.stop()


def sample(server, base, model_node: dict, name: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(video, audio, the model node's report) of one sampling_graph run."""
    entry = server.run(sampling_graph(model_node, name, **kwargs))
    return (*saved_latent(base, name).values(), json.dumps(entry["outputs"].get("1", {})))


def core_loader(name: str) -> dict:
    return {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}


@pytest.mark.skipif(NO_LTX25 is None, reason="this ComfyUI runs LTX-2.5")
def test_a_comfyui_without_ltx25_refuses_it(server):
    with pytest.raises(RuntimeError, match="is an LTX-2.5 transformer, which this ComfyUI cannot build"):
        server.run(sampling_graph(loader_node(TRANSFORMER, "nvfp4"), "refused"))


@needs_ltx25
@pytest.mark.parametrize("policy", list(POLICIES))
def test_every_policy_samples_close_to_bf16(server, base, policy):
    ref_v, ref_a, _ = sample(server, base, loader_node(TRANSFORMER, "bf16"), "ref_bf16")
    v, a, report = sample(server, base, loader_node(TRANSFORMER, policy), f"policy_{policy}")
    assert torch.isfinite(v).all() and torch.isfinite(a).all()
    bound = POLICY_BOUNDS[policy]
    assert rel(v, ref_v) < bound and rel(a, ref_a) < bound, (rel(v, ref_v), rel(a, ref_a))
    if policy != "bf16":
        assert rel(v, ref_v) > 0  # the quantized path really ran
        assert f"policy: {policy}" in report


def two_stage_graph(name: str, policy: str, upscale_weights: str = "as loaded") -> dict:
    """The pack's loader and two-stage sampler, core's VAELoader and LatentUpscaleModelLoader on the
    LTX-2.5 files."""
    return {
        "1": loader_node(TRANSFORMER, policy),
        "2": {"class_type": "LTX2QTestInputs", "inputs": {"model": ["1", 0], "seed": 1, "frames": 9,
                                                          "height": 128, "width": 128}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "4": {"class_type": "LatentUpscaleModelLoader", "inputs": {"model_name": UPSAMPLER}},
        "5": {"class_type": "LTX2QuantTwoStageSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 1], "latent": ["2", 2],
            "upscale_model": ["4", 0], "vae": ["3", 0], "noise_seed": 42,
            "sampler": "euler_ancestral_cfg_pp / euler_cfg_pp", "ge_gamma": 2.0, "cfg": 1.0,
            "upscale_weights": upscale_weights}},
        "6": {"class_type": "LTX2QTestSaveLatent", "inputs": {"samples": ["5", 0], "name": name}},
    }


@needs_ltx25
@pytest.mark.parametrize("policy", list(POLICIES))
def test_two_stage_with_every_policy(server, base, policy):
    server.run(two_stage_graph("two_stage_bf16", "bf16"))
    server.run(two_stage_graph(f"two_stage_{policy}", policy, "fp8" if policy == "nvfp4" else "as loaded"))
    ref, out = saved_latent(base, "two_stage_bf16"), saved_latent(base, f"two_stage_{policy}")
    assert out["video"].shape == (1, 128, 2, 4, 4) and out["audio"].shape == (1, 8, 10, 16)
    assert all(bool(torch.isfinite(t).all()) for t in out.values())
    # Two stages with ancestral noise carry the quantization error further than one: the LTX-2.3
    # suite's two-stage bound (test_two_stage.py).
    assert rel(out["video"], ref["video"]) < 0.15 and rel(out["audio"], ref["audio"]) < 0.15


@needs_ltx25
def test_temporal_upsampler_through_the_latent_upscale_node(server, base):
    """LTX-2.5's temporal x2 upsampler: the pack's Latent Upscale equals core's LTXVLatentUpsampler
    (2F-1 latent frames), and its FP8-stored weights stay close."""
    graph = {
        "1": loader_node(TRANSFORMER, "bf16"),
        "2": {"class_type": "LTX2QTestInputs", "inputs": {"model": ["1", 0], "seed": 1, "frames": 17,
                                                          "height": 64, "width": 64}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "4": {"class_type": "LatentUpscaleModelLoader", "inputs": {"model_name": TEMPORAL_UPSAMPLER}},
        "5": {"class_type": "LTXVSeparateAVLatent", "inputs": {"av_latent": ["2", 2]}},
        "6": {"class_type": "LTXVLatentUpsampler", "inputs": {"samples": ["5", 0], "upscale_model": ["4", 0],
                                                              "vae": ["3", 0]}},
        "7": {"class_type": "LTX2QuantLatentUpscale", "inputs": {"samples": ["5", 0], "upscale_model": ["4", 0],
                                                                 "vae": ["3", 0], "weights": "as loaded"}},
        "8": {"class_type": "LTX2QuantLatentUpscale", "inputs": {"samples": ["5", 0], "upscale_model": ["4", 0],
                                                                 "vae": ["3", 0], "weights": "fp8"}},
    }
    for node, name in (("6", "temporal_core"), ("7", "temporal_ours"), ("8", "temporal_fp8")):
        graph[f"s{node}"] = {"class_type": "LTX2QTestSaveLatent", "inputs": {"samples": [node, 0], "name": name}}
    server.run(graph)
    core, ours, fp8 = (saved_latent(base, n)["video"] for n in ("temporal_core", "temporal_ours", "temporal_fp8"))
    assert core.shape == (1, 128, 5, 2, 2)  # 3 latent frames -> 2*3-1
    torch.testing.assert_close(ours, core, rtol=1e-5, atol=1e-5)
    assert 0 < rel(fp8, core) < 0.05


@needs_ltx25
@pytest.mark.parametrize("policy", ["nvfp4", "int8-convrot"])
def test_lora_on_the_bias_free_ffns_changes_quantized_output_like_bf16(server, base, policy):
    lora = {"9": {"class_type": "LoraLoaderModelOnly",
                  "inputs": {"model": ["1", 0], "lora_name": LORA, "strength_model": 1.0}}}
    base_bf16 = sample(server, base, loader_node(TRANSFORMER, "bf16"), "lora_base_bf16")[0]
    lora_bf16 = sample(server, base, loader_node(TRANSFORMER, "bf16"), "lora_on_bf16", extra=lora,
                       model_ref=["9", 0])[0]
    base_q = sample(server, base, loader_node(TRANSFORMER, policy), f"lora_base_{policy}")[0]
    lora_q = sample(server, base, loader_node(TRANSFORMER, policy), f"lora_on_{policy}", extra=lora,
                    model_ref=["9", 0])[0]
    delta_ref, delta_q = (lora_bf16 - base_bf16).flatten(), (lora_q - base_q).flatten()
    assert delta_ref.norm() > 0.05 * base_bf16.norm()  # the LoRA matters
    # The LTX-2.3 suite's bounds (test_comfyui.test_lora_changes_quantized_output_like_bf16).
    assert float(torch.nn.functional.cosine_similarity(delta_q, delta_ref, dim=0)) > 0.9
    assert 0.8 < float(delta_q.norm() / delta_ref.norm()) < 1.2


@needs_ltx25
def test_stg_perturbs_a_quantized_model_as_it_does_bf16(server, base):
    """LTX-2.5's STG switch (core's LTXVSpatioTemporalGuidance: block 1's self-attention passes its
    values through in an extra pass) on a quantized model: the same change as on bf16."""
    def run(policy, stg):
        extra = {"9": {"class_type": "LTXVSpatioTemporalGuidance",
                       "inputs": {"model": ["1", 0], "scale": 1.0, "blocks": "1", "start_percent": 0.0,
                                  "end_percent": 1.0}}} if stg else None
        return sample(server, base, loader_node(TRANSFORMER, policy), f"stg_{policy}_{stg}", extra=extra,
                      model_ref=["9", 0] if stg else None)[0]
    plain_bf16, stg_bf16, plain_q, stg_q = run("bf16", False), run("bf16", True), run("int8-convrot", False), \
        run("int8-convrot", True)
    assert rel(stg_bf16, plain_bf16) > 0.05  # STG matters
    assert rel(stg_q, stg_bf16) < POLICY_BOUNDS["int8-convrot"]
    cosine = torch.nn.functional.cosine_similarity((stg_q - plain_q).flatten(), (stg_bf16 - plain_bf16).flatten(), dim=0)
    assert float(cosine) > 0.9


@needs_ltx25
def test_quantize_node_takes_ltx25_from_core_loader(server, base):
    """A core-loaded LTX-2.5 MODEL: its config comes from ComfyUI's detection (bias-free FFNs, the
    keyframe embedding), and the Quantize node matches the loader."""
    quantize = {"9": {"class_type": "LTX2QuantQuantizeModel",
                      "inputs": {"model": ["1", 0], "policy": "int8-convrot", "nvfp4_mode": "fast",
                                 "scope": "policy default"}}}
    v, _, _ = sample(server, base, core_loader(TRANSFORMER), "quantize_node_25", extra=quantize, model_ref=["9", 0])
    loader_v, _, _ = sample(server, base, loader_node(TRANSFORMER, "int8-convrot"), "quantize_loader_25")
    # As in test_comfyui.test_quantize_model_node_matches_the_loader: the same quantized weights, the
    # non-quantized layers in ComfyUI's compute dtype (UNETLoader) or read from the file (the loader).
    assert rel(v, loader_v) < 0.01


@needs_ltx25
@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "bf16"])
def test_saved_file_keeps_the_header_and_loads_without_the_pack(server, plain, base, policy):
    name = f"ltx2q_test_ltx25_saved_{policy}_{os.getpid()}.safetensors"
    folder = os.path.join(str(base), "models", "diffusion_models")
    server.run({"1": loader_node(TRANSFORMER, policy),
                "2": {"class_type": "LTX2QuantSave", "inputs": {"model": ["1", 0], "folder": folder, "filename": name,
                                                                "comfy_compatible": True, "overwrite": True}}})
    with SafetensorsFile(os.path.join(folder, name)) as f:
        assert {k: f.metadata[k] for k in LTX25_METADATA} == LTX25_METADATA
        assert ltx2.detect_family(f.keys(), "") == "ltx2.5"
        assert ltx2.KEYFRAMES_EMBEDDING_KEY in f.tensors
    with_pack = sample(server, base, loader_node(name, "bf16"), f"reload_pack_25_{policy}")
    without_pack = sample(plain, base, core_loader(name), f"reload_core_25_{policy}")
    bound = PACK_VS_CORE_BOUNDS[policy]
    for ours, core_out in zip(with_pack[:2], without_pack[:2]):
        assert rel(ours, core_out) < bound, (policy, rel(ours, core_out))


@needs_ltx25
@pytest.mark.parametrize("fmt", list(OFFICIAL))
def test_official_layout_loads_in_the_pack_as_in_stock_comfyui(server, plain, base, fmt):
    """Lightricks' official LTX-2.5 layouts (per-layer .comfy_quant, no header quantization metadata),
    made by comfy-kitchen: the pack keeps every layer as stored and runs it on its own paths; its
    output matches stock ComfyUI's on the same file and stays close to the bf16 model's."""
    name = OFFICIAL[fmt][0]
    ours_v, ours_a, report = sample(server, base, loader_node(name, fmt), f"official_pack_{fmt}")
    core_v, core_a, _ = sample(plain, base, core_loader(name), f"official_core_{fmt}")
    ref_v, ref_a, _ = sample(server, base, loader_node(TRANSFORMER, "bf16"), "official_ref_bf16")
    stored = weights.format_from_conf(OFFICIAL[fmt][1])
    assert f"'{stored}': {len(BLOCK_LINEARS)}" in report, report  # every block Linear kept as stored
    bound = PACK_VS_CORE_BOUNDS[fmt]
    assert rel(ours_v, core_v) < bound and rel(ours_a, core_a) < bound, (rel(ours_v, core_v), rel(ours_a, core_a))
    assert rel(ours_v, ref_v) < POLICY_BOUNDS[fmt] and rel(ours_a, ref_a) < POLICY_BOUNDS[fmt]
