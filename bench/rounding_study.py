"""Load-time weight rounding on the real-weights proxies: round-to-nearest against GPTQ (quant.rounding)
under the full input Hessian, its diagonal blocks and its diagonal, alone and with smoothing and the
low-rank branch (quant.outliers), through the pack's quantize_weight and reference linears. The Hessian
comes from the same calibration inputs as the per-channel amax.

- `--proxy minilm` (all-MiniLM-L6-v2, bench/quality_real_weights.py): sentence-embedding cosine vs fp32,
  worst of the 8 evaluation sentences.
- `--proxy vit` (DINOv2-small saliency ViT, bench/quality_real_weights_vit.py): image-embedding cosine vs
  fp32, worst of the 7 evaluation images / saliency-heatmap relative error, mean; calibrated on the
  proxy's 3 other images.

    python bench/rounding_study.py              # method x format table
    python bench/rounding_study.py --proxy vit  # the same table on the ViT
    python bench/rounding_study.py --cost       # calibration bytes at LTX-2.3 shapes, seconds per layer
    python bench/rounding_study.py --cost --device cuda
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import time
from typing import Callable

import torch
from pydoc_data.topics import topics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from quant import ltx2, rounding  # noqa: E402
from quant.calibration import AmaxRecorder  # noqa: E402
from quant.outliers import NONE, Outliers  # noqa: E402
from quant.quality import cosine_similarity  # noqa: E402
from quant.reference import reference_linear  # noqa: E402
from quant.weights import FP8_ROWWISE, INT8, INT8_CONVROT, MXFP8, NVFP4, fitting_format, quantize_weight  # noqa: E402


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


proxy = _bench_module("quality_real_weights")
vit = _bench_module("quality_real_weights_vit")
NAMES = [f"encoder.layer.{n}.{m}" for n in range(6) for m in proxy.LINEARS]
WHOLE = 1 << 20  # AmaxRecorder's hessian_block wider than any layer: whole matrices, restricted per method

# (label, weight format, activation)
FORMATS = [("fp8-scaled-mm", FP8_ROWWISE, "fp8"), ("mxfp8", MXFP8, "fp8"), ("nvfp4 (exact)", NVFP4, "none"),
           ("int8-scaled-mm", INT8, "int8"), ("int8-convrot", INT8_CONVROT, "int8")]
HANDLING = [("-", NONE), ("smoothing", Outliers(smooth_alpha=0.5)),
            ("smoothing + low-rank", Outliers(smooth_alpha=0.5, low_rank_bytes=0.1))]
# Hessian form per method: None = round to nearest; 0 = diagonal; b = diagonal blocks of b; "full".
# ("rank", d): the top K/d eigen-directions of H plus its exact diagonal, a form a file could hold.
METHODS = [("round to nearest", None), ("diag-weighted scales", 0), ("GPTQ, 64-blocks", 64),
           ("GPTQ, 128-blocks", 128), ("GPTQ, rank K/16 + diag", ("rank", 16)), ("GPTQ, full H", "full")]


# More calibration text than the proxy's 5 sentences (56 tokens against Linears of 384 and 1,536 inputs):
# LTX-2's calibration sees thousands of video tokens per call, so its Hessians are full rank. GPTQ
# follows the directions its Hessian saw, so the text must be varied, as a user's prompts are: templated
# plain sentences (general words) and prose from Python's reference manual (pydoc_data, in every
# CPython); none of them an evaluation sentence. Per-layer output error on the evaluation sentences,
# NVFP4, 8 Linears summed: round to nearest 0.511, GPTQ on 300 templated sentences 0.471, on 400 manual
# sentences 0.427, on both 0.395 (damp 0.01).
SUBJECTS = ["The old fisherman", "A young doctor", "My neighbour", "The small company", "Our teacher", "A tired student",
            "The city council", "His sister", "The orchestra", "A stray dog", "The engineers", "Her grandfather"]
VERBS = ["repaired", "painted", "described", "carried", "sold", "photographed", "ignored", "measured", "cleaned",
         "borrowed", "discussed", "delivered"]
OBJECTS = ["the broken bicycle", "a wooden table", "the annual report", "three heavy boxes", "an ancient map",
           "the new bridge", "a bowl of soup", "the quiet garden", "a strange letter", "the red car",
           "the football match", "a cheap umbrella"]
ENDINGS = ["before the storm arrived.", "near the river on Sunday.", "without saying a word.", "in the crowded station.",
           "after a long discussion.", "while the children watched.", "for the third time this year.",
           "under the bright lights.", "at the end of the street.", "despite the heavy rain."]


def calibration_sentences(templated: int, manual: int) -> list[str]:
    """The proxy's calibration sentences, `templated` template sentences (deterministic) and `manual`
    plain sentences of Python's reference manual (every third one that has no code in it)."""
    g = torch.Generator().manual_seed(0)
    pick = lambda words: words[int(torch.randint(len(words), (1,), generator=g))]  # noqa: E731
    text = " ".join(topics.values())
    prose = [" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", text)
             if 40 < len(s.strip()) < 200 and not re.search(r"[{}=<>\[\]_()*`]|::", s)]
    return (proxy.CALIBRATION + [f"{pick(SUBJECTS)} {pick(VERBS)} {pick(OBJECTS)} {pick(ENDINGS)}" for _ in range(templated)]
            + prose[::3][:manual])


def restrict(h: torch.Tensor, form) -> torch.Tensor | None:
    """The full Hessian `h` in one of quant.rounding's forms."""
    if form is None:
        return None
    if form == "full":
        return h
    if form == 0:
        return h.diagonal().clone()
    if isinstance(form, tuple):
        values, vectors = torch.linalg.eigh(h.double())
        top = vectors[:, -(h.shape[0] // form[1]):]
        low = (top * values[-top.shape[1]:]) @ top.t()
        return (low + torch.diag(h.diagonal().double() - low.diagonal()).clamp(min=0)).float()
    k = h.shape[0]
    return h.reshape(k // form, form, k // form, form).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


class Study:
    """One proxy as the table sees it: fp32 `weights`, the quantized Linears `names`, their calibration
    per-channel amax `channels` and whole input Hessians `hessians`; metrics(linear) compares the model
    run through `linear(name, x)` with fp32 on the evaluation inputs. Linears outside `names` stay fp32."""
    weights: dict[str, torch.Tensor]
    fp32: Callable[[str, torch.Tensor], torch.Tensor]  # the proxy's full-precision Linear callback
    names: list[str]
    channels: dict[str, torch.Tensor]
    hessians: dict[str, torch.Tensor]
    metric_label: str
    calibration: str

    def metrics(self, linear) -> tuple[float, ...]:
        raise NotImplementedError

    def cell(self, values: tuple[float, ...]) -> str:
        raise NotImplementedError

    def quantized(self, fmt: str, handling: Outliers, form) -> dict:
        return {name: quantize_weight(self.weights[name + ".weight"], fitting_format(fmt, self.weights[name + ".weight"].shape),
                                      handling, self.channels[name], hessian=restrict(self.hessians[name], form))
                for name in self.names}

    def run(self, layers: dict, activation: str):
        """The Linear callback: `layers` (weights or QuantizedWeights) through the reference linears."""
        return lambda name, x: (reference_linear(x, layers[name], self.weights[name + ".bias"], activation)
                                if name in layers else self.fp32(name, x))

    def measure(self, fmt: str, activation: str, handling: Outliers, form) -> tuple[float, ...]:
        return self.metrics(self.run(self.quantized(fmt, handling, form), activation))

    def ceiling(self, activation: str) -> tuple[float, ...]:
        """The weights unquantized, the activations rounded as the format's layers round them."""
        return self.metrics(self.run({name: self.weights[name + ".weight"] for name in self.names}, activation))


class MiniLM(Study):
    metric_label = "sentence cosine, worst of 8"

    def __init__(self, templated: int, manual: int):
        self.weights, vocab = proxy.load_weights(), proxy.load_vocab()
        self.names = NAMES
        self.sentences = calibration_sentences(templated, manual)
        recorder = AmaxRecorder(hessian_block=WHOLE)
        self.fp32 = proxy.full_precision(self.weights)

        def observed(name, x):
            recorder.observe(name, x)
            return self.fp32(name, x)
        tokens = [proxy.tokenize(t, vocab) for t in self.sentences]
        for start in range(0, len(tokens), 50):  # attention is tokens x tokens: in batches
            proxy.encode(self.weights, tokens[start:start + 50], observed)
        self.channels = recorder.per_channel()
        self.hessians = {name: h[0] for name, h in recorder.hessians().items()}
        self.calibration = f"{len(self.sentences)} sentences, {recorder.tokens[NAMES[0]]} tokens per Linear"
        self.inputs = [proxy.tokenize(text, vocab) for text in proxy.EVALUATION]
        self.reference = proxy.encode(self.weights, self.inputs, self.fp32)

    def metrics(self, linear) -> tuple[float, ...]:
        states = proxy.encode(self.weights, self.inputs, linear)
        return (min(cosine_similarity(proxy.sentence_embedding(s), proxy.sentence_embedding(r))
                    for s, r in zip(states, self.reference)),)

    def cell(self, values: tuple[float, ...]) -> str:
        return f"{values[0]:.5f}"


class ViT(Study):
    metric_label = "image-embedding cosine, worst / saliency rel. error, mean"

    def __init__(self, names: list[str] | None = None, evaluation: tuple[str, ...] = vit.EVALUATION):
        self.weights = vit.load_weights()
        self.fp32 = vit.full_precision(self.weights)
        self.names = list(names or vit.NAMES)
        # The proxy's own calibration images, none of them an evaluation image.
        recorder = vit.calibrate(self.weights, hessian_block=WHOLE)
        self.channels = recorder.per_channel()
        self.hessians = {name: h[0] for name, h in recorder.hessians().items()}
        self.calibration = (f"{len(vit.CALIBRATION)} images ({', '.join(vit.CALIBRATION)}), "
                            f"{recorder.tokens[self.names[0]]} tokens per Linear; evaluation: {len(evaluation)} images")
        self.images, self.boxes = vit.load_images(evaluation)
        with torch.no_grad():
            self.reference = vit.forward(self.weights, self.images, self.fp32)

    def metrics(self, linear) -> tuple[float, ...]:
        with torch.no_grad():
            result = vit.compare(vit.forward(self.weights, self.images, linear), self.reference, self.boxes)
        return result["embedding_cosine"], result["saliency_error"]

    def cell(self, values: tuple[float, ...]) -> str:
        return f"{values[0]:.5f} / {values[1]:.4f}"


def table(study: Study, formats: list[str], methods: list[str]) -> None:
    print(f"calibration: {study.calibration}; GPTQ damp {rounding.DAMP}; cells: {study.metric_label}")
    methods_used = [m for m in METHODS if m[0] in methods]
    print("| format | outlier handling | " + " | ".join(m[0] for m in methods_used) + " |")
    print("|" + " --- |" * (len(methods_used) + 2))
    for label, fmt, activation in FORMATS:
        if label not in formats:
            continue
        for handling_label, handling in HANDLING:
            cells = []
            for _, form in methods_used:
                if form == 0 and fmt != NVFP4:  # the diagonal changes only NVFP4's scale search
                    cells.append("= RTN")
                    continue
                cells.append(study.cell(study.measure(fmt, activation, handling, form)))
            print(f"| {label} | {handling_label} | " + " | ".join(cells) + " |", flush=True)
    print("\nactivation rounding alone (weights fp32, no smoothing): " + ", ".join(
        f"{label} {study.cell(study.ceiling(activation))}" for label, _, activation in FORMATS
        if label in formats and activation != "none"))


def ltx_linears() -> dict[str, tuple[int, int]]:
    shapes = ltx2.block_shapes(ltx2.LTX23_CONFIG)
    layers = {key[:-len(".weight")]: shape for key, shape in shapes.items()
              if key.endswith(".weight") and ltx2.BLOCK_LINEAR_RE.match("transformer_blocks.0." + key[:-len(".weight")])}
    return layers


def cost(device: str, repeats: int) -> None:
    """Calibration bytes (fp32, upper triangles of symmetric blocks not exploited) per layer and for
    the 48 blocks, and GPTQ seconds per layer at the LTX-2.3 shapes."""
    layers = ltx_linears()
    blocks = ltx2.LTX23_CONFIG["num_layers"]
    inputs = sorted({k for _, k in layers.values()})
    print(f"LTX-2.3: {len(layers)} block Linears per block x {blocks} blocks; input widths {inputs} "
          "(Linears that read the same input, e.g. to_k and to_v, could share one Hessian; not counted)")
    print("| Hessian form | bytes per layer (K = 4096) | all block Linears, 48 blocks |")
    print("| --- | --- | --- |")
    for label, form in (("diagonal", 0), ("64-blocks", 64), ("128-blocks", 128), ("256-blocks", 256),
                        ("rank K/16 + diag", ("rank", 16)), ("full", "full")):
        def per(k, form=form):
            return 4 * k * (1 if form == 0 else k if form == "full" else k // 16 + 1 if isinstance(form, tuple) else form)
        total = blocks * sum(per(k) for _, k in layers.values())
        print(f"| {label} | {per(4096) / 2 ** 20:.3g} MiB | {total / 2 ** 30:.3g} GiB |")
    print(f"\nseconds per layer on {device} ({torch.get_num_threads()} threads)" if device == "cpu"
          else f"\nseconds per layer on {torch.cuda.get_device_name()}")
    print("| shape | format | round to nearest | GPTQ 128-blocks | GPTQ full H |")
    print("| --- | --- | --- | --- | --- |")
    for n, k in sorted({shape for shape in layers.values() if shape in ((4096, 4096), (16384, 4096), (4096, 16384))}):
        g = torch.Generator().manual_seed(0)
        w = torch.randn(n, k, generator=g).to(device)
        x = torch.randn(2 * k, k, generator=g).to(device)
        h = x.t() @ x
        for fmt in (FP8_ROWWISE, MXFP8, NVFP4):
            row = []
            for form in (None, 128, "full"):
                hessian = restrict(h, form)
                quantize_weight(w[:256], fmt, hessian=hessian)  # warm-up
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(repeats):
                    quantize_weight(w, fmt, hessian=hessian)
                if device == "cuda":
                    torch.cuda.synchronize()
                row.append(f"{(time.perf_counter() - start) / repeats:.2f}")
            print(f"| {n}x{k} | {fmt} | " + " | ".join(row) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cost", action="store_true", help="calibration bytes and seconds per layer instead")
    parser.add_argument("--proxy", choices=("minilm", "vit"), default="minilm", help="the real-weights proxy of the table")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--templated", type=int, default=150, help="minilm: templated calibration sentences added to the proxy's 5")
    parser.add_argument("--manual", type=int, default=300, help="minilm: sentences of Python's manual added to the calibration")
    parser.add_argument("--damp", type=float, default=rounding.DAMP, help="GPTQ dampening (fraction of mean diag H)")
    parser.add_argument("--formats", default=";".join(f[0] for f in FORMATS[:3]), help="labels, ;-separated")
    parser.add_argument("--methods", default=";".join(m[0] for m in METHODS), help="labels, ;-separated")
    args = parser.parse_args()
    rounding.DAMP = args.damp
    if args.cost:
        cost(args.device, args.repeats)
    else:
        study = MiniLM(args.templated, args.manual) if args.proxy == "minilm" else ViT()
        table(study, args.formats.split(";"), args.methods.split(";"))


if __name__ == "__main__":
    main()
