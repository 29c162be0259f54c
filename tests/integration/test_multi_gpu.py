"""Sequence-parallel LTX-2 (nodes/sequence_parallel_ltx.py) on 2 and 4 CPU processes joined by gloo,
each with the tiny model built by the pack's loader, against the same model in one process. Skips when
COMFYUI_PATH is unset.

Tolerance: fp32 on the CPU. The per-token layers see the same numbers; Ulysses runs the same attention
kernel with the heads grouped differently (bit-exact alone, tests/test_sequence_parallel.py), the
video-to-audio attention and ring mode merge per-shard softmax sums by log-sum-exp (another order of fp32
sums), and ComfyUI's CPU Linear/attention may pick other kernels for other row counts. 2e-6 relative to the
output's scale (measured: at most 2.8e-7 over these cases; 0 for video-only Ulysses)."""

from __future__ import annotations

import pytest
from support.comfy_server import missing_requirements, run_check

from tests.gloo_ranks import run_on_ranks

REASON = missing_requirements()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")
TOLERANCE = 2e-6


def streams(output):
    return output if isinstance(output, list) else [output]


def relative_error(got, expected):
    return float((got - expected).abs().max() / expected.abs().max())


CASES = [  # (world, policy, latent, mode, shape): 45 video tokens and 11 audio tokens divide by neither 2 nor 4
    (2, "bf16", "av", "ulysses", {}),
    (4, "fp8-scaled-mm", "av", "ulysses", {}),
    (2, "fp8-scaled-mm", "video", "ulysses", {}),
    (2, "bf16", "video", "ring", {"frames": 2}),
    (2, "bf16", "av", "ring", {"audio_tokens": 1}),  # fewer audio tokens than ranks: audio held whole
]


@pytest.mark.parametrize("world, policy, kind, mode, shape", CASES)
def test_sequence_parallel_equals_one_process(world, policy, kind, mode, shape, tmp_path):
    from support import multi_gpu_ranks
    results = run_on_ranks(multi_gpu_ranks.compare, world, tmp_path, policy, kind, mode, shape, timeout=300)
    single = streams(results[0]["single"])
    for rank, result in enumerate(results):
        for got, expected in zip(streams(result["parallel"]), single, strict=True):
            assert got.shape == expected.shape
            error = relative_error(got, expected)
            assert error <= TOLERANCE, f"rank {rank}/{world} {policy} {kind} {mode}: relative error {error:.2e}"


def run_scenario(name: str) -> dict:
    return run_check("multi_gpu_check.py", name, timeout=900)


# Sampled through ComfyUI (euler, cfg 2, 4 steps). bf16: as above (measured <= 3.9e-7). fp8-scaled-mm: the
# issue's bound for the final latent, 1e-2 (measured 2.0e-3 video, 3.0e-4 audio): its per-token FP8
# activation rounding is a step function, so the ~1e-7 differences of the merged attention move some
# activations across a rounding boundary (a whole FP8 step), and the following steps carry that on. One
# forward of the same model stays within 2e-6 (test_sequence_parallel_equals_one_process).
SAMPLED_TOLERANCE = {"bf16": 2e-6, "fp8-scaled-mm": 1e-2}


def test_sampling_on_worker_processes_equals_one_process():
    """The patched model samples through ComfyUI's CFGGuider with its forward run by 2 or 4 gloo worker
    processes; the result equals the unpatched model's, ComfyUI keeps the model on the CPU, and a second run
    reuses the workers and gives the same latent."""
    results = run_scenario("equal")
    lora = results.pop("lora after split")
    # A LoRA added after the split reaches the workers (the same processes: only the weights travel).
    assert lora["effect"] > 1e-3 and max(lora["errors"]) <= SAMPLED_TOLERANCE["bf16"] and lora["same_workers"], lora
    for case, r in results.items():
        policy = case.split()[0]
        assert max(r["errors"]) <= SAMPLED_TOLERANCE[policy], (case, r)
        assert r["repeat_equal"] and r["load_device"] == "cpu", (case, r)
        assert r["text"].startswith(f"multi-GPU: {case.split()[1]} x cpu"), (case, r)


def test_failures_end_the_run_with_a_message_and_free_the_workers():
    r = run_scenario("failures")
    assert r["too_few"].startswith("LTX-2 Multi-GPU asks for 2 GPUs but this ComfyUI sees 0"), r
    assert "Connect Compile Blocks before LTX-2 Multi-GPU" in r["compile_after"], r
    assert "Connect Quant Attention before LTX-2 Multi-GPU" in r["attention_after"], r
    assert "already patched" in r["twice"], r
    # Cancel after the first step stops the run; the workers stay and serve the next run unchanged.
    assert r["cancel"] == "interrupted" and r["cancel_steps"] == 1 and r["cancel_kept_workers"], r
    assert r["after_cancel_equal"], r
    # A worker killed mid-run: the next step ends the run naming it; the other is stopped; a new run works.
    assert r["death"].startswith("GPU worker(s) [1] of 2 exited (codes [-9])"), r
    assert r["death_others_stopped"] and r["after_death_equal"], r
    # A worker that raises sends its traceback, and every worker is stopped.
    assert "TypeError" in r["error"] and r["error_others_stopped"], r
