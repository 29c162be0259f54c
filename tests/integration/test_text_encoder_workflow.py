"""The LTX-2.3 workflow with the pack's text encoder and decode through a real ComfyUI server's /prompt
(its executor: validation, caching, UI output): the tiny Gemma-3-shaped encoder at nvfp4 conditions the
tiny transformer at fp8-scaled-mm through the two-stage sampler, LTX-2 Video Decode decodes the result.
Skips when COMFYUI_PATH is unset."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
from support.comfy_server import DISTILLED_STAGE1, HERE, loader_node, missing_requirements, saved_latent

REASON = missing_requirements()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

CHECKPOINT = "ltx2q_test_full.safetensors"
PROJECTION = "ltx2q_test_text_projection.safetensors"
GEMMA = "gemma_3_tiny.safetensors"
UPSAMPLER = "ltx2q_test_upsampler.safetensors"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy_text_encoder")
    models = {name: root / "models" / name for name in ("checkpoints", "text_encoders", "latent_upscale_models")}
    for folder in models.values():
        folder.mkdir(parents=True)
    script = os.path.join(HERE, "make_tiny_models.py")
    subprocess.run([sys.executable, script, "ltx2.3", str(models["checkpoints"] / CHECKPOINT),
                    str(models["latent_upscale_models"] / UPSAMPLER)], check=True, timeout=600)
    subprocess.run([sys.executable, script, "gemma3", str(models["text_encoders"] / GEMMA),
                    str(models["checkpoints"] / PROJECTION)], check=True, timeout=600)
    return root


def workflow(prompt: str) -> dict:
    return {
        "1": loader_node(CHECKPOINT, "fp8-scaled-mm"),
        "2": {"class_type": "LTX2QuantTextEncoderLoader", "inputs": {
            "text_encoder": GEMMA, "ckpt_name": PROJECTION, "policy": "nvfp4", "device": "default",
            "compare_to_bf16": True, "save_as": ""}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": prompt}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "blurry, still frame"}},
        "5": {"class_type": "LTXVConditioning", "inputs": {"positive": ["3", 0], "negative": ["4", 0],
                                                           "frame_rate": 24.0}},
        "6": {"class_type": "LTX2QuantVAELoader", "inputs": {"ckpt_name": CHECKPOINT}},
        "7": {"class_type": "LatentUpscaleModelLoader", "inputs": {"model_name": UPSAMPLER}},
        # The empty audio-video latent (the tiny set has no audio VAE); its conditioning outputs are unused.
        "8": {"class_type": "LTX2QTestInputs", "inputs": {"model": ["1", 0], "seed": 1, "frames": 9,
                                                          "height": 128, "width": 128}},
        "9": {"class_type": "ManualSigmas", "inputs": {"sigmas": DISTILLED_STAGE1}},
        "10": {"class_type": "LTX2QuantTwoStageSampler", "inputs": {
            "model": ["1", 0], "positive": ["5", 0], "negative": ["5", 1], "latent": ["8", 2],
            "upscale_model": ["7", 0], "vae": ["6", 0], "noise_seed": 42, "sampler": "euler", "ge_gamma": 2.0,
            "cfg": 1.0, "sigmas_stage1": ["9", 0]}},
        "11": {"class_type": "LTX2QTestSaveLatent", "inputs": {"samples": ["10", 0], "name": "text_encoded"}},
        "12": {"class_type": "LTX2QuantVAEDecode", "inputs": {"samples": ["10", 0], "vae": ["6", 0]}},
        "13": {"class_type": "PreviewImage", "inputs": {"images": ["12", 0]}},
    }


def test_quantized_text_encoder_conditions_the_two_stage_workflow(server, base):
    entry = server.run(workflow("A red fox trots across a snowy clearing at dawn."), timeout=900)
    outputs = entry["outputs"]
    encoder_report = " ".join(outputs["2"]["text"])
    assert "policy nvfp4" in encoder_report and "conditioning vs the file as stored" in encoder_report, outputs["2"]
    assert " ".join(outputs["12"]["text"]).startswith("decoded whole"), outputs["12"]
    assert len(outputs["13"]["images"]) == 9  # 9 frames of 128 x 128
    latent = saved_latent(str(base), "text_encoded")
    assert latent["video"].shape[-2:] == (4, 4) and math.isfinite(float(latent["video"].abs().sum()))
    # The prompt reaches the video: another prompt, another latent.
    server.run(workflow("An old man plays chess in a sunny park.") | {
        "11": {"class_type": "LTX2QTestSaveLatent", "inputs": {"samples": ["10", 0], "name": "other_prompt"}}},
        timeout=900)
    other = saved_latent(str(base), "other_prompt")
    assert float((other["video"] - latent["video"]).norm()) > 1e-3 * float(latent["video"].norm())
