"""The LTX-2 text encoder quantized at load (nodes/text_encoder.py) on a tiny Gemma-3-shaped model built
from ComfyUI's own Gemma3_12B class (make_tiny_models.py gemma3), run by text_encoder_check.py in one
ComfyUI process. Skips when COMFYUI_PATH is unset."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support.comfy_server import HERE, missing_requirements, run_check

REASON = missing_requirements()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

# Cosine of the quantized conditioning to bf16's on the tiny random model (hidden width 64, two layers),
# measured 0.9967-0.9976 (FP8 and MXFP8, E4M3's 3 mantissa bits), 0.9990-0.9991 (INT8, 7 bits) and 0.983
# (NVFP4, 1 bit); the bounds leave room for another weight draw, not for a format one step coarser.
MIN_COSINE = {"fp8-cast": 0.99, "fp8-scaled-mm": 0.99, "mxfp8": 0.99, "int8-scaled-mm": 0.997,
              "int8-convrot": 0.997, "nvfp4": 0.97}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text_encoder")
    gemma, projection = folder / "gemma_3_tiny.safetensors", folder / "ltx_projection.safetensors"
    subprocess.run([sys.executable, os.path.join(HERE, "make_tiny_models.py"), "gemma3", str(gemma), str(projection)],
                   check=True, timeout=600)
    return run_check("text_encoder_check.py", gemma, projection, folder, timeout=1200)


def test_every_policy_quantizes_gemma_and_the_projection_and_reports_the_conditioning_cosine(result):
    policies = result["policies"]
    assert policies["bf16"]["agreement"] is None and policies["bf16"]["formats"] == {"BF16": 17}
    for name, bound in MIN_COSINE.items():
        r = policies[name]
        assert r["shape"] == policies["bf16"]["shape"], name  # video 64 + audio 32 context features per token
        assert bound <= r["agreement"]["cosine"] < 1.0, (name, r["agreement"])
        assert r["agreement"]["video_cosine"] > bound and r["agreement"]["audio_cosine"] > bound, (name, r)
        # 14 Gemma Linears and the 2 projections in the policy's format, the embedding table FP8 per row.
        assert r["formats"]["float8_e4m3fn_rowwise"] >= 1 and sum(r["formats"].values()) == 17, (name, r)
        assert r["weight_bytes"] < 0.6 * policies["bf16"]["weight_bytes"], (name, r)
    assert policies["nvfp4"]["formats"]["nvfp4"] == 16
    assert policies["nvfp4"]["weight_bytes"] < policies["fp8-scaled-mm"]["weight_bytes"]


def test_partial_load_and_cpu_device_encode_bit_exact(result):
    r = result["offload"]
    # All 17 quantized layers (the embedding, 14 Gemma Linears, 2 projections) left to the per-call cast path.
    assert r["offloaded_quantized_layers"] == 17, r
    assert r["partial_equal"] and r["cpu_equal"], r


def test_saved_quantized_gemma_reloads_as_stored(result):
    for name, r in result["saved"].items():
        same = r["reloaded"][name]
        assert same["equal"] and same["formats"] == r["formats"], (name, r)
        # Policy bf16 keeps the saved Gemma layers as they are; only the projection (read again from the
        # bf16 checkpoint) is bf16.
        kept = dict(r["reloaded"]["bf16"]["formats"])
        assert kept.pop("BF16") == 2 and sum(kept.values()) == 15, (name, r)


def test_comfyui_scaled_fp8_file_reads_as_stored(result):
    r = result["scaled_fp8"]
    assert r["bf16"]["formats"] == {"float8_e4m3fn": 14, "BF16": 3}  # Linears kept FP8; embedding, projection bf16
    assert r["fp8-scaled-mm"]["formats"]["float8_e4m3fn"] == 14  # not rounded a second time
    assert r["nvfp4"]["formats"]["nvfp4"] == 16
    assert 0.99 < r["vs_bf16_file"]["cosine"] < 1.0, r


def test_out_of_memory_while_encoding_ends_with_the_packs_advice(result):
    message = result["out_of_memory"]["message"]
    assert message.startswith("LTX-2 Quant: out of GPU memory encoding the prompt with the text encoder at policy "
                              "fp8-scaled-mm"), message
    assert "nvfp4" in message and "device to cpu" in message and "CUDA out of memory" not in message, message


def test_wrong_files_are_refused_by_name(result):
    r = result["refusals"]
    assert "not a Gemma 3 text encoder" in r["projection_as_gemma"] and "proj" in r["projection_as_gemma"], r
    assert "no text_embedding_projection" in r["gemma_as_checkpoint"], r
