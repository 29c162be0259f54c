"""Activation calibration: recording layer-input amax, and static activation scales from an amax file
(the JSON layout Lightricks documented: {"amax_values": {"transformer_blocks.0.attn1.to_q.input_quantizer":
12.5, ...}}). Our files add "amax_per_channel" (one amax per input feature, same keys), which other
readers ignore."""

from __future__ import annotations

import json
import math
import os

import torch

from . import formats, weights
from .ltx2 import CHECKPOINT_PREFIX, strip_prefix
from .safetensors_io import CheckpointError, SafetensorsFile, open_regular, parse_json, save_tensors, write_text
from .modes import Activation, layer_activation
from .outliers import smoothed_amax
from .weights import INT8, INT8_FORMATS, NVFP4

SUFFIX = ".input_quantizer"
# Our per-channel file of the 22B model takes about 90 MB (6.3 million channels).
MAX_CALIBRATION_BYTES = 256 * 2 ** 20
FLOAT32 = torch.finfo(torch.float32)


class CalibrationError(ValueError):
    pass


def layer_name(entry: str) -> str:
    """Our unprefixed layer name for a calibration entry, in either naming: theirs ends in
    `.input_quantizer`; the attention module may be written `attn` for `attn1`."""
    name = strip_prefix(entry, CHECKPOINT_PREFIX)
    if name.endswith(SUFFIX):
        name = name[: -len(SUFFIX)]
    return name.replace(".attn.", ".attn1.")


def _read(path: str) -> dict:
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            text = f.read(MAX_CALIBRATION_BYTES + 1)
    except OSError as e:
        raise CalibrationError(f"{path}: cannot read the calibration file ({e.strerror})") from None
    if len(text) > MAX_CALIBRATION_BYTES:
        raise CalibrationError(f"{path}: {size:,} bytes, more than the {MAX_CALIBRATION_BYTES:,} a calibration file "
                               "takes (ours for the 22B model, per channel, is about 90 MB)")
    try:
        raw = parse_json(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CalibrationError(f"{path}: not a readable calibration JSON ({e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("amax_values"), dict):
        raise CalibrationError(f"{path}: expected an object with 'amax_values' mapping layer names to numbers")
    return raw


def _amax(path: str, entry: str, value) -> float:
    """A calibration amax that gives every format a usable activation scale (see input_scale)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise CalibrationError(f"{path}: amax for {entry!r} must be a positive finite number, got {value!r}")
    for fmt in (None, INT8, NVFP4):  # every divisor: which one applies depends on the layer's policy
        try:
            input_scale(value, fmt)
        except CalibrationError as e:
            raise CalibrationError(f"{path}: amax for {entry!r}: {e}") from None
    return float(value)


def load_amax(path: str) -> dict[str, float]:
    """Layer -> activation amax. Errors name the file and the bad entry."""
    return _amax_values(path, _read(path))


def _amax_values(path: str, raw: dict) -> dict[str, float]:
    return {layer_name(entry): _amax(path, entry, value) for entry, value in raw["amax_values"].items()}


def load_channel_amax(path: str) -> dict[str, torch.Tensor]:
    """Layer -> per-input-channel amax (fp32 vector), from our "amax_per_channel"; {} when absent.
    A channel that never saw a non-zero input has amax 0."""
    return _channel_values(path, _read(path))


def _channel_values(path: str, raw: dict) -> dict[str, torch.Tensor]:
    channels = raw.get("amax_per_channel", {})
    if not isinstance(channels, dict):
        raise CalibrationError(f"{path}: 'amax_per_channel' must map layer names to lists of numbers")
    out = {}
    for entry, values in channels.items():
        if not isinstance(values, list) or not values or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                for v in values):
            raise CalibrationError(f"{path}: per-channel amax for {entry!r} must be a non-empty list of "
                                   f"non-negative finite numbers")
        out[layer_name(entry)] = torch.tensor(values, dtype=torch.float32)
    return out


def load_calibration(path: str) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """load_amax and load_channel_amax of one file, read once (ours for the 22B model is about 90 MB)."""
    raw = _read(path)
    return _amax_values(path, raw), _channel_values(path, raw)


def require_channel_amax(channel_amax: dict[str, torch.Tensor] | None, calibration: str | None) -> None:
    """Smoothing needs per-channel amax: raise, naming the calibration file (or its absence), when there is none."""
    if channel_amax:
        return
    where = (f"{calibration}: has no per-channel amax ('amax_per_channel')" if calibration
             else "no calibration file was given")
    raise CalibrationError(f"{where}; smoothing needs each layer's per-channel input amax. Calibrate with this "
                           "pack (the LTX-2 Calibrate node, or bench/bench_quality.py --save-amax), which writes it, "
                           "or set smoothing to 0")


def save_amax(path: str, amax: dict[str, float], channel_amax: dict[str, torch.Tensor] | None = None, *,
              overwrite: bool) -> None:
    """Write a calibration file atomically, in Lightricks' naming (`.input_quantizer` suffix)."""
    content = {"amax_values": {f"{layer}{SUFFIX}": value for layer, value in sorted(amax.items())}}
    if channel_amax:
        content["amax_per_channel"] = {f"{layer}{SUFFIX}": [round(float(v), 6) for v in values.tolist()]
                                       for layer, values in sorted(channel_amax.items())}
    write_text(path, json.dumps(content, indent=1), overwrite=overwrite)


HESSIAN_SUFFIX = ".hessian"


def save_hessians(path: str, hessians: dict[str, torch.Tensor], *, overwrite: bool) -> None:
    """A calibration's input Hessians (AmaxRecorder.hessians) as safetensors, beside the amax JSON (which
    stays readable by every other reader): `<layer>.input_quantizer.hessian`, fp32, in quant.rounding's forms."""
    save_tensors(path, {f"{layer}{SUFFIX}{HESSIAN_SUFFIX}": h.float().contiguous() for layer, h in sorted(hessians.items())},
                 overwrite=overwrite)


def load_hessians(path: str) -> dict[str, torch.Tensor]:
    """Layer -> input Hessian from a save_hessians file. Errors name the file and the bad entry."""
    out = {}
    try:
        with SafetensorsFile(path) as f:
            for key in f.keys():
                h = f.read(key).float()
                square = h.dim() == 1 or (h.dim() in (2, 3) and h.shape[-1] == h.shape[-2])
                if not key.endswith(HESSIAN_SUFFIX) or not square or not bool(torch.isfinite(h).all()) or bool(
                        (torch.diagonal(h, dim1=-2, dim2=-1) if h.dim() > 1 else h).lt(0).any()):
                    raise CalibrationError(f"{path}: {key!r} is not an input Hessian (finite, (K,), (K, K) or "
                                           f"(K/b, b, b) blocks, non-negative diagonal)")
                out[layer_name(key[:-len(HESSIAN_SUFFIX)])] = h
    except CheckpointError as e:
        raise CalibrationError(f"{path}: not a readable Hessian file ({e})") from None
    return out


def gets_input_scale(conf: dict) -> bool:
    """Whether a calibrated amax gives a layer (its ComfyUI per-layer config) a static input_scale: the
    FP8 W8A8 layers, and NVFP4 layers, whose input_scale is the global scale of NVFP4 activations. INT8
    layers keep per-token scales, as ComfyUI's int8 layers do: one static scale spreads INT8's uniform
    grid over the outlier channels (real-weights proxy: sentence cosine 0.977 static against 0.9955
    per-token, docs/QUALITY.md), where FP8's exponent keeps the small values."""
    fmt = weights.format_from_conf(conf)
    return fmt == NVFP4 or (layer_activation(conf) != Activation.NONE and fmt not in INT8_FORMATS)


def layer_input_scale(conf: dict, amax: float, channel_amax: torch.Tensor | None = None,
                      pre_quant_scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """The static input scale a calibrated `amax` gives the layer of this ComfyUI per-layer config, or
    None for a layer that keeps per-token scales (gets_input_scale). A smoothed layer (its
    `pre_quant_scale`) quantizes x * pre_quant_scale: its scale comes from that amax, which needs the
    layer's per-channel amax (outliers.smoothed_amax)."""
    if not gets_input_scale(conf):
        return None
    return input_scale(smoothed_amax(amax, channel_amax, pre_quant_scale), weights.format_from_conf(conf))


def input_scale(amax: float, fmt: str | None = None) -> torch.Tensor:
    """The static activation decode scale for an amax: amax/448 for FP8 activations and amax/127 for
    INT8 ones (clamped to it before the cast; the pack's own INT8 layers stay per-token, see
    gets_input_scale), amax/2688 for an NVFP4 layer (the activation global scale of NVFP4 activation
    quantization, as ComfyUI's NVFP4 files store it)."""
    divisor = (formats.NVFP4_GLOBAL_DIVISOR if fmt == NVFP4 else formats.INT8_MAX if fmt in INT8_FORMATS
               else formats.FP8_MAX)
    scale = torch.tensor(amax / divisor, dtype=torch.float32)
    # An infinite scale turns every activation into NaN; a zero or subnormal one (amax 1e-50) makes
    # the layer output ~0 or lose its precision.
    if not (math.isfinite(scale) and scale >= FLOAT32.tiny):
        raise CalibrationError(f"amax {amax:g} gives the activation scale amax/{divisor:g} = {amax / divisor:g}, "
                               f"which float32 cannot hold as a normal number ({FLOAT32.tiny:g} to {FLOAT32.max:g})")
    return scale


class AmaxRecorder:
    """Running maxima of |input| per layer and input channel, fed from forward hooks while a model
    samples. Stays on the activations' device (no sync per call) until read.

    With `hessian_block` it also sums each layer's input Hessian X^T X for GPTQ rounding
    (quant.rounding): 0 its diagonal (per-channel sum of squares), b its diagonal blocks of b
    features (a layer narrower than b: its whole matrix, as one block)."""

    def __init__(self, hessian_block: int | None = None) -> None:
        if hessian_block is not None and hessian_block < 0:
            raise ValueError(f"hessian_block must be 0 (diagonal) or a block size, got {hessian_block}")
        self.channels: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self.hessian_block = hessian_block
        self.squares: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}

    def observe(self, layer: str, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        amax = rows.abs().amax(dim=0).float()
        previous = self.channels.get(layer)
        # torch.maximum propagates NaN, so a non-finite activation is reported by per_tensor()
        self.channels[layer] = amax if previous is None else torch.maximum(previous, amax)
        self.calls[layer] = self.calls.get(layer, 0) + 1
        if self.hessian_block is not None:
            squares = _input_squares(rows.float(), self.hessian_block)
            previous = self.squares.get(layer)
            self.squares[layer] = squares if previous is None else previous + squares
            self.tokens[layer] = self.tokens.get(layer, 0) + rows.shape[0]

    def hessians(self) -> dict[str, torch.Tensor]:
        """Layer -> its mean input Hessian X^T X / tokens, fp32 on the CPU: (K,) or (K/b, b, b)."""
        return {layer: (values / self.tokens[layer]).cpu() for layer, values in sorted(self.squares.items())}

    def per_channel(self) -> dict[str, torch.Tensor]:
        return {layer: values.cpu() for layer, values in sorted(self.channels.items())}

    def per_tensor(self) -> dict[str, float]:
        """Layer -> amax over every call and channel; layers whose input was all zero are left out
        (no scale can be derived). Raises naming the layer if an input held NaN or Inf."""
        out = {}
        for layer, values in self.per_channel().items():
            amax = float(values.max())
            if not math.isfinite(amax):
                raise CalibrationError(f"{layer}: its input held NaN or Inf while calibrating; the model "
                                       f"itself diverges on these inputs")
            if amax > 0:
                out[layer] = amax
        return out


def _input_squares(rows: torch.Tensor, block: int) -> torch.Tensor:
    """sum over tokens of x_i x_j, for i, j in the same block of `block` features ((K,) for block 0)."""
    k = rows.shape[-1]
    if block == 0:
        return rows.square().sum(dim=0)
    block = min(block, k)
    if k % block:
        raise CalibrationError(f"{k} input features are not a whole number of Hessian blocks of {block}")
    grouped = rows.reshape(-1, k // block, block).transpose(0, 1)  # (blocks, tokens, block)
    return grouped.transpose(1, 2) @ grouped


def outlier_ratio(channels: torch.Tensor) -> float:
    """max / median of a layer's per-channel amax: how far its worst input channel sticks out
    (~1-3 for random weights; real transformers often reach 10-100, where per-tensor static scales
    lose most of their resolution)."""
    median = float(channels.median())
    return float(channels.max()) / median if median > 0 else float("inf")
