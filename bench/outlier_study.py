"""What limits each format on the real-weights proxy (all-MiniLM-L6-v2, bench/quality_real_weights.py),
and which outlier transforms pay, as a study: fake quantization in fp32 (quantize, dequantize) with
the pack's formats, so that transforms no format stores yet can be measured too (block rotation of
FP8 / MXFP8 / NVFP4 weights, rotation groups ComfyUI's ConvRot does not use). Sentence-embedding
cosine vs fp32, worst of the 8 evaluation sentences, as in quality_real_weights.py.

    python bench/outlier_study.py --per-layer   # 1 - cosine with one Linear quantized at a time
    python bench/outlier_study.py --grid        # rotation group x smoothing alpha (x low-rank bytes)

Rotation: x @ blockdiag(H) and W @ blockdiag(H) (formats.rotate_groups; a layer whose width is not a
multiple of the group stays unrotated). Smoothing: s = amax(x_j)^alpha / amax(W[:, j])^(1 - alpha), W * s
quantized, x / s quantized. Low-rank: the top singular directions of the smoothed weight in bf16, as
many as `fraction` of the 8-bit (NVFP4: 4-bit) weight's bytes pay for, the residual quantized.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from quant import formats
from quant.calibration import outlier_ratio
from quant.quality import cosine_similarity
from quant.reference import quantize_activation_reference
from quant.weights import FP8_ROWWISE, INT8, MXFP8, NVFP4, quantize_weight

_spec = importlib.util.spec_from_file_location("quality_real_weights", os.path.join(ROOT, "bench", "quality_real_weights.py"))
proxy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(proxy)
NAMES = [f"encoder.layer.{n}.{m}" for n in range(6) for m in proxy.LINEARS]


class Study:
    def __init__(self):
        self.weights, vocab = proxy.load_weights(), proxy.load_vocab()
        self.channels = proxy.calibrate(self.weights, vocab).per_channel()
        self.inputs = [proxy.tokenize(text, vocab) for text in proxy.EVALUATION]
        self.reference = proxy.encode(self.weights, self.inputs, proxy.full_precision(self.weights))

    def cosine(self, linear) -> float:
        states = proxy.encode(self.weights, self.inputs, linear)
        return min(cosine_similarity(proxy.sentence_embedding(s), proxy.sentence_embedding(r))
                   for s, r in zip(states, self.reference))

    def linear(self, fmt: str, activation: str, alpha: float = 0.0, group: int = 0, low_rank: float = 0.0,
               only: set | None = None):
        """The encoder's Linears with `fmt` weights ("bf16": weights unquantized) and `activation`
        ("none", "fp8", "int8") activations, transformed; `only`: the other Linears stay fp32."""
        def rotate(t):
            return formats.rotate_groups(t, group) if group and t.shape[-1] % group == 0 else t
        layers = {}
        for name in NAMES:
            if only is not None and name not in only:
                continue
            w = self.weights[name + ".weight"]
            s = torch.ones(w.shape[1])
            if alpha:
                s = self.channels[name].clamp(min=1e-8) ** alpha / w.abs().amax(0).clamp(min=1e-8) ** (1 - alpha)
            smoothed, branch = w * s, None
            if low_rank:
                n, k = w.shape
                rank = int(low_rank * n * k * (0.5 if fmt == NVFP4 else 1.0) // ((n + k) * 2))
                u, sv, vh = torch.linalg.svd(smoothed, full_matrices=False)
                branch = ((u[:, :rank] * sv[:rank]).bfloat16().float(), vh[:rank].bfloat16().float())
                smoothed = smoothed - branch[0] @ branch[1]
            stored = rotate(smoothed)
            if fmt != "bf16":
                stored = quantize_weight(stored, fmt).dequantize()
            layers[name] = (s, stored, branch)

        def run(name, x):
            bias = self.weights[name + ".bias"]
            if name not in layers:
                return x @ self.weights[name + ".weight"].t() + bias
            s, stored, branch = layers[name]
            xs = rotate(x / s)
            if activation != "none":
                xs = quantize_activation_reference(xs, None, activation)
            y = xs @ stored.t() + bias
            return y if branch is None else y + ((x / s) @ branch[1].t()) @ branch[0].t()
        return run


def per_layer(study: Study) -> None:
    cases = [("fp8 weights", FP8_ROWWISE, "none"), ("fp8 activations", "bf16", "fp8"),
             ("int8 activations", "bf16", "int8"), ("nvfp4 weights", NVFP4, "none")]
    print("| Linear | input outliers | " + " | ".join(c[0] for c in cases) + " |")
    print("|" + " --- |" * (len(cases) + 2))
    totals = [0.0] * len(cases)
    for name in NAMES:
        drops = [1 - study.cosine(study.linear(fmt, act, only={name})) for _, fmt, act in cases]
        totals = [t + d for t, d in zip(totals, drops)]
        print(f"| {name.replace('encoder.layer.', 'L')} | {outlier_ratio(study.channels[name]):.0f}x | "
              + " | ".join(f"{d * 1e4:.2f}" for d in drops) + " |", flush=True)
    print("| sum | | " + " | ".join(f"{t * 1e4:.2f}" for t in totals) + " |")
    print("(1 - sentence cosine) x 1e4 with that Linear alone quantized")


def grid(study: Study) -> None:
    print("| format | activations | rotation group | smoothing alpha | low-rank bytes | sentence cosine |")
    print("| --- | --- | --- | --- | --- | --- |")
    runs = [(fmt, act, g, a, 0.0) for fmt, act in ((INT8, "int8"), (FP8_ROWWISE, "fp8"), (MXFP8, "fp8"), (NVFP4, "none"))
            for g in (0, 16, 64, 256) for a in (0.0, 0.5)]
    runs += [(fmt, act, g, 0.5, lr) for fmt, act, g in ((INT8, "int8", 0), (INT8, "int8", 256), (FP8_ROWWISE, "fp8", 0),
                                                       (MXFP8, "fp8", 0), (NVFP4, "none", 0)) for lr in (0.1, 0.25)]
    for fmt, act, g, a, lr in runs:
        cosine = study.cosine(study.linear(fmt, act, alpha=a, group=g, low_rank=lr))
        print(f"| {fmt} | {act} | {g or '-'} | {a or '-'} | {lr or '-'} | {cosine:.5f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-layer", action="store_true")
    parser.add_argument("--grid", action="store_true")
    args = parser.parse_args()
    study = Study()
    if args.per_layer:
        per_layer(study)
    if args.grid or not args.per_layer:
        grid(study)


if __name__ == "__main__":
    main()
