"""The attention patch (node and loader option) in a real ComfyUI server (headless, CPU) on a tiny
random LTX-2.3 model: the patched model samples like the unpatched one, the CPU's fallback and its
reason are reported and logged, and the patch stays on its own clone; and, in a ComfyUI subprocess,
compiled blocks follow a patch added after they compiled. Skips when COMFYUI_PATH is unset."""

from __future__ import annotations

import pytest
import torch

from comfy_server import (loader_node, missing_requirements, rel, sampling_graph, saved_latent,
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


GUARD_SCRIPT = """
import importlib.util, json, os, sys, torch
sys.path.insert(0, os.environ["COMFYUI_PATH"])
import comfy.cli_args
comfy.cli_args.args.cpu = True
comfy.cli_args.args.use_pytorch_cross_attention = True
repo = {repo!r}
spec = importlib.util.spec_from_file_location("ltx2q", os.path.join(repo, "__init__.py"), submodule_search_locations=[repo])
pack = importlib.util.module_from_spec(spec); sys.modules["ltx2q"] = pack; spec.loader.exec_module(pack)
import comfy.ldm.modules.attention as comfy_attention
import comfy.model_patcher
import torch._dynamo.utils
from comfy.patcher_extension import WrappersMP
from ltx2q.nodes.patches import COMPILE_KEY, compile_each_block

class Block(torch.nn.Module):  # what an LTX block does with transformer_options: reads its branch flags and
    def forward(self, x, transformer_options):  # hands it to ComfyUI's attention
        out = comfy_attention.optimized_attention(x, x, x, 2, transformer_options=transformer_options)
        if transformer_options.get("block_index", 0) > 99:  # never true: only a value Dynamo would guard on
            out = -out
        return out if transformer_options.get("run_vx", True) else x

def doubled(func, *args, **kwargs):
    return 2 * func(*args, **kwargs)

class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.diffusion_model = torch.nn.Module()
        self.diffusion_model.transformer_blocks = torch.nn.ModuleList([Block(), Block()])

patcher = comfy.model_patcher.ModelPatcher(Model(), load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
keys = [f"diffusion_model.transformer_blocks.{{i}}" for i in range(2)]
compiled = compile_each_block(patcher, keys, backend="eager", options={{}})
wrappers = len(patcher.get_wrappers(WrappersMP.APPLY_MODEL, COMPILE_KEY))
# Block 1 compiles first: the filter must be on every block's compile, not only on the first one made.
block = lambda x, options: compiled[keys[options["block_index"]]](x, options)
x = torch.randn(1, 8, 16)
plain = [block(x, {{"sigmas": torch.tensor(s), "block_index": i}}) for i, s in ((1, 1.0), (0, 0.5))][::-1]
graphs_plain = torch._dynamo.utils.counters["stats"]["unique_graphs"]
patched = block(x, {{"sigmas": torch.tensor(1.0), "block_index": 0, "optimized_attention_override": doubled}})
again = block(x, {{"sigmas": torch.tensor(0.5), "block_index": 1}})
patched_twice = [block(x, {{"sigmas": torch.tensor(s), "block_index": i, "optimized_attention_override": doubled}})
                 for i, s in enumerate((0.5, 0.25))]
graphs_both = torch._dynamo.utils.counters["stats"]["unique_graphs"]
switched = [block(x, {{"sigmas": torch.tensor(1.0), "block_index": 0, "run_vx": flag}}) for flag in (True, False, True)]
print(json.dumps({{"wrappers": wrappers, "graphs_plain": graphs_plain, "patched": torch.allclose(patched, 2 * plain[0]),
                  "again": torch.equal(again, plain[0]), "graphs_both": graphs_both,
                  "patched_twice": all(torch.allclose(p, 2 * plain[0]) for p in patched_twice),
                  "switched": [torch.equal(switched[0], plain[0]), torch.equal(switched[1], x),
                               torch.equal(switched[2], plain[0])]}}))
"""


def test_compiled_blocks_follow_an_attention_patch_added_after_they_compiled():
    """Compile Blocks drops Dynamo's guards on transformer_options' per-call values (two calls with other
    sigmas and block index: one graph), but an attention override added (or removed) after a block
    compiled must still reach it, and so must a branch flag that changes value: a model compiled in an
    earlier run of the workflow would otherwise ignore the Attention node without a word. The filter is on
    every block's compile (torch.compile pops it from its options, so one dict shared by all blocks left it
    on the first only): block 1 compiles first here. Blocks compiled by Compile Blocks' own function in a
    real ModelPatcher, real ComfyUI attention dispatch, real Dynamo (eager backend on the CPU)."""
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", GUARD_SCRIPT.format(repo=repo)], capture_output=True, text=True,
                         timeout=300)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert lines, out.stderr[-3000:]
    result = json.loads(lines[-1])
    assert result == {"wrappers": 1, "graphs_plain": 1, "patched": True, "again": True, "graphs_both": 2, "patched_twice": True,
                      "switched": [True, True, True]}, result
