"""Triton kernels for the GPU fast paths, exposed as torch custom ops (so torch.compile sees them).

- `quantize_fp8_rows`: activation quantization to E4M3, dynamic per-row (per-token) scales or one
  static scale, clamped before the cast. One program per row; rows up to 16,384 are read once, longer
  ones twice (amax, then quantize), the second time from L2. With `gelu` it applies the tanh GELU
  first, in the same pass: the FFN's second Linear quantizes its input straight from the
  first one's output.
- `nvfp4_to_fp8` / `nvfp4_to_bf16`: just-in-time conversion of a packed NVFP4 weight to E4M3 with
  one scale per output row (for W8A8 on Hopper/Ada), or to bf16/fp16 (the exact dequantize path).
  Block scales are read straight from the swizzled layout through its closed-form offset.
- `fp8_rows_to_bf16`: an E4M3 weight with per-row scales to bf16/fp16 (the fp8-cast path).
- `quantize_nvfp4_activation`: activations to NVFP4 (E2M1 codes, one E4M3 scale per 16 elements in
  the swizzled layout, one fp32 global scale) for Blackwell's native W4A4 GEMM, in one pass.

The expansions to bf16/fp16 decode E4M3 from its bits, so they also run before sm_89 (Turing,
Ampere), where Triton has no FP8 type; the E4M3 outputs need sm_89.

Each has a plain-torch twin in quant.formats / quant.reference that the tests compare with, and
runs on the CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the runtime falls back to the reference path
    triton = None

from . import formats
from .formats import FP8_MAX, NVFP4_BLOCK, round_up

AVAILABLE = triton is not None
# Triton's CPU interpreter rounds fp32 -> fp8/bf16 casts wrongly (exponent carries, truncation), so
# there the kernels build the rounded bit patterns themselves; on the GPU the hardware conversion
# (cvt.rn.satfinite) does the same rounding in one instruction. Both are tested against torch.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


if AVAILABLE:
    _FP8_MAX = tl.constexpr(FP8_MAX)

    @triton.jit
    def _round_to_float_grid(x, MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr):
        """Round-to-nearest-even of fp32 x onto the grid of a float format with MANTISSA_BITS
        stored mantissa bits whose smallest normal exponent is MIN_EXPONENT (below it the step
        stays fixed: subnormals). The narrowing cast after this is exact, so results do not
        depend on the cast's own rounding (Triton's CPU interpreter rounds fp8/bf16 casts wrongly).
        Steps are built from exponent bits, so scaling by them is exact."""
        exponent = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        step_exponent = tl.maximum(exponent, MIN_EXPONENT) - MANTISSA_BITS
        step = ((step_exponent + 127) << 23).to(tl.float32, bitcast=True)
        inverse_step = ((127 - step_exponent) << 23).to(tl.float32, bitcast=True)
        y = x * inverse_step  # |y| < 2^(MANTISSA_BITS+1): y + 0.5 below is exact
        rounded = tl.floor(y + 0.5)
        odd = (rounded - 2.0 * tl.floor(rounded * 0.5)) != 0.0
        rounded = tl.where(((rounded - y) == 0.5) & odd, rounded - 1.0, rounded)  # ties to even
        return tl.where(rounded == 0.0, x * 0.0, rounded * step)  # x * 0 keeps the sign of zero

    @triton.jit
    def _to_fp8_bits(x, INTERPRET: tl.constexpr):
        """Saturating RNE fp32 -> E4M3 bit pattern (uint8); NaN stays NaN."""
        q = tl.minimum(tl.maximum(x, -_FP8_MAX, propagate_nan=tl.PropagateNan.ALL), _FP8_MAX,
                       propagate_nan=tl.PropagateNan.ALL)
        if not INTERPRET:
            return q.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        q = _round_to_float_grid(q, 3, -6)
        q = tl.minimum(tl.maximum(q, -_FP8_MAX, propagate_nan=tl.PropagateNan.ALL), _FP8_MAX,
                       propagate_nan=tl.PropagateNan.ALL)
        bits = q.to(tl.int32, bitcast=True)
        sign = (bits >> 24) & 0x80
        exponent = ((bits >> 23) & 0xFF) - 127
        normal = ((exponent + 7) << 3) | ((bits >> 20) & 0x7)
        subnormal = (tl.abs(q) * 512.0).to(tl.int32)  # q = m * 2^-9, m in 0..7: exact
        code = tl.where(tl.abs(q) >= 0.015625, normal, subnormal)
        code = tl.where(q != q, 0x7F, code) | sign
        return code.to(tl.uint8)

    @triton.jit
    def _abs_max_bits(v):
        """max |v| over all of v, as the bits of an fp32 >= 0: those order like the floats, and a NaN
        (all-ones exponent, non-zero mantissa) outranks everything, so the row's scale becomes NaN,
        as in the references."""
        return tl.max(tl.abs(v).to(tl.int32, bitcast=True), axis=None)

    @triton.jit
    def _store_row_scale(scale, row_ptr):
        """Stores a row's decode scale; returns its reciprocal. Scales and reciprocals are divided
        correctly rounded (div_rn: Triton's `/` is approximate)."""
        tl.store(row_ptr, scale)
        return tl.math.div_rn(1.0, scale)

    @triton.jit
    def _fp8_row_scale(amax_bits, row_ptr):
        """Stores the row's decode scale amax/448 (1.0 for a zero row); returns its reciprocal."""
        row_max = amax_bits.to(tl.float32, bitcast=True)
        return _store_row_scale(tl.where(row_max == 0.0, 1.0, tl.math.div_rn(row_max, _FP8_MAX)), row_ptr)

    @triton.jit
    def _gelu_tanh(v):
        """GELU, tanh approximation, in fp32: 0.5 v (1 + tanh(u)) = v * sigmoid(2u), one exp."""
        u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        return v / (1.0 + tl.exp(-2.0 * u))

    @triton.jit
    def _load_row_part(ptrs, pre_scale_ptrs, mask, GELU: tl.constexpr, PRE_SCALE: tl.constexpr):
        v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        if GELU:
            v = _gelu_tanh(v)  # gelu(0) = 0: masked lanes stay out of the amax
        if PRE_SCALE:  # a smoothed layer's factor per input feature (quant.outliers), after the GELU
            v = v * tl.load(pre_scale_ptrs, mask=mask, other=0.0).to(tl.float32)
        return v

    @triton.jit
    def _quantize_fp8_rows_kernel(x_ptr, out_ptr, scale_ptr, static_scale_ptr, pre_scale_ptr, stride_x, stride_out,
                                  K: tl.constexpr, STATIC: tl.constexpr, GELU: tl.constexpr, PRE_SCALE: tl.constexpr,
                                  BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        out_row = out_ptr + row * stride_out
        cols = tl.arange(0, BLOCK_K)
        if K <= BLOCK_K:  # the whole row in registers: one read from memory
            v = _load_row_part(x_row + cols, pre_scale_ptr + cols, cols < K, GELU, PRE_SCALE)
            if STATIC:
                inverse = tl.math.div_rn(1.0, tl.load(static_scale_ptr).to(tl.float32))
            else:
                inverse = _fp8_row_scale(_abs_max_bits(v), scale_ptr + row)
            tl.store(out_row + cols, _to_fp8_bits(v * inverse, INTERPRET), mask=cols < K)
        else:  # long rows: amax pass, then quantize pass (the re-read mostly hits L2)
            if STATIC:
                inverse = tl.math.div_rn(1.0, tl.load(static_scale_ptr).to(tl.float32))
            else:
                amax = tl.zeros([BLOCK_K], dtype=tl.float32)
                for start in range(0, K, BLOCK_K):
                    offs = start + cols
                    v = _load_row_part(x_row + offs, pre_scale_ptr + offs, offs < K, GELU, PRE_SCALE)
                    amax = tl.maximum(amax, tl.abs(v), propagate_nan=tl.PropagateNan.ALL)
                inverse = _fp8_row_scale(_abs_max_bits(amax), scale_ptr + row)
            for start in range(0, K, BLOCK_K):
                offs = start + cols
                v = _load_row_part(x_row + offs, pre_scale_ptr + offs, offs < K, GELU, PRE_SCALE)
                tl.store(out_row + offs, _to_fp8_bits(v * inverse, INTERPRET), mask=offs < K)

    @triton.jit
    def _e2m1_value(nibble):
        """E2M1 code (int32, 0..15) -> fp32 built from bits: exact, no table, no special functions."""
        exponent = (nibble >> 1) & 3
        mantissa = nibble & 1
        bits = tl.where(exponent == 0, mantissa * (126 << 23), ((126 + exponent) << 23) | (mantissa << 22))
        return (bits | ((nibble & 8) << 28)).to(tl.float32, bitcast=True)  # sign kept, also for -0

    @triton.jit
    def _e4m3_value(code):
        """E4M3 code (int32, 0..255) -> fp32 built from bits: exact, and without Triton's FP8 type,
        which exists only from sm_89 (the expansion kernels also run on Turing and Ampere).
        Codes 0x7F and 0xFF are NaN."""
        exponent = (code >> 3) & 0xF
        mantissa = code & 7
        normal = ((exponent + 120) << 23) | (mantissa << 20)  # 2^(e - 7) * (1 + m / 8): bias 7 -> 127
        subnormal = (mantissa.to(tl.float32) * 0.001953125).to(tl.int32, bitcast=True)  # m * 2^-9, exact
        bits = tl.where(exponent == 0, subnormal, normal)
        bits = tl.where((code & 0x7F) == 0x7F, 0x7FC00000, bits)
        return (bits | ((code & 0x80) << 24)).to(tl.float32, bitcast=True)

    @triton.jit
    def _nvfp4_rows_kernel(packed_ptr, scales_ptr, global_scale_ptr, row_ratio_ptr, out_ptr,
                           N, K, stride_packed, stride_out, scale_cols_padded,
                           TO_FP8: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           INTERPRET: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows64 = rows.to(tl.int64)
        pairs = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        pair_mask = (rows[:, None] < N) & (pairs[None, :] * 2 < K)
        byte = tl.load(packed_ptr + rows64[:, None] * stride_packed + pairs[None, :], mask=pair_mask, other=0)
        byte = byte.to(tl.int32)
        # element 2j is the high nibble: join (high, low) on a new minor axis, then flatten
        values = tl.reshape(tl.join(_e2m1_value(byte >> 4), _e2m1_value(byte & 0xF)), (BLOCK_N, BLOCK_K))
        # One block scale per 16 elements, read from the cuBLAS 128x4 swizzled layout.
        block = tl.program_id(1) * (BLOCK_K // 16) + tl.arange(0, BLOCK_K // 16)
        offset = ((rows[:, None] // 128) * (scale_cols_padded // 4) + block[None, :] // 4) * 512 \
            + (rows[:, None] % 32) * 16 + ((rows[:, None] % 128) // 32) * 4 + (block[None, :] % 4)
        scale_mask = (rows[:, None] < N) & (block[None, :] * 16 < K)
        block_scale = tl.load(scales_ptr + offset, mask=scale_mask, other=0)
        block_scale = _e4m3_value(block_scale.to(tl.int32))
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rows[:, None] < N) & (cols[None, :] < K)
        if TO_FP8:
            # value * block * global / row_scale, with row_scale = global * rowmax(block) * 6 / 448
            factor = block_scale * tl.load(row_ratio_ptr + rows, mask=rows < N, other=1.0)[:, None]
            scaled = tl.reshape(tl.reshape(values, (BLOCK_N, BLOCK_K // 16, 16)) * factor[:, :, None],
                                (BLOCK_N, BLOCK_K))
            tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :], _to_fp8_bits(scaled, INTERPRET), mask=mask)
        else:
            factor = block_scale * tl.load(global_scale_ptr)
            scaled = tl.reshape(tl.reshape(values, (BLOCK_N, BLOCK_K // 16, 16)) * factor[:, :, None],
                                (BLOCK_N, BLOCK_K))
            tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :],
                     _to_output(scaled, out_ptr.dtype.element_ty, INTERPRET), mask=mask)

    @triton.jit
    def _to_bf16(x, INTERPRET: tl.constexpr):
        """RNE fp32 -> bf16 (in the interpreter: 7 mantissa bits by hand; below 2^-100 coarser)."""
        if INTERPRET:
            x = _round_to_float_grid(x, 7, -100)
        return x.to(tl.bfloat16)

    @triton.jit
    def _to_output(x, OUT: tl.constexpr, INTERPRET: tl.constexpr):
        """RNE fp32 -> OUT (bf16, fp16 or fp32: an output pointer's element type)."""
        if OUT == tl.bfloat16:
            x = _to_bf16(x, INTERPRET)
        return x.to(OUT)

    @triton.jit
    def _fp8_rows_to_bf16_kernel(data_ptr, scale_ptr, out_ptr, N, K, stride_data, stride_out,
                                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rows[:, None] < N) & (cols[None, :] < K)
        rows64 = rows.to(tl.int64)
        bits = tl.load(data_ptr + rows64[:, None] * stride_data + cols[None, :], mask=mask, other=0)
        value = _e4m3_value(bits.to(tl.int32))
        scale = tl.load(scale_ptr + rows, mask=rows < N, other=1.0)
        tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :],
                 _to_output(value * scale[:, None], out_ptr.dtype.element_ty, INTERPRET), mask=mask)


# Row quantizers run one program per row holding up to ROW_BLOCK features in registers: read once from
# memory (every LTX-2 row fits); longer rows are read in chunks of ROW_BLOCK twice (amax, then quantize).
ROW_BLOCK = 16384


def row_block(cols: int) -> int:
    """Features a row-quantizer program reads at a time."""
    return min(triton.next_power_of_2(cols), ROW_BLOCK)


def row_warps(block: int) -> int:
    return max(1, min(16, block // 512))


def _quantize_fp8_rows_launch(x: torch.Tensor, static_scale: torch.Tensor | None, gelu: bool = False,
                              pre_quant_scale: torch.Tensor | None = None, wrap=lambda kernel: kernel
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = x.shape
    if pre_quant_scale is not None and pre_quant_scale.numel() != cols:
        raise ValueError(f"pre_quant_scale has {pre_quant_scale.numel()} values for rows of {cols} features")
    static = static_scale is not None
    out = torch.empty((rows, cols), dtype=torch.uint8, device=x.device)
    scale = static_scale if static else torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows == 0:
        return out.view(torch.float8_e4m3fn), scale
    block = row_block(cols)
    wrap(_quantize_fp8_rows_kernel)[(rows,)](
        x, out, scale, scale, x if pre_quant_scale is None else pre_quant_scale, x.stride(0), out.stride(0), K=cols,
        STATIC=static, GELU=gelu, PRE_SCALE=pre_quant_scale is not None, BLOCK_K=block, INTERPRET=INTERPRET,
        num_warps=row_warps(block))
    return out.view(torch.float8_e4m3fn), scale


def nvfp4_row_ratio(block_scales: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Per output row, the factor that takes an NVFP4 element (e2m1 * block scale) onto E4M3; the
    row's FP8 decode scale is global_scale / ratio. Computed once at load, (N,) fp32.

    The ratio is a power of two (the largest that keeps 6 * the row's largest block scale within
    448), so an element whose product has E4M3's 4 significant bits converts exactly; an arbitrary
    ratio re-rounds every element (measured: 0.021 vs 0.029 extra relative weight error)."""
    from .formats import E2M1_MAX, unswizzle_scales
    rows, cols = shape
    scales = unswizzle_scales(block_scales.view(torch.float8_e4m3fn), round_up(rows, NVFP4_BLOCK),
                              round_up(cols, NVFP4_BLOCK) // NVFP4_BLOCK)[:rows].float()
    row_max_block = scales.amax(dim=1)
    exponent = torch.floor(torch.log2(FP8_MAX / (E2M1_MAX * row_max_block.clamp(min=2.0 ** -126))))
    return torch.where(row_max_block > 0, torch.exp2(exponent), torch.ones_like(row_max_block))


def _nvfp4_launch(packed: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
                  ratio: torch.Tensor | None, n: int, k: int, out_dtype: torch.dtype = torch.bfloat16,
                  wrap=lambda kernel: kernel) -> torch.Tensor:
    """To E4M3 with `ratio` (Ada and newer), else to `out_dtype` (bf16, or fp16 on Turing)."""
    to_fp8 = ratio is not None
    out = torch.empty((n, k), dtype=torch.uint8 if to_fp8 else out_dtype, device=packed.device)
    scale_cols_padded = round_up(round_up(k, NVFP4_BLOCK) // NVFP4_BLOCK, 4)
    block_n, block_k = 16, 256
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    wrap(_nvfp4_rows_kernel)[grid](packed, block_scales.view(torch.uint8), global_scale.float().reshape(1),
                             ratio if to_fp8 else global_scale, out, n, k, packed.stride(0), out.stride(0),
                             scale_cols_padded, TO_FP8=to_fp8, BLOCK_N=block_n, BLOCK_K=block_k,
                             INTERPRET=INTERPRET, num_warps=4)
    return out.view(torch.float8_e4m3fn) if to_fp8 else out


# The weight-expansion kernels are torch triton_ops: torch.compile sees each as one node and Inductor
# launches the Triton kernel straight from its generated code (a plain custom op would cost a
# dispatcher round trip per call: at 6k tokens that made the compiled nvfp4 step CPU-bound). Eager
# callers launch directly; the public functions below pick one or the other.

@torch.library.triton_op("ltx2_quant::nvfp4_to_fp8", mutates_args=())
def _nvfp4_to_fp8_op(packed: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
                     ratio: torch.Tensor, n: int, k: int) -> torch.Tensor:
    return _nvfp4_launch(packed, block_scales, global_scale, ratio, n, k, wrap=torch.library.wrap_triton)


@torch.library.triton_op("ltx2_quant::nvfp4_to_bf16", mutates_args=())
def _nvfp4_to_bf16_op(packed: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
                      n: int, k: int, out_dtype: torch.dtype) -> torch.Tensor:
    return _nvfp4_launch(packed, block_scales, global_scale, None, n, k, out_dtype, wrap=torch.library.wrap_triton)


def _fp8_rows_to_bf16_launch(data: torch.Tensor, row_scale: torch.Tensor, out_dtype: torch.dtype,
                             wrap=lambda kernel: kernel) -> torch.Tensor:
    n, k = data.shape
    out = torch.empty((n, k), dtype=out_dtype, device=data.device)
    grid = (triton.cdiv(n, 16), triton.cdiv(k, 256))
    wrap(_fp8_rows_to_bf16_kernel)[grid](data.view(torch.uint8), row_scale.float().contiguous(), out, n, k,
                                         data.stride(0), out.stride(0), BLOCK_N=16, BLOCK_K=256,
                                         INTERPRET=INTERPRET, num_warps=4)
    return out


@torch.library.triton_op("ltx2_quant::fp8_rows_to_bf16", mutates_args=())
def _fp8_rows_to_bf16_op(data: torch.Tensor, row_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return _fp8_rows_to_bf16_launch(data, row_scale, out_dtype, wrap=torch.library.wrap_triton)


# Under torch.compile the GELU + quantization stays our kernel: Inductor's own fusion of the formula
# read each row twice and evaluated the fp32 GELU on both passes, 1.27 ms a call on the video FFN at
# 24,576 tokens on an H200 (docs/BENCHMARKS.md, "Where a step's time goes"; bench/profile_step.py).
@torch.library.triton_op("ltx2_quant::gelu_quantize_fp8_rows", mutates_args=())
def _gelu_quantize_fp8_rows_op(x: torch.Tensor, pre_quant_scale: torch.Tensor | None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    return _quantize_fp8_rows_launch(x, None, True, pre_quant_scale, wrap=torch.library.wrap_triton)


@torch.library.triton_op("ltx2_quant::gelu_quantize_fp8_static", mutates_args=())
def _gelu_quantize_fp8_static_op(x: torch.Tensor, input_scale: torch.Tensor, pre_quant_scale: torch.Tensor | None
                                 ) -> torch.Tensor:
    return _quantize_fp8_rows_launch(x, input_scale, True, pre_quant_scale, wrap=torch.library.wrap_triton)[0]


def _smoothed(x: torch.Tensor, pre_quant_scale: torch.Tensor | None) -> torch.Tensor:
    """The traced formula's input: x times the smoothing factors in fp32, as the kernel computes it."""
    return x if pre_quant_scale is None else x.float() * pre_quant_scale.float()


def quantize_fp8_rows(x: torch.Tensor, gelu: bool = False, pre_quant_scale: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) bf16/fp16/fp32 -> (E4M3 (M, K), fp32 (M, 1) per-row decode scales); with `gelu`, of
    gelu_tanh(x) in the same pass (the GELU in fp32, not rounded to x's dtype first); with
    `pre_quant_scale` (K,), of that times a smoothing factor per feature (quant.outliers). Under
    torch.compile the plain formula is traced instead, so Inductor fuses it into the op that produced
    x; with `gelu` the kernel runs as a triton_op (see above)."""
    scale = None if pre_quant_scale is None else pre_quant_scale.contiguous()
    if torch.compiler.is_compiling():
        if gelu:
            return _gelu_quantize_fp8_rows_op(x.contiguous(), scale)
        return formats.quantize_fp8_rowwise_dynamic(_smoothed(x, scale))
    return _quantize_fp8_rows_launch(x.contiguous(), None, gelu, scale)


def quantize_fp8_static(x: torch.Tensor, input_scale: torch.Tensor, gelu: bool = False,
                        pre_quant_scale: torch.Tensor | None = None) -> torch.Tensor:
    """(M, K) -> E4M3 with one calibrated scale, clamped before the cast; `gelu`, `pre_quant_scale` and
    torch.compile as in quantize_fp8_rows."""
    scale = None if pre_quant_scale is None else pre_quant_scale.contiguous()
    if torch.compiler.is_compiling():
        if gelu:
            return _gelu_quantize_fp8_static_op(x.contiguous(), input_scale, scale)
        return formats.quantize_fp8_static(_smoothed(x, scale), input_scale)
    return _quantize_fp8_rows_launch(x.contiguous(), input_scale, gelu, scale)[0]


def nvfp4_to_fp8(packed: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
                 ratio: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Packed NVFP4 (N, K) -> E4M3 (N, K) whose row n decodes with global * rowmax_block(n) * 6/448."""
    if torch.compiler.is_compiling():
        return _nvfp4_to_fp8_op(packed, block_scales, global_scale, ratio, n, k)
    return _nvfp4_launch(packed, block_scales, global_scale, ratio, n, k)


def nvfp4_to_bf16(packed: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
                  n: int, k: int, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Packed NVFP4 (N, K) -> bf16 (or `out_dtype` fp16, for Turing), exact up to the final rounding of
    block * global. Runs on any GPU Triton supports (sm_75 and newer)."""
    if torch.compiler.is_compiling():
        return _nvfp4_to_bf16_op(packed, block_scales, global_scale, n, k, out_dtype)
    return _nvfp4_launch(packed, block_scales, global_scale, None, n, k, out_dtype)


def fp8_rows_to_bf16(data: torch.Tensor, row_scale: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
                     ) -> torch.Tensor:
    """E4M3 (N, K) times an fp32 per-row scale (N values) -> bf16 (or `out_dtype` fp16, for Turing), one
    pass (the fp8-cast path). Runs on any GPU Triton supports (sm_75 and newer)."""
    if torch.compiler.is_compiling():
        return _fp8_rows_to_bf16_op(data, row_scale, out_dtype)
    return _fp8_rows_to_bf16_launch(data, row_scale, out_dtype)


if AVAILABLE:
    @triton.jit
    def _e2m1_code(y):
        """Round-to-nearest-even of fp32 y (within +-6) onto E2M1: its 4-bit code, the sign kept (also
        for values that round to 0, as comfy-kitchen's encoder keeps it)."""
        a = tl.abs(y)
        code = tl.where(a <= 0.25, 0, tl.where(a < 0.75, 1, tl.where(a <= 1.25, 2, tl.where(a < 1.75, 3, tl.where(
            a <= 2.5, 4, tl.where(a < 3.5, 5, tl.where(a <= 5.0, 6, 7)))))))
        return tl.where((y.to(tl.int32, bitcast=True) >> 31) != 0, code | 8, code)

    @triton.jit
    def _nvfp4_activation_kernel(x_ptr, packed_ptr, scales_ptr, global_ptr, M, K, stride_x, stride_packed,
                                 scale_cols_padded, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                                 INTERPRET: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        rows64 = rows.to(tl.int64)
        mask = (rows[:, None] < M) & (cols[None, :] < K)
        x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        global_scale = tl.load(global_ptr)
        blocks = tl.reshape(x, (BLOCK_M, BLOCK_K // 16, 16))
        # The block scale as formats.quantize_nvfp4_rows computes it: (amax / 6) / global, RNE to E4M3.
        wanted = tl.math.div_rn(tl.math.div_rn(tl.max(tl.abs(blocks), axis=2), 6.0), global_scale)
        wanted = tl.where(global_scale == 0.0, 0.0, tl.minimum(wanted, _FP8_MAX))
        scale_code = _to_fp8_bits(wanted, INTERPRET).to(tl.int32)
        total = global_scale * _e4m3_value(scale_code)
        scaled = tl.math.div_rn(blocks, tl.where(total == 0.0, 1.0, total)[:, :, None])
        scaled = tl.where(total[:, :, None] == 0.0, 0.0, tl.minimum(tl.maximum(scaled, -6.0), 6.0))
        high, low = tl.split(tl.reshape(_e2m1_code(scaled), (BLOCK_M, BLOCK_K // 2, 2)))  # element 2j: high
        pairs = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        tl.store(packed_ptr + rows64[:, None] * stride_packed + pairs[None, :], ((high << 4) | low).to(tl.uint8),
                 mask=(rows[:, None] < M) & (pairs[None, :] * 2 < K))
        block = tl.program_id(1) * (BLOCK_K // 16) + tl.arange(0, BLOCK_K // 16)
        offset = ((rows[:, None] // 128) * (scale_cols_padded // 4) + block[None, :] // 4) * 512 \
            + (rows[:, None] % 32) * 16 + ((rows[:, None] % 128) // 32) * 4 + (block[None, :] % 4)
        tl.store(scales_ptr + offset, scale_code.to(tl.uint8), mask=(rows[:, None] < M) & (block[None, :] * 16 < K))


def _nvfp4_activation_launch(x: torch.Tensor, global_scale: torch.Tensor, wrap=lambda kernel: kernel
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = x.shape
    padded_rows, padded_cols = round_up(rows, NVFP4_BLOCK), round_up(cols, NVFP4_BLOCK)
    packed = torch.zeros((padded_rows, padded_cols // 2), dtype=torch.uint8, device=x.device)
    scales = torch.zeros(formats.swizzled_shape(padded_rows, padded_cols // NVFP4_BLOCK), dtype=torch.uint8,
                         device=x.device)
    if rows:
        block_m, block_k = 16, 128
        wrap(_nvfp4_activation_kernel)[(triton.cdiv(rows, block_m), triton.cdiv(cols, block_k))](
            x, packed, scales, global_scale, rows, cols, x.stride(0), packed.stride(0), scales.shape[1],
            BLOCK_M=block_m, BLOCK_K=block_k, INTERPRET=INTERPRET, num_warps=4)
    return packed, scales


@torch.library.triton_op("ltx2_quant::quantize_nvfp4_activation", mutates_args=())
def _quantize_nvfp4_activation_op(x: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _nvfp4_activation_launch(x, global_scale, wrap=torch.library.wrap_triton)


def quantize_nvfp4_activation(x: torch.Tensor, global_scale: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M, K) activations -> NVFP4 as formats.quantize_nvfp4 lays it out, byte for byte: (packed uint8
    (roundup(M,16), roundup(K,16)/2), swizzled E4M3 block scales, fp32 global scale). The global scale
    is the calibrated one (an NVFP4 layer's input_scale, amax/2688) or this call's amax/2688."""
    if global_scale is None:
        global_scale = x.abs().amax().float() / formats.NVFP4_GLOBAL_DIVISOR
    global_scale = global_scale.float().reshape(1).to(x.device).contiguous()
    x = x.contiguous()
    if torch.compiler.is_compiling():
        packed, scales = _quantize_nvfp4_activation_op(x, global_scale)
    else:
        packed, scales = _nvfp4_activation_launch(x, global_scale)
    return packed, scales.view(torch.float8_e4m3fn), global_scale.reshape(())
