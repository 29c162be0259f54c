"""The pack's video decode (nodes/decode.py, node LTX2QuantVAEDecode) on the tiny LTX-2.3 VAE: whole when
ComfyUI's estimate fits the free memory, tiled when it does not, each bit-identical to core's VAE Decode /
VAE Decode (Tiled) at the same settings. Run by decode_check.py in one ComfyUI process (CPU). Skips when
COMFYUI_PATH is unset."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support.comfy_server import HERE, missing_requirements, run_check

REASON = missing_requirements()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    folder = tmp_path_factory.mktemp("decode")
    checkpoint = folder / "ltx2q_test_full.safetensors"
    subprocess.run([sys.executable, os.path.join(HERE, "make_tiny_models.py"), "ltx2.3", str(checkpoint),
                    str(folder / "upsampler.safetensors")], check=True, timeout=600)
    return run_check("decode_check.py", checkpoint, timeout=900)


def test_whole_decode_when_it_fits_equals_core_vae_decode(result):
    assert result["whole_text"].startswith("decoded whole"), result
    assert result["whole_equal"] and result["shape"] == [17, 384, 512, 3], result


def test_tiles_chosen_within_the_budget_equal_core_tiled_decode(result):
    tile, frames, fits = result["tiled_plan"]
    assert tile is not None and tile < 512 and fits, result  # half the whole decode's estimate: tiles needed
    assert result["tiled_text"].startswith(f"decoded in {tile} px tiles"), result
    assert result["tiled_equal"] and result["tiled_shape"] == result["shape"], result
