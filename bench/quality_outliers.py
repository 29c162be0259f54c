"""Random LTX-2.3-shaped weights with injected outlier channels (CPU, fp32 reference): how much each
outlier option (quant.outliers: smoothing from a calibration's per-channel amax, the low-rank branch)
lowers each policy's error, per Linear and through a few residual blocks.

Random Gaussian activations have no outlier channels; real transformers do (bench/quality_real_weights.py).
The recipe below reproduces the ratios measured there (per-channel amax over 5 calibration sentences,
all-MiniLM-L6-v2): the bulk of the channels spreads like a log-normal (99th percentile 2-6x the median
channel), about 1% of the channels stand 4x or more above the median, and the largest reaches 5-9x on
the attention inputs, 11-25x on the FFN inputs and 24-42x on the FFN outputs' inputs (after the GELU).
Each channel's gain is part of the model (as a norm's weight is): calibration and evaluation draw
different tokens through the same gains. The few-block model's measured input ratios (printed) match
the proxy's: 8x attention inputs, ~7x attention output, ~25x FFN input, ~42x FFN output.

The "few-block model" is not LTX-2.3's block: per block, pre-norm self-attention (q, k, v, o at the
model width, heads of 128) and a pre-norm GELU feed-forward (width -> 4x width -> width), residual, the
gains above on each Linear's input. It shows how the per-Linear gains carry through residual blocks;
the 48-block LTX-2.3 run (bench_model.py) needs a GPU.

    python bench/quality_outliers.py [--width 4096] [--blocks 2] [--tokens 256] [--markdown]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from quant.calibration import AmaxRecorder, outlier_ratio
from quant.outliers import NONE, Outliers
from quant.reference import reference_linear, relative_error
from quant.weights import FP8_ROWWISE, INT8, INT8_CONVROT, MXFP8, NVFP4, quantize_weight

# Largest / median gain on each Linear's input. The attention output and the GELU output are already
# uneven across channels before their gains, so theirs are smaller: the measured input ratios
# (printed by main) then land on the real proxy's upper ends, 8x / 25x on the attention and FFN inputs,
# 7x on the attention output, 42x on the FFN output.
ATTENTION_RATIO, ATTENTION_OUT_RATIO, FFN_IN_RATIO, FFN_OUT_RATIO = 8.0, 3.5, 25.0, 21.0
OUTLIER_FRACTION = 0.01  # channels at 4x the median or more
BULK_SIGMA = 0.35  # log-normal spread of the other channels: 99th percentile ~2.3x the median
SMOOTH = Outliers(smooth_alpha=0.5)
SMOOTH_BRANCH = Outliers(smooth_alpha=0.5, low_rank_bytes=0.1)
# (label, weight format, activation, outlier handling): each policy as it runs today and with the options.
VARIANTS = [
    ("fp8-scaled-mm", FP8_ROWWISE, "fp8", NONE), ("fp8-scaled-mm + smoothing", FP8_ROWWISE, "fp8", SMOOTH),
    ("mxfp8", MXFP8, "fp8", NONE), ("mxfp8 + smoothing", MXFP8, "fp8", SMOOTH),
    ("int8-scaled-mm", INT8, "int8", NONE), ("int8-scaled-mm + smoothing", INT8, "int8", SMOOTH),
    ("int8-convrot", INT8_CONVROT, "int8", NONE), ("int8-convrot + smoothing", INT8_CONVROT, "int8", SMOOTH),
    ("nvfp4 (exact)", NVFP4, "none", NONE), ("nvfp4 + smoothing", NVFP4, "none", SMOOTH),
    ("nvfp4 + smoothing + low-rank", NVFP4, "none", SMOOTH_BRANCH),
]


def outlier_gains(channels: int, max_ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Per-channel gains whose largest is `max_ratio` times the median: a log-normal bulk and
    OUTLIER_FRACTION of the channels log-uniform between 4x and max_ratio (one of them at max_ratio)."""
    gains = torch.exp(BULK_SIGMA * torch.randn(channels, generator=generator))
    count = max(1, round(OUTLIER_FRACTION * channels))
    picked = torch.randperm(channels, generator=generator)[:count]
    gains[picked] = gains.median() * 4.0 * (max_ratio / 4.0) ** torch.rand(count, generator=generator)
    gains = gains / gains.median()
    gains[picked[0]] = max_ratio  # above the median, so the median stays 1
    return gains


class Block:
    """One residual block of the few-block model (module docstring), fp32 weights and gains."""

    def __init__(self, width: int, generator: torch.Generator, prefix: str):
        def linear(n, k, gain=1.0):
            return torch.randn(n, k, generator=generator) * (gain / math.sqrt(k))
        self.weights = {f"{prefix}.attn.to_q": linear(width, width), f"{prefix}.attn.to_k": linear(width, width),
                        f"{prefix}.attn.to_v": linear(width, width), f"{prefix}.attn.to_out": linear(width, width, 0.5),
                        f"{prefix}.ff.proj_in": linear(4 * width, width), f"{prefix}.ff.proj_out": linear(width, 4 * width, 0.5)}
        self.gains = {"attn": outlier_gains(width, ATTENTION_RATIO, generator),
                      "attn_out": outlier_gains(width, ATTENTION_OUT_RATIO, generator),
                      "ff_in": outlier_gains(width, FFN_IN_RATIO, generator),
                      "ff_out": outlier_gains(4 * width, FFN_OUT_RATIO, generator)}
        self.prefix = prefix

    def __call__(self, h: torch.Tensor, linear) -> torch.Tensor:
        p, heads = self.prefix, h.shape[-1] // 128
        x = torch.nn.functional.rms_norm(h, (h.shape[-1],)) * self.gains["attn"]
        q, k, v = (linear(f"{p}.attn.{m}", x).reshape(len(h), heads, -1).transpose(0, 1) for m in ("to_q", "to_k", "to_v"))
        context = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(h.shape)
        h = h + linear(f"{p}.attn.to_out", context * self.gains["attn_out"])
        x = torch.nn.functional.rms_norm(h, (h.shape[-1],)) * self.gains["ff_in"]
        inner = torch.nn.functional.gelu(linear(f"{p}.ff.proj_in", x), approximate="tanh") * self.gains["ff_out"]
        return h + linear(f"{p}.ff.proj_out", inner)


def run_model(blocks: list[Block], h: torch.Tensor, linear) -> torch.Tensor:
    for block in blocks:
        h = block(h, linear)
    return h


def measure(width: int, num_blocks: int, tokens: int, seed: int = 0, log=print) -> dict:
    g = torch.Generator().manual_seed(seed)
    blocks = [Block(width, g, f"blocks.{n}") for n in range(num_blocks)]
    weights = {name: w for block in blocks for name, w in block.weights.items()}
    full = lambda name, x: x @ weights[name].t()
    recorder = AmaxRecorder()

    def observed(name, x):
        recorder.observe(name, x)
        return full(name, x)
    run_model(blocks, torch.randn(tokens, width, generator=g), observed)  # calibration tokens
    channels = recorder.per_channel()
    inputs = {}

    def captured(name, x):  # each Linear's fp32-model input on the evaluation tokens
        inputs[name] = x
        return full(name, x)
    evaluation = torch.randn(tokens, width, generator=g)
    reference = run_model(blocks, evaluation, captured)
    rows = []
    for label, fmt, activation, handling in VARIANTS:
        start = time.perf_counter()
        quantized = {name: quantize_weight(w, fmt, handling, channels[name]) for name, w in weights.items()}
        layer_error = {name: relative_error(reference_linear(inputs[name], qw, None, activation), full(name, inputs[name]))
                       for name, qw in quantized.items()}
        output = run_model(blocks, evaluation,
                           lambda name, x, layers=quantized, mode=activation: reference_linear(x, layers[name], None, mode))
        extra = sum(qw.nbytes for qw in quantized.values()) / sum(quantize_weight(w, fmt).nbytes for w in weights.values()) - 1
        rows.append({"variant": label, "layer_error": layer_error, "model_error": relative_error(output, reference),
                     "extra_bytes": extra})
        log(f"{label}: model error {rows[-1]['model_error']:.4f} ({time.perf_counter() - start:.0f} s)")
    return {"rows": rows, "outliers": {name: outlier_ratio(c) for name, c in channels.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=4096, help="model width (LTX-2.3's video stream: 4096)")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    result = measure(args.width, args.blocks, args.tokens, args.seed, log=lambda s: print(s, file=sys.stderr))
    kinds = sorted({name.split(".", 2)[2] for name in result["rows"][0]["layer_error"]})
    print("input outliers (max/median channel amax): " + ", ".join(
        f"{k} {max(r for n, r in result['outliers'].items() if n.endswith(k)):.0f}x" for k in kinds))
    sep = " | " if args.markdown else "  "
    header = ["variant", *kinds, f"{args.blocks}-block model", "extra bytes"]
    print(("| " if args.markdown else "") + sep.join(header) + (" |" if args.markdown else ""))
    if args.markdown:
        print("|" + " --- |" * len(header))
    for row in result["rows"]:
        mean = [sum(e for n, e in row["layer_error"].items() if n.endswith(k)) / args.blocks for k in kinds]
        cells = [row["variant"], *(f"{e:.4f}" for e in mean), f"{row['model_error']:.4f}", f"{row['extra_bytes'] * 100:.1f}%"]
        print(("| " if args.markdown else "") + sep.join(cells) + (" |" if args.markdown else ""))


if __name__ == "__main__":
    main()
