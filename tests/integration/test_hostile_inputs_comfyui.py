"""Issue #23 in a real ComfyUI server (headless, CPU): names the Save node must not write, report files
the Quality Report must not replace unasked, a header config ComfyUI would sample NaN from, and
estimate-route queries that used to cost minutes of server CPU or an HTTP 500. Each must end in an
error that names the value, before anything is computed or written; the server goes on. Skips when
COMFYUI_PATH is unset."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from support import faults
from support.comfy_server import TINY_CONFIG, loader_node, missing_requirements, sampling_graph, write_tiny_model
from quant import ltx2
from quant.safetensors_io import save_tensors

REASON = missing_requirements()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

GOOD = "ltx2q_test_hostile.safetensors"
NAN_CONFIG = "ltx2q_test_hostile_nan_config.safetensors"
CONFIG = ltx2.tiny_config(**TINY_CONFIG)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy")
    models = root / "models" / "diffusion_models"
    models.mkdir(parents=True)
    write_tiny_model(models / GOOD, seed=3, config=CONFIG)
    save_tensors(models / NAN_CONFIG, ltx2.synthetic_state_dict(CONFIG, seed=3),
                 ltx2.header_metadata({**CONFIG, "timestep_scale_multiplier": float("nan")}))
    return root


@pytest.fixture(scope="module")
def server(base):
    s = faults.start_server(str(base))
    yield s
    s.stop()


def models_folder(base) -> str:
    return os.path.join(str(base), "models", "diffusion_models")


def save_graph(folder: str, filename: str, overwrite: bool = False) -> dict:
    return {"1": loader_node(GOOD, "nvfp4"),
            "2": {"class_type": "LTX2QuantSave", "inputs": {"model": ["1", 0], "folder": folder, "filename": filename,
                                                            "comfy_compatible": True, "overwrite": overwrite}}}


def test_nan_in_the_header_config_is_refused_by_name(server, base):
    # It loaded, and the model sampled an all-NaN latent.
    message = faults.error_message(server, sampling_graph(loader_node(NAN_CONFIG, "fp8-scaled-mm"), "nan_config"))
    assert NAN_CONFIG in message and "timestep_scale_multiplier=nan" in message, message


@pytest.mark.parametrize("filename,needle", [
    ("CON", "is a device on Windows"), ("nul", "is a device on Windows"), ("aux.v2", "is a device on Windows"),
    ("com1", "is a device on Windows"), ("two\nlines", "not printable text"), ("bell\x07", "not printable text"),
    ("lone\udc80surrogate", "not printable text"), ("what?", "which Windows does not allow"),
    ("m" * 260, "the file name is too long"),
])
def test_save_refuses_names_before_writing(server, base, filename, needle):
    # A 250+ character name wrote the whole model before the rename failed; a lone surrogate gave
    # UnicodeEncodeError; device names and newlines were written.
    before = sorted(os.listdir(models_folder(base)))
    message = faults.error_message(server, save_graph(models_folder(base), filename))
    assert needle in message, message
    assert sorted(os.listdir(models_folder(base))) == before


def test_save_into_a_listed_folder_that_does_not_exist_yet(server, base):
    # ComfyUI lists model folders that may not exist: the temp file failed with FileNotFoundError.
    spec = server.get("/object_info/LTX2QuantSave")["LTX2QuantSave"]["input"]["required"]["folder"]
    folders = spec[0] if isinstance(spec[0], list) else spec[1]["options"]  # v0.33: ["COMBO", {"options": ...}]
    missing = [f for f in folders if not os.path.exists(f) and f.startswith(str(base))]
    assert missing, folders
    server.run(save_graph(missing[0], "ltx2q_test_new_folder"))
    assert os.path.getsize(os.path.join(missing[0], "ltx2q_test_new_folder.safetensors")) > 0


def report_graph(name: str, overwrite: bool) -> dict:
    graph = sampling_graph(loader_node(GOOD, "bf16"), "unused")
    return {"1": graph["1"], "2": graph["2"], "5": graph["5"], "11": loader_node(GOOD, "fp8-scaled-mm"),
            "9": {"class_type": "LTX2QuantQualityReport",
                  "inputs": {"reference": ["1", 0], "model": ["11", 0], "positive": ["2", 0], "negative": ["2", 1],
                             "latent": ["2", 2], "sigmas": ["5", 0], "cfg": 1.0, "seed": 1, "worst_layers": 3,
                             "report_name": name, "overwrite": overwrite}}}


def test_quality_report_replaces_files_only_when_told(server, base):
    # report_name overwrote any file in the output folder (a ComfyUI_00001_.png, my_notes.json).
    name = "ltx2q_test_my_notes"
    json_path, png_path = (os.path.join(server.output, name + ext) for ext in (".json", ".png"))
    os.makedirs(server.output, exist_ok=True)
    with open(png_path, "w") as f:
        f.write("an image of mine")
    message = faults.error_message(server, report_graph(name, overwrite=False))
    assert message.strip() == f"FileExistsError: {png_path} exists; enable overwrite to replace it", message
    assert open(png_path).read() == "an image of mine" and not os.path.exists(json_path)
    server.run(report_graph(name, overwrite=True))
    assert json.load(open(json_path))["models"] and os.path.getsize(png_path) > 1000


def estimate(server, **query) -> tuple[int, dict]:
    url = f"http://127.0.0.1:{server.port}/ltx2_quant/estimate?" + urllib.parse.urlencode(query, safe=",*")
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("name,value", [("width", "32" + "0" * 4000), ("width", "32" + "0" * 5000),
                                        ("frames", "8" + "0" * 400 + "1"), ("height", "-64"), ("height", "٣٢"),
                                        ("height", "abc")])
def test_estimate_refuses_sizes_comfyui_cannot_make(server, name, value):
    # 4,000-digit widths and frames=8e400+1 gave HTTP 500.
    query = {"policy": "nvfp4", "width": "768", "height": "512", "frames": "121", name: value}
    status, answer = estimate(server, **query)
    assert status == 200 and answer["total_gib"] is None, answer
    assert answer["errors"] == [f"{name} must be a whole number from 1 to 16,384, got "
                                + (repr(value) if len(value) <= 20 else f"{value[:20]!r}... ({len(value):,} characters)")]


def test_estimate_bounds_the_work_of_a_query(server):
    # ~3,900 exclude patterns: 40 concurrent requests took 302 s of server CPU.
    status, answer = estimate(server, policy="auto", width=768, height=512, frames=121, exclude=",".join(["a"] * 3900))
    assert status == 400 and "exclude: 3,900 patterns, more than the 64" in answer["errors"][0], answer
    status, answer = estimate(server, policy="auto", width=768, height=512, frames=121, keep_first_blocks="9" * 4000)
    assert status == 400 and "keep_first_blocks must be a whole number from 0 to 48" in answer["errors"][0], answer
    patterns = ",".join(f"*.attn{i}.*" for i in range(64))  # the most a scope takes
    start = time.perf_counter()
    status, answer = estimate(server, policy="auto", width=768, height=512, frames=121, exclude=patterns)
    assert status == 200 and answer["total_gib"] > 0, answer
    assert time.perf_counter() - start < 10
