"""A quantized Linear weight: its format, logical shape and the tensors a checkpoint stores for it.

Format names are ComfyUI's (`float8_e4m3fn`, `mxfp8`, `nvfp4`, `int8_tensorwise`) plus two of ours:
`float8_e4m3fn_rowwise` (per-output-channel FP8 scales), which stock ComfyUI cannot read (files
meant for stock ComfyUI are written with per-tensor scales), and `int8_tensorwise_convrot`, our name
for ComfyUI's `int8_tensorwise` layer with `"convrot": true` (weights stored rotated by a
block Hadamard of CONVROT_GROUP_SIZE; format_from_conf / conf_for_format translate).

Any format may carry the outlier transforms of quant.outliers as extra tensors: `pre_quant_scale`
(smoothing; stock ComfyUI v0.33 applies it to NVFP4 layers, ignores it on others) and
`low_rank_down` / `low_rank_up` (the bf16 branch; pack-only): outlier_specs, and STOCK_PRE_QUANT_SCALE
for what a file meant for stock ComfyUI may carry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import formats, outliers, rounding

FP8_TENSOR = "float8_e4m3fn"
FP8_ROWWISE = "float8_e4m3fn_rowwise"
MXFP8 = "mxfp8"
NVFP4 = "nvfp4"
INT8 = "int8_tensorwise"  # per-output-row scales (ComfyUI's int8_tensorwise takes a scalar or one per row)
INT8_CONVROT = "int8_tensorwise_convrot"
FORMATS = (FP8_TENSOR, FP8_ROWWISE, MXFP8, NVFP4, INT8, INT8_CONVROT)
FP8_FORMATS = (FP8_TENSOR, FP8_ROWWISE)
INT8_FORMATS = (INT8, INT8_CONVROT)
OUTLIER_SUFFIXES = ("pre_quant_scale", "low_rank_down", "low_rank_up")  # quant.outliers' tensors of a layer
# The formats whose pre_quant_scale stock ComfyUI applies (v0.33: comfy/quant_ops.py lists it among NVFP4's
# parameters only; on other formats it is an unexpected key, logged and dropped, and the smoothed weight
# then meets the unsmoothed input: wrong output). Stock ComfyUI knows no low-rank branch at all.
STOCK_PRE_QUANT_SCALE = (NVFP4,)


class FormatError(ValueError):
    """A format name, shape or tensor a format cannot hold."""


def check_format(name: str) -> str:
    if name not in FORMATS:
        raise FormatError(f"unknown quantization format {name!r}; known formats: {', '.join(FORMATS)}")
    return name


def rotation(fmt: str) -> int:
    """The ConvRot group size a format's weights are stored rotated by (0: not rotated)."""
    return formats.CONVROT_GROUP_SIZE if fmt == INT8_CONVROT else 0


def fitting_format(fmt: str, shape: tuple[int, ...]) -> str:
    """The format a weight of `shape` takes when a policy asks for `fmt`: ConvRot rotates whole groups of
    input features, so a width that is not a multiple of the group gets plain INT8 (every LTX-2 width is)."""
    if rotation(fmt) and shape[-1] % rotation(fmt):
        return INT8
    return fmt


def format_from_conf(conf: dict) -> str:
    """This pack's format name for a ComfyUI per-layer quantization config (`.comfy_quant` or
    `_quantization_metadata`): its `format`, except that an INT8 layer with ConvRot (top-level keys,
    or under `params` as some writers put them) is INT8_CONVROT. Raises FormatError for formats and
    rotations this pack cannot run."""
    fmt = conf.get("format")
    params = conf.get("params") if isinstance(conf.get("params"), dict) else {}
    if fmt == INT8 and conf.get("convrot", params.get("convrot", False)):
        group = conf.get("convrot_groupsize", params.get("convrot_groupsize", formats.CONVROT_GROUP_SIZE))
        if group != formats.CONVROT_GROUP_SIZE:
            raise FormatError(f"ConvRot group size {group!r}: this pack runs ConvRot INT8 layers of group size "
                              f"{formats.CONVROT_GROUP_SIZE} (ComfyUI's default and the official files')")
        return INT8_CONVROT
    if fmt == INT8_CONVROT or not isinstance(fmt, str):  # our internal name is never a file's
        raise FormatError(f"unknown quantization format {fmt!r}; known formats: {', '.join(FORMATS[:-1])}")
    return check_format(fmt)


def conf_for_format(fmt: str) -> dict:
    """The ComfyUI per-layer config entries that say `fmt` (the inverse of format_from_conf)."""
    if fmt == INT8_CONVROT:
        return {"format": INT8, "convrot": True, "convrot_groupsize": formats.CONVROT_GROUP_SIZE}
    return {"format": check_format(fmt)}


@dataclass
class QuantizedWeight:
    """Packed weight of a Linear with logical shape (out_features, in_features).

    `tensors` uses the checkpoint's suffixes: `weight`, `weight_scale`, `weight_scale_2`, the
    optional static activation scale `input_scale` and the outlier transforms (module docstring):
    the layer computes (quantize(rotate(x * pre_quant_scale)) @ stored^T + (x @ low_rank_down^T) @
    low_rank_up^T; `input_scale` is the scale of x * pre_quant_scale."""

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
    def pre_quant_scale(self) -> torch.Tensor | None:
        return self.tensors.get("pre_quant_scale")

    @property
    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(down (r, K), up (N, r)) of the bf16 branch, or None."""
        if "low_rank_down" not in self.tensors:
            return None
        return self.tensors["low_rank_down"], self.tensors["low_rank_up"]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @classmethod
    def from_tensors(cls, fmt: str, shape: tuple[int, int], tensors: dict[str, torch.Tensor]) -> "QuantizedWeight":
        """From checkpoint tensors as files store them: scales viewed and shaped as this pack uses
        them (e4m3 NVFP4 block scales, uint8 E8M0, 0-d fp32 scalars); a missing FP8 scale is 1."""
        check_format(fmt)
        tensors = dict(tensors)
        if fmt == NVFP4:
            tensors["weight_scale"] = tensors["weight_scale"].view(torch.float8_e4m3fn)
            tensors["weight_scale_2"] = tensors["weight_scale_2"].float().reshape(())
        elif fmt == MXFP8:
            tensors["weight_scale"] = tensors["weight_scale"].view(torch.uint8)
        elif fmt == FP8_TENSOR:
            tensors["weight_scale"] = tensors.get("weight_scale", torch.ones(())).float().reshape(())
        elif fmt in INT8_FORMATS:  # ComfyUI's int8_tensorwise: one scale per tensor or per row
            scale = tensors["weight_scale"].float()
            tensors["weight_scale"] = scale.reshape(()) if scale.numel() == 1 else scale.reshape(shape[0], 1)
        if "input_scale" in tensors:
            tensors["input_scale"] = tensors["input_scale"].float().reshape(())
        stored = storage_specs(fmt, shape)
        for suffix in ("weight", "weight_scale"):
            if fmt in INT8_FORMATS and suffix == "weight_scale":
                continue  # shaped above: a scalar is valid too
            tensors[suffix] = tensors[suffix].reshape(stored[suffix][1])
        return cls(fmt, tuple(shape), tensors)

    def quantized_part(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The quantized matrix, rotation undone: the weight the smoothed input x * pre_quant_scale
        meets, without the low-rank branch."""
        if self.format in (FP8_TENSOR, FP8_ROWWISE):
            return formats.dequantize_fp8(self.data, self.scale, dtype)
        if self.format == MXFP8:
            return formats.dequantize_mxfp8(self.data, self.scale, self.shape, dtype)
        if self.format in INT8_FORMATS:
            return formats.dequantize_int8(self.data, self.scale, rotation(self.format), dtype)
        return formats.dequantize_nvfp4(self.data, self.scale, self.tensors["weight_scale_2"], self.shape, dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this layer computes with, W such that its output is x @ W^T for unquantized x."""
        if self.pre_quant_scale is None and self.low_rank is None:
            return self.quantized_part(dtype)
        return self._undo_outlier_transforms(self.quantized_part(torch.float32)).to(dtype)

    def _undo_outlier_transforms(self, part: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:
            part = part * self.pre_quant_scale.float()
        if self.low_rank is not None:
            down, up = self.low_rank
            part = part + up.float() @ down.float()
        return part

    def to_quantized_basis(self, dense: torch.Tensor) -> torch.Tensor:
        """The inverse of dequantize before rounding: what the quantized part must hold for the layer to
        compute with `dense` (fp32, rotation not applied)."""
        dense = dense.float()
        if self.low_rank is not None:
            down, up = self.low_rank
            dense = dense - up.float() @ down.float()
        if self.pre_quant_scale is not None:
            dense = dense / self.pre_quant_scale.float()
        return dense

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        return QuantizedWeight(self.format, self.shape, {k: v.to(device) for k, v in self.tensors.items()})


# Rows quantized per pass: bounds the fp32 temporaries to a few MB whatever the weight size, so
# quantizing a file needs about one tensor of extra memory (a multiple of 32 keeps MX/NV blocks whole).
# On a GPU, passes of 1M elements are launch-bound (the NVFP4 scale search launches ~100 kernels per
# pass: 22 B weights took 60 s more to load); 16M elements keep temporaries near 300 MB.
CHUNK_ELEMENTS = 1 << 20
GPU_CHUNK_ELEMENTS = 1 << 24


def _row_chunks(w: torch.Tensor) -> list[torch.Tensor]:
    elements = GPU_CHUNK_ELEMENTS if w.is_cuda else CHUNK_ELEMENTS
    rows = max(32, (elements // max(1, w.shape[1])) // 32 * 32)
    return list(torch.split(w, rows, dim=0))


def _amax(w: torch.Tensor) -> torch.Tensor:
    return torch.stack([chunk.abs().amax() for chunk in _row_chunks(w)]).amax()


def _smoothing(w: torch.Tensor, handling: outliers.Outliers, channel_amax: torch.Tensor | None
               ) -> dict[str, torch.Tensor]:
    if handling.smooth_alpha and channel_amax is not None:
        return {"pre_quant_scale": outliers.pre_quant_scale(channel_amax, w, handling.smooth_alpha)}
    return {}


def branch_rank(w: torch.Tensor, fmt: str, handling: outliers.Outliers,
                channel_amax: torch.Tensor | None = None) -> int:
    """The rank of the low-rank branch quantize_weight gives `w` (0: none), for a writer that must
    know every tensor's shape before it quantizes (pass it back as quantize_weight's `rank`)."""
    if not handling.low_rank_bytes:
        return 0
    shape = (int(w.shape[0]), int(w.shape[1]))
    smoothed = QuantizedWeight(fmt, shape, _smoothing(w, handling, channel_amax)).to_quantized_basis(w)
    return outliers.branch_rank(smoothed, storage_nbytes(fmt, shape), handling.low_rank_bytes)


def outlier_specs(shape: tuple[int, int], smoothed: bool, rank: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The outlier tensors (suffix -> dtype, shape) a layer of logical `shape` carries beside its format's
    (storage_specs): pre_quant_scale (K,) when smoothed, low_rank_down (rank, K) and low_rank_up (N, rank)."""
    n, k = shape
    specs = {"pre_quant_scale": (torch.bfloat16, (k,))} if smoothed else {}
    if rank:
        specs.update(low_rank_down=(outliers.BRANCH_DTYPE, (rank, k)), low_rank_up=(outliers.BRANCH_DTYPE, (n, rank)))
    return specs


def quantize_weight(w: torch.Tensor, fmt: str, handling: outliers.Outliers = outliers.NONE,
                    channel_amax: torch.Tensor | None = None, rank: int | None = None,
                    hessian: torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize a 2-D weight to `fmt`, in row chunks (identical bytes to one pass: scales that span
    the tensor are computed first), with `handling`'s outlier transforms (smoothing needs the layer's
    calibrated per-channel amax; without it the layer is not smoothed; `rank` fixes the low-rank
    branch's rank, see branch_rank). With the layer's input `hessian` (quant.rounding's forms, in the
    unsmoothed basis) the weight is rounded by GPTQ instead of to nearest; a diagonal one (K,) only
    weights NVFP4's block-scale search (other formats: no change). Raises FormatError for shapes the
    format cannot hold."""
    check_format(fmt)
    if w.dim() != 2:
        raise FormatError(f"{fmt} holds 2-D Linear weights only, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise FormatError(f"{fmt} quantizes floating-point weights, got {w.dtype}")
    shape = (int(w.shape[0]), int(w.shape[1]))
    transforms = _smoothing(w, handling, channel_amax)
    if handling.low_rank_bytes:
        smoothed = QuantizedWeight(fmt, shape, transforms).to_quantized_basis(w)
        branch = outliers.low_rank_branch(smoothed, storage_nbytes(fmt, shape), handling.low_rank_bytes, rank)
        if branch is not None:
            down, up = branch
            if "pre_quant_scale" in transforms:  # the branch reads x itself: (x * p) @ down^T = x @ (down * p)^T
                down = (down.float() * transforms["pre_quant_scale"].float()).to(outliers.BRANCH_DTYPE)
            transforms.update(low_rank_down=down, low_rank_up=up)
    if transforms:
        # The residual against the stored (rounded) branch and scale, so their rounding is quantized too.
        w = QuantizedWeight(fmt, shape, transforms).to_quantized_basis(w)
        if hessian is not None and "pre_quant_scale" in transforms:
            hessian = rounding.smoothed_hessian(hessian, transforms["pre_quant_scale"])
        out = quantize_weight(w, fmt, hessian=hessian)
        out.tensors.update(transforms)
        return out
    if hessian is not None and hessian.dim() > 1:
        return rounding.gptq_quantize(w, fmt, hessian)
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
    if fmt in INT8_FORMATS:  # rows are independent, the rotation too (it mixes features within a row)
        group = rotation(fmt)
        if group and shape[1] % group:
            raise FormatError(f"{fmt} rotates whole ConvRot groups of {group} input features; this weight has "
                              f"{shape[1]} (policies.plan gives such layers {INT8})")
        parts = [formats.quantize_int8_rows(formats.rotate_groups(c, group) if group else c) for c in chunks]
        return QuantizedWeight(fmt, shape, {"weight": torch.cat([p[0] for p in parts]),
                                            "weight_scale": torch.cat([p[1] for p in parts])})
    global_scale = _amax(w).float() / formats.NVFP4_GLOBAL_DIVISOR
    # Searched block scales: 15% less weight error than amax/6 for the same bytes (formats.py).
    # A diagonal hessian weights the search by each input channel's mean square (quant.rounding).
    parts = [formats.quantize_nvfp4_rows(c, global_scale, search_scales=True, importance=hessian) for c in chunks]
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
    if fmt in INT8_FORMATS:
        return {"weight": (torch.int8, (rows, cols)), "weight_scale": (torch.float32, (rows, 1))}
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



def requantize_like(qw: QuantizedWeight, dense: torch.Tensor, seed: int | None = None) -> QuantizedWeight:
    """`dense` (e.g. a weight with a LoRA merged in) in qw's format with qw's scales kept, so that
    only the element data changes: ComfyUI backs up and restores a patched layer's `weight` alone.
    Values beyond a block's or row's range saturate (LoRA deltas are small against the weight).
    With `seed`, elements round stochastically, so deltas below one quantization step survive on
    average instead of vanishing (ComfyUI core merges LoRAs into FP8 the same way)."""
    n, k = qw.shape
    dense = qw.to_quantized_basis(dense)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=dense.device).manual_seed(seed % (2 ** 63))
    to_fp8 = formats.cast_to_fp8 if generator is None else (lambda v: formats.stochastic_round_fp8(v, generator))
    if qw.format in INT8_FORMATS:
        group = rotation(qw.format)
        scaled = (formats.rotate_groups(dense, group) if group else dense) * (1.0 / qw.scale.float())
        if generator is not None:
            noise = torch.rand(scaled.shape, generator=generator, device=generator.device).to(scaled.device)
            rounded = torch.floor(scaled + noise)  # up with probability frac(x): unbiased
        else:
            rounded = scaled.round()
        data = rounded.clamp(-128.0, formats.INT8_MAX).to(torch.int8)
        return QuantizedWeight(qw.format, qw.shape, {**qw.tensors, "weight": data})
    to_e2m1 = formats.e2m1_encode if generator is None else (lambda v: formats.stochastic_round_e2m1(v, generator))
    if qw.format in (FP8_TENSOR, FP8_ROWWISE):
        data = to_fp8(dense * (1.0 / qw.scale.float()))
    elif qw.format == MXFP8:
        rows, cols = qw.data.shape
        padded = torch.nn.functional.pad(dense, (0, cols - k, 0, rows - n))
        scale = formats.e8m0_to_float(formats.unswizzle_scales(qw.scale, rows, cols // formats.MXFP8_BLOCK))
        blocks = padded.reshape(rows, -1, formats.MXFP8_BLOCK) / scale.unsqueeze(-1)
        data = to_fp8(blocks.reshape(rows, cols))
    else:
        rows, cols = qw.data.shape[0], qw.data.shape[1] * 2
        padded = torch.nn.functional.pad(dense, (0, cols - k, 0, rows - n))
        block = formats.unswizzle_scales(qw.scale, rows, cols // formats.NVFP4_BLOCK).float()
        total = (block * qw.tensors["weight_scale_2"].float()).unsqueeze(-1)
        scaled = padded.reshape(rows, -1, formats.NVFP4_BLOCK) / torch.where(total == 0, torch.ones_like(total), total)
        scaled = torch.where(total == 0, torch.zeros_like(scaled), scaled)
        codes = to_e2m1(scaled.clamp(-formats.E2M1_MAX, formats.E2M1_MAX).reshape(rows, cols))
        data = formats.pack_nibbles(codes)
    return QuantizedWeight(qw.format, qw.shape, {**qw.tensors, "weight": data})
