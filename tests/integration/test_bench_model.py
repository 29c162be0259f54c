"""bench/bench_model.py on the CPU (a dry run of a small model): its mode syntax, the outlier items
(`+smooth`, `+lowrank`) reaching the load, and rows for every mode. Skips when COMFYUI_PATH is unset."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from support.comfy_server import REPO, missing_requirements

REASON = missing_requirements()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")
BENCH = os.path.join(REPO, "bench")

PARSE = """
import json, sys
sys.path.insert(0, {bench!r})
import bench_model
out = {{}}
for mode in {modes!r}:
    policy, static, scope, handling = bench_model.parse_mode(bench_model.split_patches(mode)[0])
    out[mode] = [policy, static, scope, handling.smooth_alpha, handling.low_rank_bytes]
print("RESULT " + json.dumps(out))
"""


def test_mode_syntax_takes_outlier_items_beside_the_policy_or_the_scope():
    modes = ["int8-convrot+smooth+compile", "nvfp4+static+smooth=0.3:first=1+lowrank", "fp8-scaled-mm:all+lowrank=0.2",
             "nvfp4:audio8"]
    out = subprocess.run([sys.executable, "-c", PARSE.format(bench=BENCH, modes=modes)], capture_output=True,
                         text=True, timeout=600, cwd=BENCH)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    parsed = json.loads(out.stdout.rsplit("RESULT ", 1)[1])
    assert parsed == {
        "int8-convrot+smooth+compile": ["int8-convrot", False, {}, 0.5, 0.0],
        "nvfp4+static+smooth=0.3:first=1+lowrank": ["nvfp4", True, {"keep_first_blocks": 1}, 0.3, 0.1],
        "fp8-scaled-mm:all+lowrank=0.2": ["fp8-scaled-mm", False, {"policy_scope": False}, 0.0, 0.2],
        "nvfp4:audio8": ["nvfp4", False, {"audio_8bit": True}, 0.0, 0.0]}


def test_cpu_dry_run_loads_with_smoothing_and_the_branch(tmp_path):
    out_json = tmp_path / "rows.json"
    modes = "int8-convrot+smooth;nvfp4+smooth+lowrank=0.2;fp8-scaled-mm+smooth=0.2"
    out = subprocess.run([sys.executable, os.path.join(BENCH, "bench_model.py"), "--blocks", "2", "--width", "256",
                          "--sizes", "64x64x9", "--modes", modes, "--out", str(out_json)],
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "FAILED" not in out.stdout, out.stdout[-3000:]
    reports = [line for line in out.stdout.splitlines() if line.startswith("outlier handling: ")]
    assert len(reports) == 3, out.stdout[-3000:]
    # "outlier handling: N layers smoothed, M with a low-rank branch (...)": the nvfp4 mode branches.
    counts = [(int(r.split()[2]), int(r.split(", ")[1].split()[0])) for r in reports]
    assert all(smoothed > 0 for smoothed, _ in counts) and counts[1][1] > 0, reports
    assert all("synthetic per-channel amax" in r for r in reports)
    with open(out_json) as f:
        rows = json.load(f)["rows"]
    assert [r["mode"] for r in rows] == modes.split(";")
    assert all(r["s_per_step"] > 0 for r in rows)
