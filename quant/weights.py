"""A quantized Linear weight: its format, logical shape and the tensors a checkpoint stores for it.

Format names are ComfyUI's (`float8_e4m3fn`, `mxfp8`, `nvfp4`) plus one of ours,
`float8_e4m3fn_rowwise` (per-output-channel FP8 scales), which stock ComfyUI cannot read: files
meant for stock ComfyUI are written with per-tensor scales.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import formats

FP8_TENSOR = "float8_e4m3fn"
FP8_ROWWISE = "float8_e4m3fn_rowwise"
MXFP8 = "mxfp8"
NVFP4 = "nvfp4"
FORMATS = (FP8_TENSOR, FP8_ROWWISE, MXFP8, NVFP4)
# Formats a stock ComfyUI v0.20 reads from `_quantization_metadata`.
COMFY_NATIVE_FORMATS = (FP8_TENSOR, MXFP8, NVFP4)


class FormatError(ValueError):
    """A format name, shape or tensor a format cannot hold."""


def check_format(name: str) -> str:
    if name not in FORMATS:
        raise FormatError(f"unknown quantization format {name!r}; known formats: {', '.join(FORMATS)}")
    return name


@dataclass
class QuantizedWeight:
    """Packed weight of a Linear with logical shape (out_features, in_features).

    `tensors` uses the checkpoint's suffixes: `weight`, `weight_scale`, `weight_scale_2`, and the
    optional static activation scale `input_scale`."""

    format: str
    shape: tuple[int, int]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def data(self) -> torch.Tensor:
        return self.tensors["weight"]

    @property
    def scale(self) -> torch.Tensor:
        return self.tensors["weight_scale"]

    @property
    def input_scale(self) -> torch.Tensor | None:
        return self.tensors.get("input_scale")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.format in (FP8_TENSOR, FP8_ROWWISE):
            return formats.dequantize_fp8(self.data, self.scale, dtype)
        if self.format == MXFP8:
            return formats.dequantize_mxfp8(self.data, self.scale, self.shape, dtype)
        return formats.dequantize_nvfp4(self.data, self.scale, self.tensors["weight_scale_2"], self.shape, dtype)

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        return QuantizedWeight(self.format, self.shape, {k: v.to(device) for k, v in self.tensors.items()})


# Rows quantized per pass: bounds the fp32 temporaries to a few MB whatever the weight size, so
# quantizing a file needs about one tensor of extra memory (a multiple of 32 keeps MX/NV blocks whole).
CHUNK_ELEMENTS = 1 << 22


def _row_chunks(w: torch.Tensor) -> list[torch.Tensor]:
    rows = max(32, (CHUNK_ELEMENTS // max(1, w.shape[1])) // 32 * 32)
    return list(torch.split(w, rows, dim=0))


def _amax(w: torch.Tensor) -> torch.Tensor:
    return torch.stack([chunk.abs().amax() for chunk in _row_chunks(w)]).amax()


def quantize_weight(w: torch.Tensor, fmt: str) -> QuantizedWeight:
    """Quantize a 2-D weight to `fmt`, in row chunks (identical bytes to one pass: scales that span
    the tensor are computed first). Raises FormatError for shapes the format cannot hold."""
    check_format(fmt)
    if w.dim() != 2:
        raise FormatError(f"{fmt} holds 2-D Linear weights only, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise FormatError(f"{fmt} quantizes floating-point weights, got {w.dtype}")
    shape = (int(w.shape[0]), int(w.shape[1]))
    chunks = _row_chunks(w)
    if fmt in (FP8_TENSOR, FP8_ROWWISE):
        if fmt == FP8_ROWWISE:
            scale = torch.cat([formats.fp8_scale(c, per_channel=True) for c in chunks])
            data = torch.cat([formats.quantize_fp8(c, s) for c, s in zip(chunks, torch.split(scale, [len(c) for c in chunks]))])
        else:
            amax = _amax(w).float()
            scale = torch.where(amax == 0, torch.ones_like(amax), amax / formats.FP8_MAX)
            data = torch.cat([formats.quantize_fp8(c, scale) for c in chunks])
        return QuantizedWeight(fmt, shape, {"weight": data, "weight_scale": scale})
    if fmt == MXFP8:
        parts = [formats.quantize_mxfp8_rows(c) for c in chunks]
        data = torch.cat([p[0] for p in parts])
        scale_bytes = torch.cat([p[1] for p in parts])
        return QuantizedWeight(fmt, shape, {"weight": data, "weight_scale": formats.swizzle_scales(scale_bytes)})
    global_scale = _amax(w).float() / formats.NVFP4_GLOBAL_DIVISOR
    parts = [formats.quantize_nvfp4_rows(c, global_scale) for c in chunks]
    return QuantizedWeight(fmt, shape, {"weight": torch.cat([p[0] for p in parts]),
                                        "weight_scale": formats.swizzle_scales(torch.cat([p[1] for p in parts])),
                                        "weight_scale_2": global_scale})


def storage_specs(fmt: str, shape: tuple[int, int]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Tensors (suffix -> dtype, shape) a weight of logical `shape` takes in `fmt`, known before
    anything is quantized so a file's header can be written first. Scales are ComfyUI's: fp32
    0-d per-tensor scale, swizzled uint8 E8M0 (MXFP8) or e4m3 (NVFP4) block scales."""
    check_format(fmt)
    rows, cols = shape
    if fmt == FP8_TENSOR:
        return {"weight": (formats.FP8_DTYPE, (rows, cols)), "weight_scale": (torch.float32, ())}
    if fmt == FP8_ROWWISE:
        return {"weight": (formats.FP8_DTYPE, (rows, cols)), "weight_scale": (torch.float32, (rows, 1))}
    if fmt == MXFP8:
        r, c = formats.round_up(rows, formats.MXFP8_BLOCK), formats.round_up(cols, formats.MXFP8_BLOCK)
        return {"weight": (formats.FP8_DTYPE, (r, c)),
                "weight_scale": (torch.uint8, formats.swizzled_shape(r, c // formats.MXFP8_BLOCK))}
    r, c = formats.round_up(rows, formats.NVFP4_BLOCK), formats.round_up(cols, formats.NVFP4_BLOCK)
    return {"weight": (torch.uint8, (r, c // 2)),
            "weight_scale": (formats.FP8_DTYPE, formats.swizzled_shape(r, c // formats.NVFP4_BLOCK)),
            "weight_scale_2": (torch.float32, ())}


def storage_nbytes(fmt: str, shape: tuple[int, int]) -> int:
    """Bytes a weight takes in `fmt` (without input_scale), for plans and reports."""
    total = 0
    for dtype, dims in storage_specs(fmt, shape).values():
        n = dtype.itemsize
        for d in dims:
            n *= d
        total += n
    return total


def requantize_fp8_per_tensor(qw: QuantizedWeight) -> QuantizedWeight:
    """A per-channel FP8 weight as a per-tensor one (for files stock ComfyUI must read)."""
    if qw.format != FP8_ROWWISE:
        return qw
    out = quantize_weight(qw.dequantize(torch.float32), FP8_TENSOR)
    if qw.input_scale is not None:
        out.tensors["input_scale"] = qw.input_scale
    return out
