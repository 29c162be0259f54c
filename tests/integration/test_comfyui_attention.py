"""The attention patch (node and loader option) in a real ComfyUI server (headless, CPU) on a tiny
random LTX-2.3 model: the patched model samples like the unpatched one, the CPU's fallback and its
reason are reported and logged, the patch stays on its own clone, and compiled blocks (Dynamo, eager
backend) follow a patch added after they compiled. Skips when COMFYUI_PATH is unset."""

from __future__ import annotations

import pytest
import torch

from support.comfy_server import (loader_node, missing_requirements, rel, sampling_graph, saved_latent,
                                          write_tiny_model)

REASON = missing_requirements()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")
MODEL = "ltx2q_test_attention.safetensors"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy_attention")
    models = root / "models" / "diffusion_models"
    models.mkdir(parents=True)
    write_tiny_model(models / MODEL, seed=13)
    return root


def attention_node(choice: str) -> dict:
    return {"9": {"class_type": "LTX2QuantAttention", "inputs": {"model": ["1", 0], "attention": choice}}}


def run(server, base, name: str, **kwargs) -> tuple[dict, tuple[torch.Tensor, torch.Tensor]]:
    graph = sampling_graph(kwargs.pop("model", loader_node(MODEL, "bf16")), name, **kwargs)
    entry = server.run(graph)
    return entry, tuple(saved_latent(base, name).values())


def report(entry: dict, node: str) -> str:
    return "\n".join(entry["outputs"][node]["text"])


def server_log(server) -> str:
    server.log.flush()
    with open(server.log_path) as f:
        return f.read()


def test_object_info_lists_the_node_and_the_loader_option(server):
    info = server.get("/object_info")
    node = info["LTX2QuantAttention"]
    assert node["category"] == "LTX-2 Quant"
    options = node["input"]["required"]["attention"][1]["options"]
    assert options[:2] == ["auto", "auto-8bit"] and "triton-int8" in options and "sdpa-math" in options
    loader_options = info["LTX2QuantLoader"]["input"]["optional"]["attention"][1]["options"]
    assert loader_options[0] == "comfyui default" and loader_options[1:] == options


def test_auto_on_cpu_falls_back_to_sdpa_and_samples_like_unpatched(server, base):
    _, (ref_v, ref_a) = run(server, base, "attn_ref")
    entry, (v, a) = run(server, base, "attn_auto", extra=attention_node("auto"), model_ref=["9", 0])
    text = report(entry, "9")
    assert text.startswith("attention: sdpa (torch SDPA, its own backend choice") and "on cpu" in text
    assert "sdpa-cudnn (cuDNN attention needs CUDA sm_80+ (cpu))" in text
    assert "LTX-2 Quant attention (auto): sdpa: " in server_log(server)
    assert torch.isfinite(v).all() and torch.isfinite(a).all()
    assert rel(v, ref_v) < 1e-5 and rel(a, ref_a) < 1e-5, (rel(v, ref_v), rel(a, ref_a))


def test_requested_gpu_kernel_falls_back_with_its_reason(server, base):
    _, (ref_v, _) = run(server, base, "attn_ref_2")
    entry, (v, _) = run(server, base, "attn_triton", extra=attention_node("triton-int8"), model_ref=["9", 0])
    text = report(entry, "9")
    assert text.startswith("attention: sdpa ") and "triton-int8 (Triton 8-bit attention (TMA and FP8 tensor cores) needs CUDA sm_90+" in text
    assert rel(v, ref_v) < 1e-5


def test_patch_stays_on_its_clone(server, base):
    """The loader's MODEL is cached between prompts: patching it in place would change the next plain run."""
    _, (before_v, before_a) = run(server, base, "leak_before")
    _, (math_v, _) = run(server, base, "leak_math", extra=attention_node("sdpa-math"), model_ref=["9", 0])
    _, (after_v, after_a) = run(server, base, "leak_after")
    assert not torch.equal(math_v, before_v)  # the math backend really ran (other rounding than SDPA's own)
    assert rel(math_v, before_v) < 1e-5
    assert torch.equal(after_v, before_v) and torch.equal(after_a, before_a)


def test_loader_attention_option(server, base):
    _, (ref_v, ref_a) = run(server, base, "loader_ref", model=loader_node(MODEL, "fp8-scaled-mm"))
    entry, (v, a) = run(server, base, "loader_auto", model=loader_node(MODEL, "fp8-scaled-mm", attention="auto"))
    assert "\nattention: sdpa (" in report(entry, "1")
    assert rel(v, ref_v) < 1e-5 and rel(a, ref_a) < 1e-5


def test_compiled_blocks_sample_like_uncompiled_and_follow_a_patch_added_after_they_compiled(server, base):
    """Compile Blocks (Dynamo's eager backend, so it runs on the CPU) in real sampling: one graph serves
    every block and step, the latent is bitwise the uncompiled one, and the Attention patch reaches blocks
    that compiled without it, whether it is applied after Compile Blocks or before a new one, and leaves
    them when removed (a stale graph would silently keep the old attention). Runs last in this module:
    Dynamo's graph count is per server process."""
    compile_node = {"class_type": "LTX2QTestCompileEager", "inputs": {"model": ["1", 0]}}
    stats_node = {"class_type": "LTX2QTestDynamoStats", "inputs": {"samples": ["7", 0]}}
    math_after_compile = {"class_type": "LTX2QuantAttention", "inputs": {"model": ["20", 0], "attention": "sdpa-math"}}

    def sample(name, extra, model_ref, seed=42):
        graph = sampling_graph(loader_node(MODEL, "bf16"), name, extra=extra, model_ref=model_ref)
        graph["6"]["inputs"]["noise_seed"] = seed  # another seed: the sampler runs again, not from ComfyUI's cache
        entry = server.run(graph)
        return (int(report(entry, "21")) if "21" in extra else None), tuple(saved_latent(base, name).values())

    _, plain = sample("uncompiled", {}, None)
    _, plain_43 = sample("uncompiled_43", {}, None, seed=43)
    _, math = sample("uncompiled_math", attention_node("sdpa-math"), ["9", 0])
    assert not torch.equal(math[0], plain[0])  # the two attention paths round differently: a stale graph shows

    graphs, latent = sample("compiled", {"20": compile_node, "21": stats_node}, ["20", 0])
    assert graphs == 1 and all(map(torch.equal, latent, plain))
    graphs, latent = sample("compiled_then_math", {"20": compile_node, "9": math_after_compile, "21": stats_node},
                            ["9", 0])
    assert graphs == 2 and all(map(torch.equal, latent, math))
    graphs, latent = sample("math_then_compiled", {**attention_node("sdpa-math"), "20": dict(compile_node, inputs={
        "model": ["9", 0]}), "21": stats_node}, ["20", 0])
    assert graphs == 2 and all(map(torch.equal, latent, math))
    graphs, latent = sample("compiled_43", {"20": compile_node, "21": stats_node}, ["20", 0], seed=43)
    assert graphs == 2 and all(map(torch.equal, latent, plain_43))
