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
import torch
from comfy_server import missing_requirements

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
    (4, "bf16", "video", "ring", {"frames": 2}),
    (4, "bf16", "av", "ring", {"audio_tokens": 3}),  # fewer audio tokens than ranks: audio held whole
]


@pytest.mark.parametrize("world, policy, kind, mode, shape", CASES)
def test_sequence_parallel_equals_one_process(world, policy, kind, mode, shape, tmp_path):
    import multi_gpu_ranks
    results = run_on_ranks(multi_gpu_ranks.compare, world, tmp_path, policy, kind, mode, shape, timeout=300)
    single = streams(results[0]["single"])
    for rank, result in enumerate(results):
        for got, expected in zip(streams(result["parallel"]), single, strict=True):
            assert got.shape == expected.shape
            error = relative_error(got, expected)
            assert error <= TOLERANCE, f"rank {rank}/{world} {policy} {kind} {mode}: relative error {error:.2e}"
