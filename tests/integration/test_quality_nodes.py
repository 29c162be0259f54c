"""Calibrate and Quality report nodes in a real ComfyUI server (headless, CPU) on a tiny random LTX-2.3
model: amax recorded while sampling, the file the Loader reads, static scales on a quantized MODEL,
and the report's numbers, table, plot and files. Skips when COMFYUI_PATH is unset."""

from __future__ import annotations

import json
import os

import pytest
import torch

from support.comfy_server import (DISTILLED_STAGE1, loader_node, missing_requirements, rel, saved_latent,
                                          write_tiny_model)
from quant import calibration, ltx2
from test_comfyui import sample

REASON = missing_requirements()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")
MODEL = "ltx2q_test_quality.safetensors"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy_quality")
    models = root / "models" / "diffusion_models"
    models.mkdir(parents=True)
    (root / "models" / "ltx2_calibration").mkdir()
    write_tiny_model(models / MODEL, seed=11)
    return root


def calibration_folder(base) -> str:
    return os.path.join(str(base), "models", "ltx2_calibration")


def inputs_graph(model_node: dict) -> dict:
    return {"1": model_node,
            "2": {"class_type": "LTX2QTestInputs", "inputs": {"model": ["1", 0], "seed": 1, "frames": 9, "height": 64,
                                                              "width": 96}},
            "5": {"class_type": "ManualSigmas", "inputs": {"sigmas": DISTILLED_STAGE1}}}


def sampling_inputs(model_ref: list) -> dict:
    return {"positive": ["2", 0], "negative": ["2", 1], "latent": ["2", 2], "sigmas": ["5", 0], "cfg": 1.0,
            "seed": 42}


def calibrate_node(base, model_ref: list, filename: str) -> dict:
    return {"class_type": "LTX2QuantCalibrate",
            "inputs": {"model": model_ref, **sampling_inputs(model_ref), "folder": calibration_folder(base),
                       "filename": filename, "overwrite": True}}


def test_calibrate_bf16_writes_the_file_the_loader_uses(server, base):
    name = "ltx2q_test_calibrated.json"
    graph = inputs_graph(loader_node(MODEL, "bf16"))
    graph["9"] = calibrate_node(base, ["1", 0], name)
    entry = server.run(graph)
    path = os.path.join(calibration_folder(base), name)
    raw = json.loads(open(path).read())
    amax = calibration.load_amax(path)
    channels = calibration.load_channel_amax(path)
    blocks = [k for k in amax if ltx2.BLOCK_LINEAR_RE.match(k)]
    assert len(blocks) == 2 * 28  # every block Linear of both blocks saw input
    assert all(key.endswith(".input_quantizer") for key in raw["amax_values"])  # Lightricks' naming
    assert channels["transformer_blocks.0.attn1.to_q"].numel() == 64  # one per input feature of the video width
    assert channels["transformer_blocks.0.audio_attn1.to_q"].numel() == 32
    for layer, value in amax.items():
        assert value == pytest.approx(float(channels[layer].max()), rel=1e-5)
    text = "\n".join(entry["outputs"]["9"]["text"])
    assert "wrote" in text and "per-channel outliers" in text

    ref = sample(server, base, loader_node(MODEL, "bf16"), "q_ref")
    dynamic = sample(server, base, loader_node(MODEL, "fp8-scaled-mm"), "q_dynamic")
    static = sample(server, base, loader_node(MODEL, "fp8-scaled-mm", calibration=name), "q_static")
    assert all(torch.isfinite(t).all() for t in static)
    assert not torch.equal(static[0], dynamic[0])  # the calibrated scales were used
    # amax calibrated on this very input: static scales cost little against per-token dynamic ones
    assert rel(static[0], ref[0]) < 1.5 * rel(dynamic[0], ref[0]) + 1e-3
    assert rel(static[0], ref[0]) < 0.03


def test_calibrated_model_output_matches_loading_its_file(server, base):
    """The MODEL the node returns (static scales patched in) computes what the Loader builds from the
    file the node wrote."""
    name = "ltx2q_test_calibrated_fp8.json"
    graph = inputs_graph(loader_node(MODEL, "fp8-scaled-mm"))
    graph["9"] = calibrate_node(base, ["1", 0], name)
    graph.update({
        "3": {"class_type": "CFGGuider", "inputs": {"model": ["9", 0], "positive": ["2", 0], "negative": ["2", 1],
                                                    "cfg": 1.0}},
        "4": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "6": {"class_type": "RandomNoise", "inputs": {"noise_seed": 42}},
        "7": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["6", 0], "guider": ["3", 0],
                                                                "sampler": ["4", 0], "sigmas": ["5", 0],
                                                                "latent_image": ["2", 2]}},
        "8": {"class_type": "LTX2QTestSaveLatent", "inputs": {"samples": ["7", 0], "name": "q_patched"}},
    })
    entry = server.run(graph)
    # 2 blocks x the 11 quantized Linears that read video tokens: the audio and text-context ones are
    # weight-only, and fp8-scaled-mm keeps the audio-to-video attention's to_out.0 in bf16.
    assert "static activation scales on 22 quantized layers" in "\n".join(entry["outputs"]["9"]["text"])
    patched = tuple(saved_latent(base, "q_patched").values())
    from_file = sample(server, base, loader_node(MODEL, "fp8-scaled-mm", calibration=name), "q_from_file")
    dynamic = sample(server, base, loader_node(MODEL, "fp8-scaled-mm"), "q_dynamic_again")
    assert all(torch.equal(a, b) for a, b in zip(patched, from_file))
    assert not torch.equal(patched[0], dynamic[0])  # and the input MODEL itself stayed dynamic


def test_calibration_sees_the_ffn_gelu_the_quantized_model_moved(server, base):
    """ops.fuse_ffn_gelu moves the FFN's GELU into the quantized ff.net.2, so that layer's own input
    is pre-GELU; the amax the Calibrate node records must still be of what it multiplies (post-GELU),
    as in the bf16 model, or the static scale would be sized for the wrong tensor."""
    # fp8-scaled-mm's default scope under another preset name: ComfyUI runs the loader again (no
    # cached result) and its report reaches this entry.
    graph = inputs_graph(loader_node(MODEL, "fp8-scaled-mm", scope="keep audio-to-video attention"))
    graph["9"] = calibrate_node(base, ["1", 0], "ltx2q_test_gelu_fp8.json")
    graph["10"] = loader_node(MODEL, "bf16")
    graph["11"] = calibrate_node(base, ["10", 0], "ltx2q_test_gelu_bf16.json")
    entry = server.run(graph)
    # The loader's report: 2 blocks x (ff, audio_ff).
    assert "FFN GELU moved into 4 quantized Linears" in "\n".join(entry["outputs"]["1"]["text"])
    quantized, reference = (calibration.load_channel_amax(os.path.join(calibration_folder(base), f))
                            for f in ("ltx2q_test_gelu_fp8.json", "ltx2q_test_gelu_bf16.json"))
    for layer in ("transformer_blocks.0.ff.net.2", "transformer_blocks.1.audio_ff.net.2"):
        # The two models' trajectories differ by the quantization error only.
        assert rel(quantized[layer], reference[layer]) < 0.05, layer


def test_quality_report_numbers_table_plot_and_files(server, base):
    graph = inputs_graph(loader_node(MODEL, "bf16"))
    graph["11"] = loader_node(MODEL, "fp8-scaled-mm")
    graph["12"] = loader_node(MODEL, "nvfp4")
    graph["9"] = {"class_type": "LTX2QuantQualityReport",
                  "inputs": {"reference": ["1", 0], "model": ["11", 0], "model_b": ["12", 0],
                             **sampling_inputs(["1", 0]), "worst_layers": 5, "report_name": "ltx2q_test_report"}}
    entry = server.run(graph)
    outputs = entry["outputs"]["9"]
    text = "\n".join(outputs["text"])
    assert "model (fp8-scaled-mm)" in text and "model_b (nvfp4)" in text and "worst layers" in text
    assert outputs["images"] and outputs["images"][0]["filename"].endswith(".png")
    report = json.loads(open(os.path.join(server.output, "ltx2q_test_report.json")).read())
    assert os.path.getsize(os.path.join(server.output, "ltx2q_test_report.png")) > 1000
    fp8, nvfp4 = report["models"]["model (fp8-scaled-mm)"], report["models"]["model_b (nvfp4)"]
    assert report["streams"] == ["video", "audio"] and len(fp8["velocity_error"]) == 8
    for r in (fp8, nvfp4):
        assert all(0 < e < 0.1 for e in r["final_error"]) and all(c > 0.99 for c in r["final_cosine"])
        assert all(0 < v < 0.1 for v in r["velocity_error"])
        assert all(layer["output_snr_db"] > 15 for layer in r["layers"])
    assert len(fp8["layers"]) == 2 * 25 and len(nvfp4["layers"]) == 2 * 28  # fp8: 3 a2v Linears kept bf16
    # 4-bit weights lose more than 8-bit ones, layer by layer and end to end
    assert nvfp4["final_error"][0] > fp8["final_error"][0]
    assert sum(x["weight_error"] for x in nvfp4["layers"]) > 2 * sum(x["weight_error"] for x in fp8["layers"])


def test_quality_report_refuses_a_quantized_reference(server, base):
    graph = inputs_graph(loader_node(MODEL, "nvfp4"))
    graph["9"] = {"class_type": "LTX2QuantQualityReport",
                  "inputs": {"reference": ["1", 0], "model": ["1", 0], **sampling_inputs(["1", 0]),
                             "worst_layers": 5}}
    with pytest.raises(RuntimeError, match="full-precision"):
        server.run(graph)


def test_no_test_file_left_in_comfyui_models():
    models = os.path.join(os.environ["COMFYUI_PATH"], "models", "ltx2_calibration")
    left = os.listdir(models) if os.path.isdir(models) else []
    assert not [f for f in left if f.startswith("ltx2q_test")]
