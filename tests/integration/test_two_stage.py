"""The two-stage sampler, latent upscale and VAE loader nodes in a real ComfyUI server (headless, CPU)
on a tiny random LTX-2.3 checkpoint (transformer + video VAE) and a tiny random spatial upsampler.
Skips when COMFYUI_PATH is unset."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from support.comfy_server import (DISTILLED_STAGE1, HERE, REPO, loader_node, missing_requirements, rel,
                                                  saved_latent, write_tiny_model)

REASON = missing_requirements()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

CHECKPOINT = "ltx2q_test_full.safetensors"
UPSAMPLER = "ltx2q_test_upsampler.safetensors"
SAMPLERS = ("euler", "gradient_estimation", "euler_ancestral_cfg_pp / euler_cfg_pp")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy_two_stage")
    checkpoints = root / "models" / "checkpoints"
    upsamplers = root / "models" / "latent_upscale_models"
    checkpoints.mkdir(parents=True)
    upsamplers.mkdir(parents=True)
    subprocess.run([sys.executable, os.path.join(HERE, "make_tiny_models.py"), "ltx2.3", str(checkpoints / CHECKPOINT),
                    str(upsamplers / UPSAMPLER)], check=True)
    write_tiny_model(checkpoints / "ltx2q_test_transformer_only.safetensors", seed=3)
    return root


def two_stage_graph(name: str, policy: str = "bf16", sampler: str = "euler", width: int = 128, height: int = 128,
                    sampler_inputs: dict | None = None, extra: dict | None = None) -> dict:
    graph = {
        "1": loader_node(CHECKPOINT, policy),
        "2": {"class_type": "LTX2QTestInputs", "inputs": {"model": ["1", 0], "seed": 1, "frames": 9,
                                                          "height": height, "width": width}},
        "3": {"class_type": "LTX2QuantVAELoader", "inputs": {"ckpt_name": CHECKPOINT}},
        "4": {"class_type": "LatentUpscaleModelLoader", "inputs": {"model_name": UPSAMPLER}},
        "5": {"class_type": "LTX2QuantTwoStageSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 1], "latent": ["2", 2],
            "upscale_model": ["4", 0], "vae": ["3", 0], "noise_seed": 42, "sampler": sampler, "ge_gamma": 2.0,
            "cfg": 1.0, **(sampler_inputs or {})}},
        "6": {"class_type": "LTX2QTestSaveLatent", "inputs": {"samples": ["5", 0], "name": name}},
        "7": {"class_type": "LTX2QTestSaveLatent", "inputs": {"samples": ["5", 1], "name": name + "_stage1"}},
    }
    graph.update(extra or {})
    return graph


def core_stage1_graph(name: str) -> dict:
    """Stage 1 with core nodes only: half-size latent, RandomNoise, CFGGuider, euler, distilled sigmas; then
    core's LTXVLatentUpsampler and this pack's Latent Upscale (as loaded and fp8) on its result."""
    return {
        "1": loader_node(CHECKPOINT, "bf16"),
        "2": {"class_type": "LTX2QTestInputs", "inputs": {"model": ["1", 0], "seed": 1, "frames": 9, "height": 64,
                                                          "width": 64}},
        "3": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 1],
                                                    "cfg": 1.0}},
        "4": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "5": {"class_type": "ManualSigmas", "inputs": {"sigmas": DISTILLED_STAGE1}},
        "6": {"class_type": "RandomNoise", "inputs": {"noise_seed": 42}},
        "7": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["6", 0], "guider": ["3", 0],
                                                                "sampler": ["4", 0], "sigmas": ["5", 0],
                                                                "latent_image": ["2", 2]}},
        "8": {"class_type": "LTX2QTestSaveLatent", "inputs": {"samples": ["7", 0], "name": name + "_stage1"}},
        "9": {"class_type": "LTX2QuantVAELoader", "inputs": {"ckpt_name": CHECKPOINT}},
        "10": {"class_type": "LatentUpscaleModelLoader", "inputs": {"model_name": UPSAMPLER}},
        "11": {"class_type": "LTXVSeparateAVLatent", "inputs": {"av_latent": ["7", 0]}},
        "12": {"class_type": "LTXVLatentUpsampler", "inputs": {"samples": ["11", 0], "upscale_model": ["10", 0],
                                                               "vae": ["9", 0]}},
        "13": {"class_type": "LTX2QTestSaveLatent", "inputs": {"samples": ["12", 0], "name": name + "_core_up"}},
        "14": {"class_type": "LTX2QuantLatentUpscale", "inputs": {"samples": ["7", 0], "upscale_model": ["10", 0],
                                                                  "vae": ["9", 0], "weights": "as loaded"}},
        "15": {"class_type": "LTX2QTestSaveLatent", "inputs": {"samples": ["14", 0], "name": name + "_ours_up"}},
        "16": {"class_type": "LTX2QuantLatentUpscale", "inputs": {"samples": ["7", 0], "upscale_model": ["10", 0],
                                                                  "vae": ["9", 0], "weights": "fp8"}},
        "17": {"class_type": "LTX2QTestSaveLatent", "inputs": {"samples": ["16", 0], "name": name + "_fp8_up"}},
    }


def test_object_info_lists_the_pipeline_nodes(server):
    info = server.get("/object_info")
    sampler = info["LTX2QuantTwoStageSampler"]
    assert sampler["output"] == ["LATENT", "LATENT"]
    assert sampler["input"]["required"]["sampler"][1]["options"] == list(SAMPLERS)
    assert "latent_upscale_models" not in info["LTX2QuantLatentUpscale"]["input"]["required"]
    assert info["LTX2QuantVAELoader"]["input"]["required"]["ckpt_name"][1]["options"] == [
        CHECKPOINT, "ltx2q_test_transformer_only.safetensors"]


@pytest.mark.parametrize("policy", ["bf16", "nvfp4"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_two_stage_runs_each_sampler(server, base, sampler, policy):
    name = f"two_stage_{policy}_{SAMPLERS.index(sampler)}"
    server.run(two_stage_graph(name, policy, sampler))
    out, stage1 = saved_latent(base, name), saved_latent(base, name + "_stage1")
    assert out["video"].shape == (1, 128, 2, 4, 4) and stage1["video"].shape == (1, 128, 2, 2, 2)
    assert out["audio"].shape == stage1["audio"].shape == (1, 8, 10, 16)
    for tensor in (*out.values(), *stage1.values()):
        assert bool(torch.isfinite(tensor).all()) and float(tensor.abs().max()) > 0
    if policy != "bf16":
        reference = saved_latent(base, f"two_stage_bf16_{SAMPLERS.index(sampler)}")
        assert rel(out["video"], reference["video"]) < 0.15
        assert rel(out["audio"], reference["audio"]) < 0.15


def test_stage1_and_upsample_equal_core_nodes(server, base):
    server.run(two_stage_graph("ours"))
    server.run(core_stage1_graph("core"))
    ours, core = saved_latent(base, "ours_stage1"), saved_latent(base, "core_stage1")
    # Same seed, same half-size latent, same sampler: bit-identical stage 1.
    assert torch.equal(ours["video"], core["video"]) and torch.equal(ours["audio"], core["audio"])
    core_up, ours_up, fp8_up = (saved_latent(base, f"core_{k}")["video"] for k in ("core_up", "ours_up", "fp8_up"))
    assert core_up.shape == (1, 128, 2, 4, 4)
    torch.testing.assert_close(ours_up, core_up, rtol=1e-5, atol=1e-5)
    assert 0 < rel(fp8_up, core_up) < 0.05


def test_stage2_model_can_differ(server, base):
    extra = {"20": loader_node(CHECKPOINT, "fp8-scaled-mm")}
    server.run(two_stage_graph("mixed", sampler_inputs={"model_stage2": ["20", 0]}, extra=extra))
    server.run(two_stage_graph("plain"))
    mixed, plain = saved_latent(base, "mixed"), saved_latent(base, "plain")
    assert torch.equal(saved_latent(base, "mixed_stage1")["video"], saved_latent(base, "plain_stage1")["video"])
    assert 0 < rel(mixed["video"], plain["video"]) < 0.1


def test_image_to_video(server, base):
    extra = {"20": {"class_type": "EmptyImage", "inputs": {"width": 128, "height": 128, "batch_size": 1,
                                                           "color": 0x8040C0}}}
    server.run(two_stage_graph("i2v", sampler_inputs={"image": ["20", 0], "image_strength": 1.0,
                                                      "upscale_weights": "fp8"}, extra=extra))
    server.run(two_stage_graph("t2v"))
    i2v, t2v = saved_latent(base, "i2v"), saved_latent(base, "t2v")
    assert bool(torch.isfinite(i2v["video"]).all())
    # Strength 1 keeps the encoded image in latent frame 0 through both stages.
    assert rel(i2v["video"][:, :, 0], t2v["video"][:, :, 0]) > 0.1


@pytest.mark.parametrize("change, message", [
    ({"width": 96}, "width must be a multiple of 64 for the two-stage flow, got 96"),
    ({"height": 160}, "height must be a multiple of 64 for the two-stage flow, got 160"),
])
def test_bad_sizes_are_refused_before_compute(server, change, message):
    with pytest.raises(RuntimeError, match=message):
        server.run(two_stage_graph("bad", **change))


def test_bad_sigmas_are_refused(server):
    extra = {"20": {"class_type": "ManualSigmas", "inputs": {"sigmas": "0.5, 0.9, 0.0"}}}
    with pytest.raises(RuntimeError, match="Stage-2 sigmas must be finite and non-increasing"):
        server.run(two_stage_graph("bad_sigmas", sampler_inputs={"sigmas_stage2": ["20", 0]}, extra=extra))


def test_vae_loader_needs_a_full_checkpoint(server):
    graph = {"1": {"class_type": "LTX2QuantVAELoader",
                   "inputs": {"ckpt_name": "ltx2q_test_transformer_only.safetensors"}},
             "2": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 0]}},
             "3": {"class_type": "EmptyLTXVLatentVideo", "inputs": {"width": 64, "height": 64, "length": 9,
                                                                   "batch_size": 1}},
             "4": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    with pytest.raises(RuntimeError, match="has no 'vae.\\*' tensors"):
        server.run(graph)


def test_vae_from_checkpoint_decodes(server):
    graph = {"1": {"class_type": "LTX2QuantVAELoader", "inputs": {"ckpt_name": CHECKPOINT}},
             "3": {"class_type": "EmptyLTXVLatentVideo", "inputs": {"width": 64, "height": 64, "length": 9,
                                                                   "batch_size": 1}},
             "2": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 0]}},
             "4": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    entry = server.run(graph)
    assert entry["outputs"]["4"]["images"]


def with_the_pack(body: str) -> str:
    """A Python script that imports ComfyUI (CPU) and this pack as ComfyUI does (scripts/comfyui_pack.py),
    then runs `body`: for checks in a fresh process, as the server would."""
    return f"""import sys, types, torch
sys.path.insert(0, {os.path.join(REPO, 'scripts')!r})
from comfyui_pack import import_pack
import_pack(cpu=True)
""" + body


def test_a_non_ltx_model_is_refused():
    """check_ltx_model on a model whose diffusion_model is not LTX (ComfyUI imported in a subprocess,
    as the server would)."""
    script = with_the_pack("""
from ltx2_quant.nodes import sampling_pipeline
patcher = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=torch.nn.Linear(1, 1)))
try:
    sampling_pipeline.check_ltx_model(patcher, "stage-2 model")
except ValueError as e:
    print(e)
""")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "The stage-2 model is a Linear, not an LTX-2 model" in out.stdout, out.stderr[-2000:]


def test_compile_node_on_the_cpu_passes_the_model_through_and_says_why(server, base):
    extra = {"20": {"class_type": "LTX2QuantCompile", "inputs": {"model": ["1", 0], "mode": "blocks"}}}
    entry = server.run(two_stage_graph("compiled", sampler_inputs={"model": ["20", 0]}, extra=extra))
    assert "skipped (the model runs on the CPU)" in json.dumps(entry["outputs"]["20"])
    server.run(two_stage_graph("uncompiled"))
    assert torch.equal(saved_latent(base, "compiled")["video"], saved_latent(base, "uncompiled")["video"])


def test_every_compile_mode_sets_options_inductor_has():
    """Inductor checks option names only when a GPU compiles (this CPU test run never does): a
    misspelt option would fail the first step on a user's GPU. config.patch raises on unknown names."""
    script = with_the_pack("""
import torch._inductor.config
from ltx2_quant.nodes.patches import COMPILE_MODES
for mode, options in COMPILE_MODES.items():
    with torch._inductor.config.patch(options or {}):
        print("valid:", mode)
""")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "valid: blocks, tuned kernels" in out.stdout and out.stdout.count("valid:") == 5, out.stdout
