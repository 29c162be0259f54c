"""Plain PyTorch reference linears: the correctness oracle every faster path is compared with.

Everything is computed in fp32 from the dequantized weight; W8A8 policies also quantize the
activation exactly as the fast paths must (per-token dynamic FP8, or the static `input_scale`).
"""

from __future__ import annotations

import torch

from . import formats
from .weights import QuantizedWeight


def quantize_activation_reference(x: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
    """What an FP8 activation becomes after quantization and dequantization, in fp32."""
    rows = x.reshape(-1, x.shape[-1]).float()
    if input_scale is not None:
        data = formats.quantize_fp8_static(rows, input_scale)
        return formats.dequantize_fp8(data, input_scale).reshape(x.shape)
    data, scale = formats.quantize_fp8_rowwise_dynamic(rows)
    return formats.dequantize_fp8(data, scale).reshape(x.shape)


def reference_linear(x: torch.Tensor, weight: QuantizedWeight | torch.Tensor, bias: torch.Tensor | None = None,
                     activation: str = "none") -> torch.Tensor:
    """y = act(x) @ W^T + b in fp32. `activation` is a policy's: "none" or "fp8"."""
    if isinstance(weight, QuantizedWeight):
        w = weight.dequantize(torch.float32)
        input_scale = weight.input_scale
    else:
        w = weight.float()
        input_scale = None
    if activation == "fp8":
        x32 = quantize_activation_reference(x, input_scale)
    elif activation == "none":
        x32 = x.float()
    else:
        raise ValueError(f"unknown activation mode {activation!r}")
    y = x32 @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||a - e|| / ||e|| in fp64; NaN anywhere gives NaN, which never passes a `<` bound."""
    a, e = actual.double(), expected.double()
    denom = e.norm()
    return float((a - e).norm() / denom) if denom > 0 else float((a - e).norm())
