"""The model files bench_workflow.py loads, with random weights: the tiny test set (CPU), or every model of
the distilled LTX-2.3 workflow at its real shapes, written once into the models folder and reused."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SIZES = "256x192x17"
CHECKPOINT, CHECKPOINT_FP8 = "ltx-2.3-random.safetensors", "ltx-2.3-random-fp8.safetensors"
GEMMA, GEMMA_FP8 = "gemma_3_12B_it-random.safetensors", "gemma_3_12B_it-random-fp8_scaled.safetensors"
PROJECTION = "ltx-2.3-text-projection-random.safetensors"  # tiny set: the projection apart from the checkpoint
UPSAMPLER = "ltx-2.3-spatial-upscaler-x2-random.safetensors"


def register(folder: str) -> None:
    import folder_paths
    for kind in ("checkpoints", "text_encoders", "latent_upscale_models", "diffusion_models", "vae"):
        folder_paths.add_model_folder_path(kind, os.path.join(folder, kind))
        os.makedirs(os.path.join(folder, kind), exist_ok=True)


def prepare(folder: str, tiny: bool, config_from: str | None) -> dict:
    folder = os.path.join(folder, "tiny" if tiny else "full")
    register(folder)
    files = {"checkpoint": CHECKPOINT, "checkpoint_fp8": CHECKPOINT_FP8, "gemma": GEMMA, "gemma_fp8": GEMMA_FP8,
             "upsampler": UPSAMPLER, "projection": PROJECTION if tiny else CHECKPOINT, "audio": not tiny}
    path = {name: os.path.join(folder, kind, files[name]) for name, kind in (
        ("checkpoint", "checkpoints"), ("checkpoint_fp8", "checkpoints"), ("gemma", "text_encoders"),
        ("gemma_fp8", "text_encoders"), ("upsampler", "latent_upscale_models"))}
    if tiny:
        _tiny(path, os.path.join(folder, "checkpoints", PROJECTION))
    else:
        from bench import workflow_random  # imports ComfyUI's model classes: only for the full-size set
        workflow_random.write_all(path, config_from)
    return files


def _tiny_models_script() -> str:
    """make_tiny_models.py, wherever the test suite keeps it."""
    found = sorted(glob.glob(os.path.join(REPO, "tests", "integration", "**", "make_tiny_models.py"), recursive=True))
    if not found:
        raise SystemExit("tests/integration/.../make_tiny_models.py not found: the tiny set is built by it")
    return found[0]


def _tiny(path: dict, projection: str) -> None:
    from quant import conversion
    from quant.policies import get_policy
    if not os.path.exists(path["checkpoint"]):
        subprocess.run([sys.executable, _tiny_models_script(), "ltx2.3", path["checkpoint"], path["upsampler"]],
                       check=True)
    if not os.path.exists(path["gemma"]):
        subprocess.run([sys.executable, _tiny_models_script(), "gemma3", path["gemma"], projection], check=True)
    if not os.path.exists(path["checkpoint_fp8"]):  # stock ComfyUI's FP8 layout: one scale per tensor
        conversion.quantize_file(path["checkpoint"], path["checkpoint_fp8"],
                                 get_policy("fp8-scaled-mm", fp8_per_tensor=True))
    if not os.path.exists(path["gemma_fp8"]):
        os.link(path["gemma"], path["gemma_fp8"])  # core's text-encoder loader cannot build a tiny Gemma anyway
