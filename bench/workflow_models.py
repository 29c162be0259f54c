"""The model files bench_workflow.py loads, with random weights: the tiny test set (CPU), or every model of
the distilled LTX-2.3 workflow at its real shapes, written once into the models folder and reused."""

from __future__ import annotations

import glob
import io
import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SIZES = "256x192x17"
CHECKPOINT, CHECKPOINT_FP8 = "ltx-2.3-random.safetensors", "ltx-2.3-random-fp8.safetensors"
GEMMA, GEMMA_FP8 = "gemma_3_12B_it-random.safetensors", "gemma_3_12B_it-random-fp8_scaled.safetensors"
PROJECTION = "ltx-2.3-text-projection-random.safetensors"  # tiny set: the projection apart from the checkpoint
UPSAMPLER = "ltx-2.3-spatial-upscaler-x2-random.safetensors"
# ltx2.md: Conv3d 128 -> 1024, 4 ResBlocks, Conv2d + PixelShuffle(2), 4 ResBlocks, Conv3d 1024 -> 128.
UPSAMPLER_CONFIG = {"_class_name": "LatentUpsampler", "in_channels": 128, "mid_channels": 1024,
                    "num_blocks_per_stage": 4, "dims": 3, "spatial_upsample": True, "temporal_upsample": False,
                    "spatial_scale": 2.0, "rational_resampler": False}
TOKENIZER_TEXT = ["A woman with long brown hair walks along a beach at sunset, waves rolling in.",
                  "A red car drives through a rainy city street at night, neon lights reflecting on the asphalt.",
                  "The camera slowly pushes in on an old man playing chess in a sunny park.",
                  "A cat jumps onto a wooden table and knocks over a glass of water."] * 8


def sentencepiece_tokenizer(vocab_size: int) -> torch.Tensor:
    """A SentencePiece model with Gemma's pad 0, eos 1, bos 2 and unk 3, as the uint8 tensor ComfyUI's Gemma
    files carry (the real tokenizer is not needed for random weights: every prompt is padded to 1,024 tokens)."""
    import sentencepiece  # a ComfyUI requirement
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(TOKENIZER_TEXT), model_writer=model,
                                             vocab_size=vocab_size, hard_vocab_limit=False, pad_id=0, eos_id=1,
                                             bos_id=2, unk_id=3, minloglevel=2)
    return torch.frombuffer(bytearray(model.getvalue()), dtype=torch.uint8)


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
        from bench import workflow_random
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


def header_config(path: str) -> dict:
    """The `config` JSON of a release checkpoint's header (only the header is read)."""
    from quant.safetensors_io import SafetensorsFile, parse_json
    with SafetensorsFile(path) as f:
        if "config" not in f.metadata:
            raise SystemExit(f"{path}: no 'config' in its header; --config-from takes a release LTX-2.3 checkpoint")
        return parse_json(f.metadata["config"])
