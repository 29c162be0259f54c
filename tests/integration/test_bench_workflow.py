"""bench/bench_workflow.py --tiny: the end-to-end workflow benchmark's graphs (core's two-stage template and
the pack's workflow, text- and image-to-video) run through this ComfyUI's node classes on the tiny models,
on the CPU, and its phase split. Skips when COMFYUI_PATH is unset."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from support.comfy_server import REPO, missing_requirements

REASON = missing_requirements()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")
# Every phase the tiny set has; it has no audio VAE, so nothing is timed as "audio decode".
RUN_PHASES = ("load files", "text encode", "stage 1", "upsample", "stage 2", "video decode", "GPU loads/moves")


def bench(tmp_path, *args: str) -> list[dict]:
    out_json = tmp_path / "rows.json"
    out = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench_workflow.py"), "--tiny",
                          "--models-dir", str(tmp_path / "models"), "--out", str(out_json), *args],
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(out_json) as f:
        return json.load(f)["rows"]


def check_split(row: dict) -> None:
    seconds = row["seconds"]
    for phase in RUN_PHASES:
        assert seconds[phase] > 0, (row["mode"], phase, seconds)
    assert seconds["audio decode"] == 0, seconds
    # The phases partition the run: each second counted once (nested loads/moves taken out of their phase).
    assert abs(sum(seconds.values()) - row["total_s"]) < 0.02 * row["total_s"], (sum(seconds.values()), row)
    assert max(row["peak_rss_gib"].values()) > 0.1, row


def test_text_to_video_core_template_and_pack_workflow_phase_split(tmp_path):
    rows = bench(tmp_path, "--modes", "core bf16,core fp8,fp8-scaled-mm,nvfp4")
    assert [r["mode"] for r in rows] == ["core bf16", "core fp8", "fp8-scaled-mm", "nvfp4"]
    for row in rows:
        check_split(row)
        assert row["size"] == "256x192x17" and row["i2v"] is False


def test_image_to_video_phase_split(tmp_path):
    rows = bench(tmp_path, "--modes", "core bf16,int8-convrot", "--i2v")
    for row in rows:
        check_split(row)
        assert row["i2v"] is True
