"""Plain PyTorch reference linears: the correctness oracle every faster path is compared with.

Everything is computed in fp32 from the dequantized weight; W8A8 and W4A4 layers also quantize the
activation exactly as the fast paths must (per-token dynamic FP8 or INT8, NVFP4 blocks, or the
static `input_scale`).
"""

from __future__ import annotations

import torch

from . import formats
from .modes import Activation
from .weights import QuantizedWeight, rotation


def quantize_activation_reference(x: torch.Tensor, input_scale: torch.Tensor | None,
                                  activation: str = Activation.FP8, rotation_group: int = 0) -> torch.Tensor:
    """What an activation becomes after quantization to `activation`'s format and back, in fp32.
    With `rotation_group` (a ConvRot INT8 layer) it is quantized in the rotated basis, as the fast
    path does, and rotated back (the Hadamard is its own inverse)."""
    rows = x.reshape(-1, x.shape[-1]).float()
    if rotation_group:
        rows = formats.rotate_groups(rows, rotation_group)
    if activation == Activation.FP8:
        if input_scale is not None:
            values = formats.dequantize_fp8(formats.quantize_fp8_static(rows, input_scale), input_scale)
        else:
            values = formats.dequantize_fp8(*formats.quantize_fp8_rowwise_dynamic(rows))
    elif activation == Activation.INT8:  # always per token (runtime.takes_static_scale)
        data, scale = formats.quantize_int8_rowwise_dynamic(rows)
        values = data.float() * scale
    elif activation == Activation.NVFP4:
        packed, block_scales, global_scale = formats.quantize_nvfp4(rows, input_scale)
        values = formats.dequantize_nvfp4(packed, block_scales, global_scale, tuple(rows.shape))
    else:
        raise ValueError(f"unknown activation mode {activation!r}")
    if rotation_group:
        values = formats.rotate_groups(values, rotation_group)
    return values.reshape(x.shape)


def reference_linear(x: torch.Tensor, weight: QuantizedWeight | torch.Tensor, bias: torch.Tensor | None = None,
                     activation: str = Activation.NONE) -> torch.Tensor:
    """y = act(x) @ W^T + b in fp32; `activation` is a modes.Activation. A weight's outlier transforms
    apply as the fast paths must: x * pre_quant_scale is what gets quantized, and the low-rank branch
    reads x unquantized (weights.QuantizedWeight)."""
    if not isinstance(weight, QuantizedWeight):
        x32 = x.float() if activation == Activation.NONE else quantize_activation_reference(x, None, activation)
        y = x32 @ weight.float().t()
        return y if bias is None else y + bias.float()
    smoothed = x.float() if weight.pre_quant_scale is None else x.float() * weight.pre_quant_scale.float()
    if activation != Activation.NONE:
        smoothed = quantize_activation_reference(smoothed, weight.input_scale, activation,
                                                 rotation(weight.format))
    y = smoothed @ weight.quantized_part(torch.float32).t()
    if weight.low_rank is not None:
        down, up = weight.low_rank
        y = y + (x.float() @ down.float().t()) @ up.float().t()
    return y if bias is None else y + bias.float()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||a - e|| / ||e|| in fp64; NaN anywhere gives NaN, which never passes a `<` bound."""
    a, e = actual.double(), expected.double()
    denom = e.norm()
    return float((a - e).norm() / denom) if denom > 0 else float((a - e).norm())
