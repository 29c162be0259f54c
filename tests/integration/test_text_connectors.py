"""Text connectors kept in host memory and streamed when they run (issue #4, nodes/streaming.py),
through ComfyUI's real model management: connector_streaming_check.py runs each scenario in a fresh
ComfyUI process (CPU) and prints what it saw. Skips when COMFYUI_PATH is unset."""

from __future__ import annotations

import pytest
from support.comfy_server import missing_requirements, run_check

REASON = missing_requirements()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def run_scenario(name: str) -> dict:
    return run_check("connector_streaming_check.py", name, timeout=600)


def test_streamed_connectors_sample_bit_exact_over_rounds():
    """bf16, nvfp4, fp8-scaled-mm (connectors bf16) and fp8-scaled-mm with the connectors quantized:
    the sampled latent (raw text context, so the connectors run) equals the resident model's, again
    after an unload, and the layers end in low-VRAM state with their weights untouched."""
    for label, r in run_scenario("equal").items():
        assert r["equal"], (label, r["max_diff"])
        assert r["rounds_equal"] and r["weights_kept"] and r["callback_registered"], (label, r)
        assert r["state"] == [[True, True, 0]], (label, r)  # comfy_cast_weights, prev kept, no patch functions


def test_lora_on_streamed_connectors_applies_per_call_and_never_twice():
    for label, r in run_scenario("lora").items():
        # The LoRA matters, and the streamed model follows the resident one (the merged weight adds
        # one rounding: bf16 stochastic rounding, or re-quantization to FP8 for quantized connectors).
        assert r["lora_effect"] > 0.02, (label, r)
        assert r["rel_to_resident"] < (1e-3 if label == "bf16" else 0.5 * r["lora_effect"]), (label, r)
        assert r["patch_functions"] == 1 and r["rounds_equal"] and r["weights_untouched"], (label, r)
        # A load that forces patched weights (saving) merges them into the host copy, once.
        assert r["merged_changed"] and r["merged_functions"] == 0, (label, r)
        assert abs(r["merged_rel"] - r["rel_to_resident"]) < 1e-3, (label, r)


def test_partial_load_leaves_the_budget_to_the_other_layers():
    for policy, r in run_scenario("partial").items():
        assert r["lowvram"] and r["loaded_le_budget"] and r["listed_streamed"] == 0, (policy, r)
        assert r["equal"] and r["cast"], (policy, r)
        assert not r["after_unpatch_prev"], (policy, r)  # unpatching wiped the low-VRAM state


def test_auto_weighs_only_the_layers_that_stay_on_the_gpu():
    r = run_scenario("sizes")
    assert r["connector_bytes"] > 0 and r["differences"] == [r["connector_bytes"]], r
    assert r["streams_here"] is False, r  # CPU-only ComfyUI: the model is offloaded where it runs


def test_full_loads_leave_no_stale_pinned_memory_and_size_leaves_the_streamed_layers_out():
    r = run_scenario("pinning")
    assert r["size"] == r["whole"] - r["connector_bytes"], r
    for cycle in r["cycles"]:
        # Only the streamed layers are pinned (the rest is resident), each once, all of them live.
        assert cycle["registered"] == r["connector_bytes"] and cycle["stale"] == 0, r
        assert cycle["loaded"] == r["size"], r  # a full load counts what is resident, nothing streamed
    assert r["after_unpatch"] == 0, r
