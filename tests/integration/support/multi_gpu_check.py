"""Multi-GPU sampling (nodes/multi_gpu.py) through ComfyUI's real sampler in one ComfyUI process (CPU): the
patched model's workers are CPU processes over gloo, as a CPU ComfyUI gives them.
tests/integration/test_multi_gpu.py runs each scenario in a fresh process and reads the JSON printed last.

usage: python multi_gpu_check.py equal|failures
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import multi_gpu_ranks  # noqa: E402  (imports ComfyUI on the CPU and the pack)
import comfy.lora  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.nested_tensor  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import torch  # noqa: E402
from ltx2_quant.nodes import model_io, multi_gpu, patches  # noqa: E402
from ltx2_quant.quant import conversion, ltx2  # noqa: E402
from ltx2_quant.quant.load_options import LoadOptions  # noqa: E402
from ltx2_quant.quant.policies import get_policy  # noqa: E402
from ltx2_quant.quant.safetensors_io import MemoryTensors  # noqa: E402
from ltx2_quant.quant.worker_pool import WorkerFailed  # noqa: E402

CONFIG = multi_gpu_ranks.CONFIG
SIGMAS = [1.0, 0.9875, 0.909375, 0.421875, 0.0]


def build(policy: str):
    loaded = conversion.load_converted(MemoryTensors(ltx2.synthetic_state_dict(CONFIG, seed=3),
                                                     ltx2.header_metadata(CONFIG)), get_policy(policy))
    return model_io.build_model(loaded, LoadOptions(policy, text_connectors_on_cpu=False))[0]


def sample(patcher, callback=None) -> list[torch.Tensor]:
    """Euler, cfg 2 (conditional and unconditional batched), an AV latent of 45 video and 11 audio tokens
    (neither divides by 2 or 4), raw text context (the connectors run in the coordinator)."""
    width = CONFIG["cross_attention_dim"] + CONFIG["audio_cross_attention_dim"]
    g = torch.Generator().manual_seed(1)
    options = {"frame_rate": 24.0, "unprocessed_ltxav_embeds": True}
    positive, negative = ([[torch.randn(1, 16, width, generator=g), dict(options)]] for _ in range(2))
    latent = comfy.nested_tensor.NestedTensor((torch.zeros(1, 128, 3, 3, 5), torch.zeros(1, 8, 11, 16)))
    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds(positive, negative)
    guider.set_cfg(2.0)
    noise = comfy.sample.prepare_noise(latent, 42)
    out = guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), torch.tensor(SIGMAS),
                        callback=callback, disable_pbar=True, seed=42)
    return [t.clone() for t in out.unbind()]


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def with_lora(patcher):
    """A rank-4 LoRA on two block Linears, as core's LoraLoaderModelOnly adds it."""
    shapes = ltx2.model_shapes(CONFIG)
    g = torch.Generator().manual_seed(5)
    lora = {}
    for layer in ("transformer_blocks.0.attn1.to_q", "transformer_blocks.1.ff.net.2"):
        out_features, in_features = shapes[layer + ".weight"]
        lora[f"diffusion_model.{layer}.lora_A.weight"] = torch.randn(4, in_features, generator=g) * in_features ** -0.5
        lora[f"diffusion_model.{layer}.lora_B.weight"] = torch.randn(out_features, 4, generator=g) * 0.5
    patched = patcher.clone()
    patched.add_patches(comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(patcher.model, {})), 1.0)
    return patched


def equal() -> dict:
    out = {}
    for policy, gpus, mode in (("fp8-scaled-mm", 2, "ulysses"), ("bf16", 4, "ulysses"), ("bf16", 2, "ring")):
        patcher = build(policy)
        single = sample(patcher)
        patched, text = multi_gpu.patch_multi_gpu(patcher, gpus, mode, timeout_s=300)
        started = time.monotonic()
        parallel = sample(patched)
        first = time.monotonic() - started
        again = sample(patched)  # the workers keep the model: nothing is shipped again
        out[f"{policy} {gpus} {mode}"] = {
            "text": text, "errors": [rel(p, s) for p, s in zip(parallel, single, strict=True)],
            "repeat_equal": all(torch.equal(a, b) for a, b in zip(parallel, again)),
            "load_device": str(patched.load_device), "first_run_s": round(first, 1)}
        runner = multi_gpu.runner_of(patched)
        if policy == "bf16" and mode == "ring":
            # A LoRA added after the split: the workers get the patched weights (shipped again).
            pids = [p.pid for p in runner.pool.processes]
            lora_single = sample(with_lora(patcher))
            lora_parallel = sample(with_lora(patched))
            out["lora after split"] = {
                "errors": [rel(p, s) for p, s in zip(lora_parallel, lora_single, strict=True)],
                "effect": max(rel(a, b) for a, b in zip(lora_single, single)),
                "same_workers": [p.pid for p in runner.pool.processes] == pids}
        runner.close()
    return out


def failures() -> dict:
    out = {}
    try:
        multi_gpu.worker_devices(2, torch.device("cuda:0"))
    except ValueError as error:
        out["too_few"] = str(error)
    patcher, _ = multi_gpu.patch_multi_gpu(build("bf16"), 2, "ulysses", timeout_s=300)
    runner = multi_gpu.runner_of(patcher)
    for name, call in (("compile_after", lambda: patches.compile_blocks(patcher, "blocks")),
                       ("attention_after", lambda: patches.patch_attention(patcher, "auto")),
                       ("twice", lambda: multi_gpu.patch_multi_gpu(patcher, 2))):
        try:
            call()
            out[name] = "not raised"
        except ValueError as error:
            out[name] = str(error)
    reference = sample(patcher)

    # Cancel after the first step: the run stops, the workers stay (same processes) and serve the next run.
    pids = [p.pid for p in runner.pool.processes]
    steps = []

    def cancel_after_first(step, *_):
        steps.append(step)
        mm.interrupt_current_processing(True)
    try:
        sample(patcher, cancel_after_first)
        out["cancel"] = "not raised"
    except mm.InterruptProcessingException:
        out["cancel"] = "interrupted"
    out["cancel_steps"] = len(steps)
    out["cancel_kept_workers"] = runner.pool is not None and [p.pid for p in runner.pool.processes] == pids
    out["after_cancel_equal"] = all(torch.equal(a, b) for a, b in zip(sample(patcher), reference))

    # A worker that dies mid-run: the next step ends the run naming it, and the other worker is stopped.
    processes = list(runner.pool.processes)

    def kill_worker_1(step, *_):
        if step == 0:
            os.kill(processes[1].pid, signal.SIGKILL)
            processes[1].join(10)
    try:
        sample(patcher, kill_worker_1)
        out["death"] = "not raised"
    except WorkerFailed as error:
        out["death"] = str(error)
    out["death_others_stopped"] = not any(p.is_alive() for p in processes) and runner.pool is None
    out["after_death_equal"] = all(torch.equal(a, b) for a, b in zip(sample(patcher), reference))

    # A worker that raises: its traceback comes back and every worker is stopped.
    processes = list(runner.pool.processes)
    try:
        runner.run("step", ((), {"x": "not a latent"}, None))
        out["error"] = "not raised"
    except WorkerFailed as error:
        out["error"] = str(error)[-300:]
    out["error_others_stopped"] = not any(p.is_alive() for p in processes) and runner.pool is None
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps({"equal": equal, "failures": failures}[sys.argv[1]]()), flush=True)
