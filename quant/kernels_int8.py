"""Triton kernels for INT8 W8A8, exposed as torch custom ops (so torch.compile sees one node each).

- `quantize_int8_rows`: activation quantization to INT8, dynamic per-row
  scales or one calibrated scale; optionally the FFN's tanh GELU first and ComfyUI's ConvRot
  rotation (a block-diagonal Hadamard over groups of 256 input features) before the amax, all in
  one pass over the activation. The rotation is a radix-4 butterfly in fp32 on CUDA cores (four
  sum-and-subtract stages for a group of 256), the values staying in registers.
- `int8_scaled_mm`: y = (a @ b^T, exact int32) * a_scale * b_scale + bias, cast to bf16/fp16/fp32,
  in one kernel (scales, bias and cast in the epilogue). Autotuned tiles per GPU class; on
  Hopper/Blackwell a persistent variant that reads the tiles through TMA descriptors.
- `int8_scaled_mm_int_mm`: the same product through torch._int_mm (cuBLASLt; also on Turing) and
  one fused pass for scales, bias and cast.

Their plain-torch twins are in quant.formats (INT8 section); every kernel runs on the CPU under
TRITON_INTERPRET=1, where the tests compare them.
"""

from __future__ import annotations

import functools

import torch

from . import formats
from .kernels import AVAILABLE, INTERPRET, row_block, row_warps

if AVAILABLE:
    import triton
    import triton.language as tl

    from .kernels import _abs_max_bits, _gelu_tanh, _store_row_scale, _to_output

# Rotation group sizes the quantizer takes (ComfyUI's default is 256).
ROTATE_GROUPS = (256, 1024)

# GEMM tiles (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps) per GPU class. A stage holds
# (BLOCK_M + BLOCK_N) * BLOCK_K bytes (Hopper's pipeline keeps `stages` of them, Ampere's one
# fewer); each list stays within its class's limit: Hopper and datacenter Blackwell 227 KB, A100
# 163 KB, sm_86/89/120 99 KB (bench/bench_int8.py --compile-report checks them, without a GPU).
GEMM_TILES = {
    "hopper": ((128, 256, 128, 3, 8), (128, 256, 128, 4, 8), (256, 128, 128, 3, 8), (256, 128, 128, 4, 8),
               (128, 128, 128, 4, 8), (128, 128, 128, 5, 4), (128, 256, 64, 4, 8), (64, 128, 128, 4, 4)),
    "a100": ((128, 256, 64, 4, 8), (128, 256, 64, 5, 8), (256, 128, 64, 4, 8), (128, 128, 128, 4, 8),
             (128, 128, 64, 5, 4), (64, 128, 128, 4, 4)),
    "small-smem": ((128, 256, 64, 4, 8), (256, 128, 64, 4, 8), (128, 128, 128, 3, 8), (128, 128, 64, 5, 4),
                   (64, 128, 64, 5, 4)),
}
# The persistent kernel also keeps the output tile in shared memory for its TMA store while the
# next tile's loads run: stages * stage bytes + BLOCK_M * BLOCK_N * 2 (bf16) within 227 KB.
PERSISTENT_TILES = ((128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 128, 128, 4, 8), (128, 128, 128, 5, 8),
                    (128, 256, 64, 4, 8), (128, 256, 64, 5, 8))
# Tiles also tried with Triton's warp specialization (producer warps issue the TMA loads).
WARP_SPECIALIZED_TILES = ((128, 256, 128, 3, 8), (128, 128, 128, 4, 8))
# The interpreter's tile: small, so the tests' shapes span several tiles and partial ones.
INTERPRET_TILE = (32, 32, 32, 2)


def gemm_class(device: torch.device | str) -> str:
    """Which GEMM_TILES list a CUDA device takes (from its compute capability); "turing" has none:
    Triton's INT8 MMA needs sm_80 (for sm_75 it does not compile), so Turing multiplies in cuBLASLt."""
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        return "turing"
    if major in (9, 10):
        return "hopper"
    return "a100" if (major, minor) == (8, 0) else "small-smem"


if AVAILABLE:
    @triton.jit
    def _smoothed(v, pre_scale_ptr, cols, K: tl.constexpr, PRE_SCALE: tl.constexpr):
        """v times the layer's smoothing factor per input feature (quant.outliers.pre_quant_scale)."""
        if PRE_SCALE:
            v = v * tl.load(pre_scale_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        return v

    @triton.jit
    def _plain_values(x_row, pre_scale_ptr, start, K: tl.constexpr, GELU: tl.constexpr, PRE_SCALE: tl.constexpr,
                      BLOCK_K: tl.constexpr):
        cols = start + tl.arange(0, BLOCK_K)
        v = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        if GELU:
            v = _gelu_tanh(v)  # gelu(0) = 0: masked lanes stay out of the amax
        return _smoothed(v, pre_scale_ptr, cols, K, PRE_SCALE), cols

    @triton.jit
    def _rotated_values(x_row, pre_scale_ptr, start, K: tl.constexpr, GELU: tl.constexpr, PRE_SCALE: tl.constexpr,
                        GROUP: tl.constexpr, GROUP_SCALE: tl.constexpr, BLOCK_K: tl.constexpr):
        """x[row, start:start + BLOCK_K] @ blockdiag(H, ..., H), as (BLOCK_K / 8, 8) values and their
        output columns. H = H4 (x) ... (x) H4 / sqrt(GROUP) and H4 = (J - 2I) R (J all ones, R the 4 x 4
        reversal), so x H is x (J - 2I) (x) ... (x) (J - 2I), reversed within each group, / sqrt(GROUP):
        along each base-4 digit of the feature index in turn, a value becomes the sum of its 4 values
        minus twice itself (fp32, on CUDA cores: with bf16 input a group of 256 is one warp's 8 values
        x 32 lanes, summed by shuffles); then each 8 values are reversed in registers and written to the
        mirrored 8 columns of their group, so loads and stores stay contiguous."""
        cols = start + tl.arange(0, BLOCK_K)
        v = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)  # K holds whole groups
        if GELU:
            v = _gelu_tanh(v)
        v = _smoothed(v, pre_scale_ptr, cols, K, PRE_SCALE)  # smoothing, then the rotation, as the weight was
        if GROUP == 256:
            v = tl.reshape(v, (BLOCK_K // GROUP, 4, 4, 4, 4))
        else:
            v = tl.reshape(v, (BLOCK_K // GROUP, 4, 4, 4, 4, 4))
        for digit in tl.static_range(1, len(v.shape)):
            v = tl.sum(v, axis=digit, keep_dims=True) - 2.0 * v
        v = tl.reshape(v, (BLOCK_K // 8, 2, 2, 2))
        for bit in tl.static_range(3):  # swap along the last axis, then rotate the next bit's axis last
            low, high = tl.split(v)
            v = tl.permute(tl.join(high, low), (0, 3, 1, 2))
        eights = start // 8 + tl.arange(0, BLOCK_K // 8)  # start: a multiple of GROUP
        mirrored = eights ^ (GROUP // 8 - 1)
        return tl.reshape(v, (BLOCK_K // 8, 8)) * GROUP_SCALE, mirrored[:, None] * 8 + tl.arange(0, 8)[None, :]

    @triton.jit
    def _quantizer_values(x_row, pre_scale_ptr, start, K: tl.constexpr, GELU: tl.constexpr, PRE_SCALE: tl.constexpr,
                          ROTATE_GROUP: tl.constexpr, ROTATE_SCALE: tl.constexpr, BLOCK_K: tl.constexpr):
        if ROTATE_GROUP == 0:
            v, cols = _plain_values(x_row, pre_scale_ptr, start, K, GELU, PRE_SCALE, BLOCK_K)
        else:
            v, cols = _rotated_values(x_row, pre_scale_ptr, start, K, GELU, PRE_SCALE, ROTATE_GROUP, ROTATE_SCALE,
                                      BLOCK_K)
        return v, cols

    _INT8_MAX = tl.constexpr(formats.INT8_MAX)
    _INT8_SCALE_FLOOR = tl.constexpr(formats.INT8_SCALE_FLOOR)

    @triton.jit
    def _int8_row_scale(amax_bits, row_ptr):
        """Stores the row's decode scale max(amax/127, INT8_SCALE_FLOOR) (NaN stays NaN); returns its
        reciprocal."""
        scale = tl.math.div_rn(amax_bits.to(tl.float32, bitcast=True), _INT8_MAX)
        return _store_row_scale(tl.where(scale < _INT8_SCALE_FLOOR, _INT8_SCALE_FLOOR, scale), row_ptr)

    @triton.jit
    def _round_to_int8(q):
        """Round half to even into [-127, 127]; NaN (a row whose scale is NaN) -> 0."""
        q = tl.where(q == q, q, 0.0)
        q = tl.minimum(tl.maximum(q, -_INT8_MAX), _INT8_MAX)
        return ((q + 12582912.0) - 12582912.0).to(tl.int8)  # + 1.5 * 2^23 leaves no fraction bits

    @triton.jit
    def _quantize_int8_kernel(x_ptr, pre_scale_ptr, out_ptr, scale_ptr, stride_x, stride_out,
                              K: tl.constexpr, GELU: tl.constexpr, PRE_SCALE: tl.constexpr,
                              ROTATE_GROUP: tl.constexpr, ROTATE_SCALE: tl.constexpr, BLOCK_K: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        out_row = out_ptr + row * stride_out
        if K <= BLOCK_K:  # the whole row in registers: one read from memory
            v, cols = _quantizer_values(x_row, pre_scale_ptr, 0, K, GELU, PRE_SCALE, ROTATE_GROUP, ROTATE_SCALE, BLOCK_K)
            inverse = _int8_row_scale(_abs_max_bits(v), scale_ptr + row)
            tl.store(out_row + cols, _round_to_int8(v * inverse), mask=cols < K)
        else:  # long rows: amax pass, then quantize pass (the re-read mostly hits L2)
            amax_bits = 0
            for start in range(0, K, BLOCK_K):
                v, cols = _quantizer_values(x_row, pre_scale_ptr, start, K, GELU, PRE_SCALE, ROTATE_GROUP, ROTATE_SCALE,
                                             BLOCK_K)
                amax_bits = tl.maximum(amax_bits, _abs_max_bits(v))
            inverse = _int8_row_scale(amax_bits, scale_ptr + row)
            for start in range(0, K, BLOCK_K):
                v, cols = _quantizer_values(x_row, pre_scale_ptr, start, K, GELU, PRE_SCALE, ROTATE_GROUP, ROTATE_SCALE,
                                             BLOCK_K)
                tl.store(out_row + cols, _round_to_int8(v * inverse), mask=cols < K)

    @triton.jit
    def _tile_position(tile, tiles_m, tiles_n, GROUP_M: tl.constexpr):
        """(row, column) of a tile in bands of GROUP_M tile rows, column by column inside a band:
        tiles that run together share their A rows and B columns in L2."""
        tiles_per_band = GROUP_M * tiles_n
        first_m = (tile // tiles_per_band) * GROUP_M
        band_rows = tl.minimum(tiles_m - first_m, GROUP_M)
        return first_m + (tile % tiles_per_band) % band_rows, (tile % tiles_per_band) // band_rows

    @triton.jit
    def _scaled_output(acc, offs_m, offs_n, M, N, a_scale_ptr, b_scale_ptr, bias_ptr,
                       B_SCALE_PER_N: tl.constexpr, HAS_BIAS: tl.constexpr):
        """fp32 (acc * a_scale) * b_scale + bias, in the reference's order."""
        y = acc.to(tl.float32) * tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
        if B_SCALE_PER_N:
            y = y * tl.load(b_scale_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
        else:
            y = y * tl.load(b_scale_ptr)
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        return y

    @triton.jit
    def _int8_mm_kernel(a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K, M_BUCKET,
                        B_SCALE_PER_N: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        pid_m, pid_n = _tile_position(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # Rows past M (columns past N) re-read the last one instead of masking every load; their
        # results are not stored.
        a_ptrs = a_ptr + tl.minimum(offs_m, M - 1).to(tl.int64)[:, None] * K + offs_k[None, :]
        b_ptrs = b_ptr + tl.minimum(offs_n, N - 1).to(tl.int64)[None, :] * K + offs_k[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k in range(tl.cdiv(K, BLOCK_K)):
            in_k = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=in_k[None, :], other=0)
            acc = tl.dot(a, tl.load(b_ptrs, mask=in_k[:, None], other=0), acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        y = _scaled_output(acc, offs_m, offs_n, M, N, a_scale_ptr, b_scale_ptr, bias_ptr, B_SCALE_PER_N, HAS_BIAS)
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(c_ptrs, _to_output(y, c_ptr.dtype.element_ty, INTERPRET),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    @triton.jit
    def _int8_mm_persistent_kernel(a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K, M_BUCKET,
                                   B_SCALE_PER_N: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                   GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
        """One program per SM walks the output tiles; A and B tiles arrive by TMA (out-of-range rows
        and K are zero-filled), the output leaves by a TMA store (clipped at M and N). The tile and
        K loops are flattened into one pipelined loop, unless warp-specialized."""
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
        c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, NUM_SMS, flatten=not WARP_SPECIALIZE,
                             warp_specialize=WARP_SPECIALIZE):
            pid_m, pid_n = _tile_position(tile, tiles_m, tiles_n, GROUP_M)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            for k in range(k_tiles):
                a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
                b = b_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
                acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            y = _scaled_output(acc, offs_m, offs_n, M, N, a_scale_ptr, b_scale_ptr, bias_ptr, B_SCALE_PER_N, HAS_BIAS)
            c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], _to_output(y, c_ptr.dtype.element_ty, INTERPRET))

    @triton.jit
    def _scale_int32_kernel(acc_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, stride_acc,
                            B_SCALE_PER_N: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        rows = offs_m.to(tl.int64)[:, None]
        acc = tl.load(acc_ptr + rows * stride_acc + offs_n[None, :], mask=mask, other=0)
        y = _scaled_output(acc, offs_m, offs_n, M, N, a_scale_ptr, b_scale_ptr, bias_ptr, B_SCALE_PER_N, HAS_BIAS)
        tl.store(c_ptr + rows * N + offs_n[None, :], _to_output(y, c_ptr.dtype.element_ty, INTERPRET), mask=mask)


def _identity(kernel):
    return kernel


def _check_rotation(cols: int, group: int) -> None:
    if group not in ROTATE_GROUPS or cols % group:
        raise ValueError(f"rotation groups of {group} over {cols} features: the group must be one of "
                         f"{ROTATE_GROUPS} and divide the features")


def _quantize_int8_launch(x: torch.Tensor, gelu: bool, rotate_groupsize: int, pre_quant_scale: torch.Tensor | None = None,
                          wrap=_identity, block_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`block_k`: features read at a time (default: kernels.row_block, the whole row up to 16,384
    features, rotated rows too: their rotation is then computed once, not twice); the benchmark and
    the tests force chunks."""
    rows, cols = x.shape
    if rotate_groupsize:
        _check_rotation(cols, rotate_groupsize)
    if pre_quant_scale is not None and pre_quant_scale.numel() != cols:
        raise ValueError(f"pre_quant_scale has {pre_quant_scale.numel()} values for rows of {cols} features")
    out = torch.empty((rows, cols), dtype=torch.int8, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows == 0:
        return out, scale
    block_k = block_k or row_block(cols)
    wrap(_quantize_int8_kernel)[(rows,)](
        x, x if pre_quant_scale is None else pre_quant_scale, out, scale, x.stride(0), out.stride(0), K=cols, GELU=gelu,
        PRE_SCALE=pre_quant_scale is not None,
        ROTATE_GROUP=rotate_groupsize, ROTATE_SCALE=rotate_groupsize ** -0.5 if rotate_groupsize else 1.0,
        BLOCK_K=block_k, num_warps=row_warps(block_k))
    return out, scale


def _m_bucket(m):
    """The token count's power-of-two class (the autotuning key): a new video length reuses the tiles
    tuned for its class. Under torch.compile with dynamic shapes m is symbolic and Inductor tunes the
    kernel itself, so it is passed through."""
    return min(triton.next_power_of_2(m), 1 << 16) if isinstance(m, int) else m


@functools.cache
def _autotuned_gemm(persistent: bool, gpu_class: str):
    def configs(tiles, **extra):
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, **extra},
                              num_stages=stages, num_warps=warps) for bm, bn, bk, stages, warps in tiles]
    if persistent:
        return triton.autotune(configs=configs(PERSISTENT_TILES, WARP_SPECIALIZE=False)
                               + configs(WARP_SPECIALIZED_TILES, WARP_SPECIALIZE=True),
                               key=["M_BUCKET", "N", "K"])(_int8_mm_persistent_kernel)
    return triton.autotune(configs=configs(GEMM_TILES[gpu_class]), key=["M_BUCKET", "N", "K"])(_int8_mm_kernel)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tma_allocator(size: int, alignment: int, stream) -> torch.Tensor:
    """Global scratch for the descriptors a kernel builds on the device (Triton asks for it)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def default_persistent(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether int8_scaled_mm takes the persistent TMA kernel: Hopper/datacenter Blackwell, with
    operands TMA can address (16-byte aligned starts and row strides)."""
    aligned = a.storage_offset() % 16 == 0 and b.storage_offset() % 16 == 0 \
        and b.shape[0] * out_dtype.itemsize % 16 == 0
    return a.is_cuda and aligned and gemm_class(a.device) == "hopper"


def _int8_mm_launch(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype, persistent: bool, wrap=_identity,
                    tile: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """`tile` (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M) fixes the tile instead of autotuning (the
    interpreter always uses one: INTERPRET_TILE unless given)."""
    m, k = a.shape
    n = b.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0:
        return out
    b_scale = b_scale.reshape(-1)
    args = (a, b, out, a_scale, b_scale, a_scale if bias is None else bias, m, n, k, _m_bucket(m))
    flags = {"B_SCALE_PER_N": b_scale.numel() != 1, "HAS_BIAS": bias is not None, "INTERPRET": INTERPRET}
    if persistent:
        sms = 3 if INTERPRET else _sm_count(a.device)  # the interpreter: several tiles per program
        flags["NUM_SMS"] = sms
        if not INTERPRET:
            triton.set_allocator(_tma_allocator)

        def grid(meta):
            return (min(sms, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])),)
    else:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    kernel = _int8_mm_persistent_kernel if persistent else _int8_mm_kernel
    if tile is None and INTERPRET:
        tile = INTERPRET_TILE
    if tile is None:
        wrap(_autotuned_gemm(persistent, gemm_class(a.device)))[grid](*args, **flags)
    else:
        block_m, block_n, block_k, group_m = tile
        if persistent:
            flags["WARP_SPECIALIZE"] = False
        wrap(kernel)[grid](*args, **flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
                           num_warps=8 if block_m * block_n >= 128 * 256 else 4)
    return out


def _scale_int32_launch(acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor, bias: torch.Tensor | None,
                        out_dtype: torch.dtype) -> torch.Tensor:
    m, n = acc.shape
    out = torch.empty((m, n), dtype=out_dtype, device=acc.device)
    if m == 0:
        return out
    b_scale = b_scale.reshape(-1)
    block_m, block_n = 16, 256
    _scale_int32_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        acc, out, a_scale, b_scale, a_scale if bias is None else bias, m, n, acc.stride(0),
        B_SCALE_PER_N=b_scale.numel() != 1, HAS_BIAS=bias is not None, INTERPRET=INTERPRET,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return out


def _checked_operands(a, b, a_scale, b_scale):
    """The GEMM's operands as the kernels read them: int8 row-major a (M, K) and b (N, K) with K a
    multiple of 16, fp32 scales of M and of 1 or N values."""
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"int8 (M, K) and (N, K) operands expected, got {a.dtype} {tuple(a.shape)} and "
                         f"{b.dtype} {tuple(b.shape)}")
    if a.shape[1] % 16:
        raise ValueError(f"K = {a.shape[1]} is not a multiple of 16")
    if a_scale.numel() != a.shape[0] or b_scale.numel() not in (1, b.shape[0]):
        raise ValueError(f"scales of {a_scale.numel()} and {b_scale.numel()} values for a {a.shape[0]} x "
                         f"{b.shape[0]} product")
    return a.contiguous(), b.contiguous(), a_scale.float().contiguous(), b_scale.float().contiguous()


# Custom ops: torch.compile sees each kernel as one node and Inductor launches it from its generated
# code; eager callers launch directly (see quant.kernels).

@torch.library.triton_op("ltx2_quant::quantize_int8_rows", mutates_args=())
def _quantize_int8_rows_op(x: torch.Tensor, gelu: bool, rotate_groupsize: int, pre_quant_scale: torch.Tensor | None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    return _quantize_int8_launch(x, gelu, rotate_groupsize, pre_quant_scale, wrap=torch.library.wrap_triton)


@torch.library.triton_op("ltx2_quant::int8_scaled_mm", mutates_args=())
def _int8_scaled_mm_op(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                       bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    return _int8_mm_launch(a, b, a_scale, b_scale, bias, out_dtype, default_persistent(a, b, out_dtype),
                           wrap=torch.library.wrap_triton)


def quantize_int8_rows(x: torch.Tensor, gelu: bool = False, rotate_groupsize: int = 0,
                       pre_quant_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) bf16/fp16/fp32 -> (int8 (M, K), fp32 (M, 1) decode scales), per row amax/127; with
    `gelu` of gelu_tanh(x) (in fp32), with `rotate_groupsize` (256 or 1024) of x rotated by ConvRot
    (after the GELU), with `pre_quant_scale` (K,) of x times a smoothing factor per feature (after the
    GELU, before the rotation), all in one pass. Under torch.compile the plain case is traced as the
    reference formula, so Inductor fuses it into the op that produced x; the others run the kernel."""
    if torch.compiler.is_compiling():
        if gelu or rotate_groupsize or pre_quant_scale is not None:
            return _quantize_int8_rows_op(x.contiguous(), gelu, rotate_groupsize,
                                          None if pre_quant_scale is None else pre_quant_scale.contiguous())
        return formats.quantize_int8_rowwise_dynamic(x)
    return _quantize_int8_launch(x.contiguous(), gelu, rotate_groupsize,
                                 None if pre_quant_scale is None else pre_quant_scale.contiguous())


def int8_scaled_mm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                   bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(a @ b^T, exact int32) * a_scale * b_scale + bias -> out_dtype (M, N), one Triton kernel (sm_80+;
    on Turing int8_scaled_mm_int_mm). a: int8 (M, K) activations, b: int8 (N, K) weight as stored, K a
    multiple of 16; a_scale fp32 (M, 1); b_scale fp32 (N,), (1, N) or one value; bias (N,) of any float
    dtype or None."""
    a, b, a_scale, b_scale = _checked_operands(a, b, a_scale, b_scale)
    if a.is_cuda and gemm_class(a.device) == "turing":
        return _int_mm_scaled(a, b, a_scale, b_scale, bias, out_dtype)
    if torch.compiler.is_compiling():
        return _int8_scaled_mm_op(a, b, a_scale, b_scale, bias, out_dtype)
    return _int8_mm_launch(a, b, a_scale, b_scale, bias, out_dtype, default_persistent(a, b, out_dtype))


def int8_scaled_mm_int_mm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                          bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """int8_scaled_mm through torch._int_mm (cuBLASLt INT8, int32 out; runs on Turing too) plus one
    Triton pass for the scales, bias and cast; under torch.compile Inductor fuses that pass from the
    plain formula. cuBLASLt takes only more than 16 rows: fewer are zero-padded."""
    return _int_mm_scaled(*_checked_operands(a, b, a_scale, b_scale), bias, out_dtype)


def _int_mm_scaled(a, b, a_scale, b_scale, bias, out_dtype):
    m = a.shape[0]
    if m == 0:
        return torch.empty((0, b.shape[0]), dtype=out_dtype, device=a.device)
    padded = a if m > 16 else torch.nn.functional.pad(a, (0, 0, 0, 17 - m))
    acc = torch._int_mm(padded, b.t())[:m]
    if torch.compiler.is_compiling():
        y = acc.float() * a_scale.reshape(-1, 1) * b_scale.reshape(1, -1)
        return (y if bias is None else y + bias.float()).to(out_dtype)
    return _scale_int32_launch(acc, a_scale, b_scale, bias, out_dtype)
