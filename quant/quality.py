"""Quality measurement: how much a quantized layer or model deviates from its full-precision source.

Per layer: weight error ||W_q - W|| / ||W|| and output SNR 10*log10(||y||^2 / ||y_q - y||^2) on the same
inputs, computed with the reference linears (the math every fast path reproduces). Per model
(measured in ComfyUI by nodes/quality_evaluation.py): per-step velocity error and final-latent error.
`python -m quant quality-layers` runs the per-layer part on a file without ComfyUI.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass

import torch

from .calibration import layer_input_scale
from .checkpoint import inspect_checkpoint
from .conversion import LayerOutliers, convert_layer, read_layer, smoothing_amax
from .comfy_quant import layer_conf
from .ltx2 import BLOCK_LINEAR_RE
from .policies import Policy, plan
from .reference import reference_linear, relative_error
from .modes import Nvfp4Mode, layer_activation
from .safetensors_io import SafetensorsFile, write_text
from .weights import QuantizedWeight

# Branches of an LTX-2 block, the unit the scope options keep or quantize.
_BRANCHES = (("video self-attn", r"\.attn1\."), ("video cross-attn", r"\.attn2\."),
             ("audio self-attn", r"\.audio_attn1\."), ("audio cross-attn", r"\.audio_attn2\."),
             ("audio->video attn", r"\.audio_to_video_attn\."), ("video->audio attn", r"\.video_to_audio_attn\."),
             ("video ff", r"\.ff\."), ("audio ff", r"\.audio_ff\."))


@dataclass(frozen=True)
class LayerQuality:
    layer: str
    format: str
    weight_error: float  # relative L2
    output_snr_db: float  # on the evaluation inputs, activation quantization included


def branch(layer: str) -> str:
    for name, pattern in _BRANCHES:
        if re.search(pattern, "." + layer + "."):
            return name
    return "other"


def block_index(layer: str) -> int | None:
    match = BLOCK_LINEAR_RE.match(layer)
    return int(match.group("block")) if match else None


def snr_db(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Signal-to-noise ratio in dB (inf when equal; -inf or NaN where the error is not finite)."""
    error = relative_error(actual, expected)
    if error == 0:
        return math.inf
    return -20.0 * math.log10(error) if error == error else math.nan


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors flattened, in fp64."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return float(a @ b / (a.norm() * b.norm()))


def layer_quality(layer: str, reference_weight: torch.Tensor, quantized: QuantizedWeight | torch.Tensor,
                  bias: torch.Tensor | None, x: torch.Tensor, activation: str) -> LayerQuality:
    """Compare a layer against its full-precision weight on inputs `x` (rows of the layer's input)."""
    w = reference_weight.float()
    wq = quantized.dequantize(torch.float32) if isinstance(quantized, QuantizedWeight) else quantized.float()
    expected = reference_linear(x, w, bias)
    actual = reference_linear(x, quantized, bias, activation)
    fmt = quantized.format if isinstance(quantized, QuantizedWeight) else str(quantized.dtype).replace("torch.", "")
    return LayerQuality(layer, fmt, relative_error(wq, w), snr_db(actual, expected))


def evaluation_inputs(in_features: int, tokens: int, seed: int, channel_amax: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Inputs for a layer outside a model: Gaussian rows; with a calibration file's per-channel amax,
    each channel scaled to amax/4 standard deviations (about the spread amax is the maximum of),
    which reproduces the outlier channels that per-tensor activation scales suffer from."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_features, generator=g)
    if channel_amax is not None:
        if channel_amax.numel() != in_features:
            raise ValueError(f"per-channel amax has {channel_amax.numel()} values, the layer takes {in_features}")
        x = x * (channel_amax.float() / 4.0)
    return x


def file_layer_quality(path: str, policy: Policy, amax: dict[str, float] | None = None,
                       channel_amax: dict[str, torch.Tensor] | None = None, tokens: int = 256,
                       seed: int = 0, calibration: str | None = None) -> list[LayerQuality]:
    """Per-layer quality of `policy` on a full-precision checkpoint, one layer in memory at a time.
    With `amax`, W8A8 layers use the calibrated static activation scale (as the loader would); the
    policy's outlier handling is applied where the loader applies it (conversion.smoothing_amax: the
    same error without per-channel amax from the file `calibration`, the same layers left unsmoothed)."""
    if tokens < 1:  # no rows: every error would be 0 and every SNR infinite
        raise ValueError(f"tokens must be at least 1, got {tokens}")
    rows = []
    with SafetensorsFile(path) as f:
        info = inspect_checkpoint(f)
        decisions, smoothing = smoothing_amax(plan(policy, info.layer_table(), info.num_blocks), channel_amax,
                                              calibration)
        for decision in decisions:
            if not decision.changed:
                continue
            source = info.layers[decision.layer]
            weight = read_layer(f, source)
            if isinstance(weight, QuantizedWeight):
                raise ValueError(f"{path}: layer {decision.layer!r} is already {weight.format}; the quality report "
                                 f"needs the full-precision source")
            bias_key = info.prefix + decision.layer + ".bias"
            bias = f.read(bias_key).float() if bias_key in f else None
            channels = (channel_amax or {}).get(decision.layer)
            # Quantized as the loader does (in the file's dtype; the layer is read again, from the page cache)
            qw = convert_layer(f, source, decision.target_format,
                               outliers=LayerOutliers(decision.outliers, smoothing.get(decision.layer)))
            conf = layer_conf(decision)
            # NVFP4 layers as the exact mode runs them (weight-only): the fast modes differ per GPU.
            activation = layer_activation(conf, Nvfp4Mode.EXACT)
            scale = (layer_input_scale(conf, amax[decision.layer], channels, qw.pre_quant_scale)
                     if amax and decision.layer in amax else None)
            if scale is not None:
                qw.tensors["input_scale"] = scale
            x = evaluation_inputs(weight.shape[1], tokens, seed, channels)
            rows.append(layer_quality(decision.layer, weight, qw, bias, x, activation))
    return rows


def group_summary(rows: list[LayerQuality]) -> dict[str, dict[str, float]]:
    """Mean output SNR (dB) and worst layer per branch and per block: where quantization hurts most."""
    groups: dict[str, list[LayerQuality]] = {}
    for r in rows:
        groups.setdefault(f"branch {branch(r.layer)}", []).append(r)
        block = block_index(r.layer)
        if block is not None:
            groups.setdefault(f"block {block:02d}", []).append(r)
    return {name: {"layers": len(g), "mean_snr_db": sum(r.output_snr_db for r in g) / len(g),
                   "min_snr_db": min(r.output_snr_db for r in g),
                   "mean_weight_error": sum(r.weight_error for r in g) / len(g)}
            for name, g in sorted(groups.items())}


def format_layer_table(rows: list[LayerQuality], limit: int | None = None) -> str:
    """Layers sorted worst first (lowest output SNR)."""
    ordered = sorted(rows, key=lambda r: r.output_snr_db)[:limit]
    width = max([len(r.layer) for r in ordered] + [5])
    lines = [f"{'layer':<{width}}  {'format':<22}{'weight err':>11}{'out SNR dB':>11}"]
    lines += [f"{r.layer:<{width}}  {r.format:<22}{r.weight_error:>11.4f}{r.output_snr_db:>11.2f}" for r in ordered]
    return "\n".join(lines)


def format_group_table(summary: dict[str, dict[str, float]]) -> str:
    lines = [f"{'group':<28}{'layers':>7}{'mean SNR dB':>13}{'min SNR dB':>12}{'weight err':>12}"]
    lines += [f"{name:<28}{g['layers']:>7}{g['mean_snr_db']:>13.2f}{g['min_snr_db']:>12.2f}"
              f"{g['mean_weight_error']:>12.4f}" for name, g in summary.items()]
    return "\n".join(lines)


def write_report(path: str, report: dict, *, overwrite: bool) -> None:
    """A quality report as JSON (LayerQuality rows become objects), written atomically."""
    def encode(value):
        if isinstance(value, LayerQuality):
            return asdict(value)
        raise TypeError(f"cannot write {type(value).__name__} into a report")
    write_text(path, json.dumps(report, indent=1, default=encode), overwrite=overwrite)
