"""Bit-level number formats: FP8 E4M3, MXFP8 and NVFP4, plus the cuBLAS block-scale swizzle.

Pure torch, CPU or GPU. Every quantizer here writes the same bytes as comfy-kitchen's eager
backend (the reference ComfyUI itself uses), which the tests check byte for byte. Where
comfy-kitchen's behaviour on NaN/Inf is an accident of its arithmetic, the accident is
reproduced on purpose and said so; weights with NaN/Inf are rejected earlier, by the checkpoint
quantizer, so these paths only matter for byte-compatibility.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
E2M1_MAX = 6.0
NVFP4_BLOCK = 16
MXFP8_BLOCK = 32
NVFP4_GLOBAL_DIVISOR = FP8_MAX * E2M1_MAX  # 2688: NVFP4 decode global scale = amax / 2688
E8M0_BIAS = 127
# cuBLAS "128x4" scale tiles: 128 rows x 4 scale columns form one 512-byte tile.
SWIZZLE_ROWS = 128
SWIZZLE_COLS = 4

# E2M1 code -> value; codes 8..15 are the negatives (8 = -0).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


# ---------------------------------------------------------------------------------------------
# FP8 E4M3
# ---------------------------------------------------------------------------------------------

def cast_to_fp8(x: torch.Tensor) -> torch.Tensor:
    """Saturating round-to-nearest-even cast to E4M3. Clamping first matters: CUDA eager casts
    480 to NaN while CPU and Triton saturate. clamp keeps NaN, so NaN propagates."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fp8_scale(x: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """fp32 decode scale amax/448, per tensor (0-d) or per output row (rows, 1).
    An all-zero tensor or row gets scale 1.0, so quantizing it never divides by zero."""
    if per_channel:
        amax = x.abs().amax(dim=1, keepdim=True).float()
    else:
        amax = x.abs().amax().float()
    scale = amax / FP8_MAX
    return torch.where(amax == 0, torch.ones_like(scale), scale)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E4M3 data for x with the given decode scale (scalar, (rows,1) or broadcastable).

    Same arithmetic as comfy-kitchen's quantize_per_tensor_fp8 (and so ComfyUI): the reciprocal
    is taken in fp32, rounded to x's dtype, and multiplied in x's dtype before the cast."""
    scaled = x * (1.0 / scale.float()).to(x.dtype)
    return cast_to_fp8(scaled)


def _stochastic_round(magnitude: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                      generator: torch.Generator) -> torch.Tensor:
    """Pick `upper` with probability (magnitude - lower) / (upper - lower), else `lower`."""
    gap = upper - lower
    p = torch.where(gap > 0, (magnitude - lower) / torch.where(gap > 0, gap, torch.ones_like(gap)), torch.zeros_like(gap))
    u = torch.rand(magnitude.shape, generator=generator, device=generator.device)
    return torch.where(u.to(magnitude.device) < p, upper, lower)


def stochastic_round_fp8(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """E4M3 with stochastic rounding (unbiased: E[result] = x inside the range), saturating at 448.
    Used when merging LoRA deltas smaller than one E4M3 step, which nearest rounding would erase."""
    x = x.float()
    magnitude = x.abs().clamp(max=FP8_MAX)
    exponent = torch.floor(torch.log2(magnitude.clamp(min=2.0 ** -9))).clamp(min=-6)
    step = torch.exp2(exponent - 3)
    lower = torch.floor(magnitude / step) * step
    rounded = _stochastic_round(magnitude, lower, (lower + step).clamp(max=FP8_MAX), generator)
    return cast_to_fp8(torch.where(x < 0, -rounded, rounded))


_E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def stochastic_round_e2m1(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """E2M1 codes with stochastic rounding between the two neighbouring values, saturating at 6."""
    x = x.float()
    grid = _E2M1_GRID.to(x.device)
    magnitude = x.abs().clamp(max=E2M1_MAX)
    index = (torch.bucketize(magnitude, grid, right=True) - 1).clamp(0, 6)
    rounded = _stochastic_round(magnitude, grid[index], grid[index + 1], generator)
    return e2m1_encode(torch.where(x < 0, -rounded, rounded))


def dequantize_fp8(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """E4M3 times its fp32 scale, computed in fp32 and rounded once to `dtype`."""
    return (data.float() * scale.float()).to(dtype)


def quantize_fp8_rowwise_dynamic(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token (per-row) activation quantization: returns (e4m3 data, fp32 (rows,1) scale).
    Computed in fp32 as x * (1/scale), the reciprocal taken once per row: the reference the GPU
    kernels reproduce bit for bit (a multiply per element instead of a division)."""
    x32 = x.float()
    scale = fp8_scale(x32, per_channel=True)
    return cast_to_fp8(x32 * (1.0 / scale)), scale


def quantize_fp8_static(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """Static activation quantization with a calibrated scalar scale: clamp before the cast
    (unclamped casts are what turned whole frames black in the reference pipeline)."""
    return cast_to_fp8(x.float() * (1.0 / input_scale.float()))


# ---------------------------------------------------------------------------------------------
# The cuBLAS 128x4 block-scale swizzle
# ---------------------------------------------------------------------------------------------

def swizzled_shape(rows: int, cols: int) -> tuple[int, int]:
    return round_up(rows, SWIZZLE_ROWS), round_up(cols, SWIZZLE_COLS)


def swizzle_offset(row: int, col: int, cols: int) -> int:
    """Closed-form byte offset of scale (row, col) in the swizzled buffer (cols = unpadded count).
    The tests hold swizzle_scales to this formula."""
    padded_cols = round_up(cols, SWIZZLE_COLS)
    tile = (row // 128) * (padded_cols // 4) + col // 4
    return tile * 512 + (row % 32) * 16 + ((row % 128) // 32) * 4 + (col % 4)


def swizzle_scales(scales: torch.Tensor) -> torch.Tensor:
    """(rows, cols) scale matrix -> zero-padded (roundup(rows,128), roundup(cols,4)) swizzled matrix,
    the layout ComfyUI files and Blackwell block-scaled GEMMs use. dtype is preserved (uint8/e4m3)."""
    rows, cols = scales.shape
    padded_rows, padded_cols = swizzled_shape(rows, cols)
    raw = scales.view(torch.uint8)
    padded = torch.zeros((padded_rows, padded_cols), dtype=torch.uint8, device=scales.device)
    padded[:rows, :cols] = raw
    tiles = padded.view(padded_rows // 128, 128, padded_cols // 4, 4).permute(0, 2, 1, 3)
    # Within a tile, row r = 32*i + j lands at j*16 + i*4: split 128 into (4, 32) and swap.
    tiles = tiles.reshape(-1, 4, 32, 4).transpose(1, 2)
    return tiles.reshape(padded_rows, padded_cols).view(scales.dtype)


def unswizzle_scales(swizzled: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of swizzle_scales, cropped to (rows, cols)."""
    padded_rows, padded_cols = swizzled_shape(rows, cols)
    if swizzled.numel() != padded_rows * padded_cols:
        raise ValueError(
            f"swizzled scales hold {swizzled.numel()} entries, expected {padded_rows}x{padded_cols} "
            f"for a {rows}x{cols} scale matrix"
        )
    raw = swizzled.contiguous().view(torch.uint8).reshape(-1, 32, 4, 4).transpose(1, 2)
    raw = raw.reshape(padded_rows // 128, padded_cols // 4, 128, 4).permute(0, 2, 1, 3)
    return raw.reshape(padded_rows, padded_cols)[:rows, :cols].view(swizzled.dtype)


# ---------------------------------------------------------------------------------------------
# MXFP8: E4M3 elements, one E8M0 (power of two) scale per 32 elements along K
# ---------------------------------------------------------------------------------------------

def e8m0_to_float(scale_bytes: torch.Tensor) -> torch.Tensor:
    """Decode E8M0 bytes exactly: 2^(e-127); byte 0 is 2^-127 (an fp32 subnormal); 0xFF is NaN."""
    exponent = scale_bytes.view(torch.uint8).to(torch.int32)
    values = torch.exp2((exponent - E8M0_BIAS).float())
    return torch.where(exponent == 0xFF, torch.full_like(values, float("nan")), values)


def mxfp8_scale_bytes(block_amax: torch.Tensor) -> torch.Tensor:
    """E8M0 scale byte per block with the RCEIL rule of cuBLAS, TransformerEngine and comfy-kitchen:
    2^ceil(log2(amax/448)), exponent clamped to [0, 254]. Zero and non-finite blocks get byte 0
    (comfy-kitchen reaches 0 for NaN/Inf through an int cast of NaN; here it is explicit)."""
    needed = (block_amax.float() / FP8_MAX).clamp(min=2.0 ** -127)
    exponent = torch.ceil(torch.log2(needed))
    finite = torch.isfinite(exponent) & (block_amax != 0)
    exponent = torch.where(finite, exponent, torch.full_like(exponent, -E8M0_BIAS))
    return (exponent.to(torch.int32) + E8M0_BIAS).clamp(0, 254).to(torch.uint8)


def quantize_mxfp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, K) -> (e4m3 data zero-padded to multiples of 32, swizzled uint8 E8M0 scales)."""
    data, scale_bytes = quantize_mxfp8_rows(w)
    return data, swizzle_scales(scale_bytes)


def quantize_mxfp8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP8 of w with the scales not yet swizzled: (padded e4m3 data, (rows, K/32) uint8).
    Rows are independent, so a large weight can be quantized in row chunks.

    Byte-identical to comfy-kitchen quantize_mxfp8(pad_32x=True): a zero block stores byte 0 and
    zero data; the element divisor decodes byte 0 as 0 like comfy-kitchen, so a NaN/Inf block
    yields NaN/saturated data rather than a silent finite value."""
    if w.dim() != 2:
        raise ValueError(f"MXFP8 needs a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    padded_rows, padded_cols = round_up(rows, MXFP8_BLOCK), round_up(cols, MXFP8_BLOCK)
    if (padded_rows, padded_cols) != (rows, cols):
        w = torch.nn.functional.pad(w, (0, padded_cols - cols, 0, padded_rows - rows))
    blocks = w.reshape(padded_rows, padded_cols // MXFP8_BLOCK, MXFP8_BLOCK)
    amax = blocks.abs().amax(dim=-1)
    scale_bytes = mxfp8_scale_bytes(amax)
    divisor = e8m0_to_float(scale_bytes) * (scale_bytes != 0)
    zero_block = (amax == 0).unsqueeze(-1)
    divisor = torch.where(amax == 0, torch.ones_like(divisor), divisor)
    scaled = blocks.float() / divisor.unsqueeze(-1)
    scaled = torch.where(zero_block, torch.zeros_like(scaled), scaled)
    data = cast_to_fp8(scaled).reshape(padded_rows, padded_cols)
    return data, scale_bytes


def dequantize_mxfp8(data: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int],
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows, cols = data.shape
    scale_bytes = unswizzle_scales(scales, rows, cols // MXFP8_BLOCK)
    blocks = data.float().reshape(rows, cols // MXFP8_BLOCK, MXFP8_BLOCK)
    values = (blocks * e8m0_to_float(scale_bytes).unsqueeze(-1)).reshape(rows, cols)
    return values[: shape[0], : shape[1]].to(dtype)


# ---------------------------------------------------------------------------------------------
# NVFP4: E2M1 elements in nibbles, E4M3 scale per 16 elements, fp32 global decode scale
# ---------------------------------------------------------------------------------------------

def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> E2M1 codes (uint8, 0..15), round to nearest even, saturating at 6.

    Uses the fp32 bit-manipulation rounding of torchao/comfy-kitchen (so even NaN maps to the same
    code they produce): normals get the mantissa rounding bias added to their bits; values below
    the smallest normal (1.0) are rounded by adding a magic denormal constant in float."""
    bits = x.float().contiguous().view(torch.int32)
    sign = bits & -0x80000000  # 0x80000000 as a signed int32
    magnitude = (bits ^ sign).view(torch.float32)
    saturate = magnitude >= E2M1_MAX
    denormal = ~saturate & (magnitude < 1.0)
    # Denormals: adding the float with exponent field 149 (= 2^22) puts the 0.5 step at bit 0.
    denorm_magic_bits = ((127 - 1) + (23 - 1) + 1) << 23
    denorm_magic = torch.tensor(denorm_magic_bits, dtype=torch.int32).view(torch.float32)
    denormal_code = ((magnitude + denorm_magic).view(torch.int32) - denorm_magic_bits).to(torch.uint8)
    # Normals: rebias the exponent (1 - 127), round half to even on the 1 kept mantissa bit.
    normal_bits = magnitude.view(torch.int32)
    mantissa_odd = (normal_bits >> 22) & 1
    normal_bits = normal_bits + (((1 - 127) << 23) + (1 << 21) - 1) + mantissa_odd
    normal_code = (normal_bits >> 22).to(torch.uint8)
    code = torch.where(denormal, denormal_code, normal_code)
    code = torch.where(saturate, torch.full_like(code, 7), code)
    return code | (sign >> 28).to(torch.uint8) & 0x8


def e2m1_decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    table = torch.tensor(E2M1_VALUES, dtype=dtype, device=codes.device)
    return table[codes.long()]


def pack_nibbles(codes: torch.Tensor, high_first: bool = True) -> torch.Tensor:
    """Pack pairs of 4-bit codes along the last dim; ComfyUI/Lightricks put element 2j in the high nibble."""
    even, odd = codes[..., 0::2], codes[..., 1::2]
    if high_first:
        return (even << 4) | odd
    return (odd << 4) | even


def unpack_nibbles(packed: torch.Tensor, high_first: bool = True) -> torch.Tensor:
    high, low = packed >> 4, packed & 0xF
    pair = (high, low) if high_first else (low, high)
    return torch.stack(pair, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def nvfp4_global_scale(w: torch.Tensor) -> torch.Tensor:
    """fp32 decode global scale amax/2688 (ModelOpt, LTX-2 and ComfyUI store the decode scale)."""
    return w.abs().amax().float() / NVFP4_GLOBAL_DIVISOR


def quantize_nvfp4(w: torch.Tensor, global_scale: torch.Tensor | None = None, search_scales: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, K) -> (packed uint8 (roundup(rows,16), roundup(K,16)/2), swizzled e4m3 block scales,
    fp32 global scale). Byte-identical to comfy-kitchen quantize_nvfp4(pad_16x=True, hi_first=True)
    unless `search_scales` (see quantize_nvfp4_rows)."""
    if global_scale is None:
        global_scale = nvfp4_global_scale(w)
    packed, block_scales = quantize_nvfp4_rows(w, global_scale, search_scales)
    return packed, swizzle_scales(block_scales), global_scale.float()


# Block-scale search window, in E4M3 codes around the amax/6 scale: measured on Gaussian 4096x4096
# weights, codes -2..+6 give 0.0812 relative error vs 0.0951 for amax/6 alone (wider windows: no gain).
# Below amax/6 the block's largest element clips to 6 but the rest land on a finer grid; above,
# fewer elements round down to 0.
NVFP4_SEARCH_CODES = range(-2, 7)


def _nvfp4_codes(blocks: torch.Tensor, total_scale: torch.Tensor) -> torch.Tensor:
    """E2M1 codes of fp32 blocks (rows, nblocks, 16) under per-block decode scales (rows, nblocks)."""
    zero_block = total_scale == 0
    divisor = torch.where(zero_block, torch.ones_like(total_scale), total_scale)
    scaled = blocks.float() / divisor.unsqueeze(-1)
    scaled = torch.where(zero_block.unsqueeze(-1), torch.zeros_like(scaled), scaled)
    return e2m1_encode(scaled.clamp(-E2M1_MAX, E2M1_MAX))


def _e2m1_round(y: torch.Tensor) -> torch.Tensor:
    """y rounded to the nearest E2M1 value (ties to even, saturating at 6): decode(encode(y)) in a
    third of the time, for the scale search's inner loop."""
    magnitude = y.abs().clamp(max=E2M1_MAX)
    rounded = torch.where(magnitude < 2, torch.round(magnitude * 2) * 0.5,
                          torch.where(magnitude < 4, torch.round(magnitude), torch.round(magnitude * 0.5) * 2))
    return rounded.copysign(y)


def _search_block_scales(blocks: torch.Tensor, global_scale: torch.Tensor, block_scale_fp8: torch.Tensor,
                         importance: torch.Tensor | None = None) -> torch.Tensor:
    """Per block, the E4M3 scale near amax/6 whose decoded block is closest to the weights (least
    squared error, each element's error times its column's `importance` where given). Any E4M3 scale
    is valid NVFP4, so every reader decodes it unchanged."""
    base = block_scale_fp8.view(torch.uint8).to(torch.int32)
    best_code, best_err = base, None
    for step in NVFP4_SEARCH_CODES:
        code = (base + step).clamp(0, 0x7E) if step else base  # 0x7E = 448; 0x7F is NaN
        total = (code.to(torch.uint8).view(FP8_DTYPE).float() * global_scale).unsqueeze(-1)
        divisor = torch.where(total == 0, torch.ones_like(total), total)
        err = (_e2m1_round(blocks / divisor) * total - blocks).square()
        err = (err if importance is None else err * importance).sum(-1)
        if best_err is None:
            best_code, best_err = code, err
        else:
            better = err < best_err  # NaN never wins: such a block keeps amax/6
            best_code = torch.where(better, code, best_code)
            best_err = torch.where(better, err, best_err)
    return best_code.to(torch.uint8).view(FP8_DTYPE)


def nvfp4_block_scales(blocks: torch.Tensor, global_scale: torch.Tensor, search_scales: bool = False,
                       importance: torch.Tensor | None = None) -> torch.Tensor:
    """E4M3 block scales (rows, nblocks) of blocks (rows, nblocks, 16) under an fp32 global scale:
    amax/6 rounded to E4M3 (comfy-kitchen's, byte for byte), or with `search_scales` the least-squares
    E4M3 scale near it (weights: 15% less error, same format), the error weighted per column by
    `importance` (broadcast against the blocks) where given. An all-zero tensor has global scale 0: its
    block scales become 0/0 = NaN in the formula, so they are forced to zero (decode 0 * anything = 0)."""
    global_scale = global_scale.float()
    block_amax = blocks.abs().amax(dim=-1).float()
    block_scale = (block_amax / E2M1_MAX / global_scale).clamp(max=FP8_MAX)
    block_scale = torch.where(global_scale == 0, torch.zeros_like(block_scale), block_scale)
    block_scale_fp8 = block_scale.to(FP8_DTYPE)
    if search_scales:
        block_scale_fp8 = _search_block_scales(blocks.float(), global_scale, block_scale_fp8, importance)
    return block_scale_fp8


def quantize_nvfp4_rows(w: torch.Tensor, global_scale: torch.Tensor, search_scales: bool = False,
                        importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 of w with a given global scale and the block scales not yet swizzled:
    (packed uint8, (rows, K/16) e4m3), the block scales as nvfp4_block_scales chooses them
    (`importance`: one weight per input column, K values). Rows are independent given the global
    scale. Zero blocks get zero data, not 0/0."""
    if w.dim() != 2:
        raise ValueError(f"NVFP4 needs a 2-D weight, got shape {tuple(w.shape)}")
    global_scale = global_scale.float()
    rows, cols = w.shape
    padded_rows, padded_cols = round_up(rows, NVFP4_BLOCK), round_up(cols, NVFP4_BLOCK)
    if (padded_rows, padded_cols) != (rows, cols):
        w = torch.nn.functional.pad(w, (0, padded_cols - cols, 0, padded_rows - rows))
    blocks = w.reshape(padded_rows, padded_cols // NVFP4_BLOCK, NVFP4_BLOCK)
    if importance is not None:
        importance = torch.nn.functional.pad(importance.float().to(w.device), (0, padded_cols - cols))
        importance = importance.reshape(padded_cols // NVFP4_BLOCK, NVFP4_BLOCK)
    block_scale_fp8 = nvfp4_block_scales(blocks, global_scale, search_scales, importance)
    codes = _nvfp4_codes(blocks, global_scale * block_scale_fp8.float())
    return pack_nibbles(codes.reshape(padded_rows, padded_cols)), block_scale_fp8


def dequantize_nvfp4(packed: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
                     shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows, packed_cols = packed.shape
    cols = packed_cols * 2
    values = e2m1_decode(unpack_nibbles(packed)).reshape(rows, cols // NVFP4_BLOCK, NVFP4_BLOCK)
    scales = unswizzle_scales(block_scales.view(FP8_DTYPE), rows, cols // NVFP4_BLOCK).float()
    values = values * (scales * global_scale.float()).unsqueeze(-1)
    return values.reshape(rows, cols)[: shape[0], : shape[1]].to(dtype)


# ---------------------------------------------------------------------------------------------
# INT8: symmetric, one scale per output row (weights) or per token (activations); ConvRot
# ---------------------------------------------------------------------------------------------

INT8_MAX = 127.0
# comfy-kitchen's smallest row scale: an all-zero row gets it and quantizes to zeros.
INT8_SCALE_FLOOR = 1e-30
# ComfyUI's ConvRot: a block-diagonal regular Hadamard rotation of the input dimension, one block per
# CONVROT_GROUP_SIZE features (comfy-kitchen's default and the official LTX-2.5 int8 files').
CONVROT_GROUP_SIZE = 256
_HADAMARD_4 = ((1, 1, 1, -1), (1, 1, -1, 1), (1, -1, 1, 1), (-1, 1, 1, 1))


def hadamard(size: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """comfy-kitchen's normalized regular Hadamard matrix of `size` (a power of 4): Kronecker powers of
    one symmetric 4x4 block over sqrt(size). Symmetric and orthogonal, so it is its own inverse; its
    entries +-2^-k are exact in every float dtype."""
    if size < 4 or size & (size - 1) or (size.bit_length() - 1) % 2:
        raise ValueError(f"a ConvRot group size must be a power of 4 (16, 64, 256, ...), got {size}")
    block = torch.tensor(_HADAMARD_4, dtype=dtype, device=device)
    h = block
    while h.shape[0] < size:
        h = torch.kron(h, block)
    return h / (size ** 0.5)


def rotate_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x @ blockdiag(H, H, ...) over the last dimension, in x's dtype (comfy-kitchen's rotation of
    weights, W @ H^T, and of activations, x @ H, are the same product since H is symmetric)."""
    features = x.shape[-1]
    if features % group_size:
        raise ValueError(f"{features} features are not a whole number of ConvRot groups of {group_size}")
    h = hadamard(group_size, x.dtype, x.device)
    return torch.matmul(x.reshape(-1, features // group_size, group_size), h).reshape(x.shape)


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric INT8 of a weight: (int8 data, fp32 (rows, 1) scales amax/127). Byte-identical
    to comfy-kitchen's quantize_int8_rowwise (and so to ComfyUI's int8 files): the scale is floored
    at INT8_SCALE_FLOOR and the division runs in w's own dtype, rounding half to even."""
    scale = (w.abs().amax(dim=-1, keepdim=True).float() / INT8_MAX).clamp(min=INT8_SCALE_FLOOR)
    divisor = scale.to(w.dtype)
    divisor = torch.where(divisor == 0, torch.full_like(divisor, torch.finfo(w.dtype).tiny), divisor)
    return (w / divisor).round_().clamp_(-128.0, INT8_MAX).to(torch.int8), scale


def dequantize_int8(data: torch.Tensor, scale: torch.Tensor, rotation: int = 0,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """INT8 codes times their scales in fp32; a ConvRot weight (`rotation` = its group size) is rotated
    back to the original basis."""
    values = data.float() * scale.float()
    if rotation:
        values = rotate_groups(values, rotation)
    return values.to(dtype)


# Activations: the rules quant.kernels_int8 reproduces bit for bit. Computed in fp32 for every input
# dtype (comfy-kitchen divides in the input's dtype), rotated by ConvRot in fp32 with
# `rotate_groupsize`, each element multiplied by the reciprocal of its scale (as the FP8 quantizers
# do) and rounded half to even into +-127. A NaN makes its row's scale NaN and its codes 0, so the
# row's GEMM output is NaN, never silently finite; a NaN under a static scale becomes 0 (INT8 has no NaN).

def _int8_activation_values(x: torch.Tensor, rotate_groupsize: int) -> torch.Tensor:
    values = x.float()
    return rotate_groups(values, rotate_groupsize) if rotate_groupsize else values


def _round_to_int8(scaled: torch.Tensor) -> torch.Tensor:
    return scaled.nan_to_num(0.0).clamp(-INT8_MAX, INT8_MAX).round().to(torch.int8)


def quantize_int8_rowwise_dynamic(x: torch.Tensor, rotate_groupsize: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token INT8 of an activation: (int8 codes, fp32 (rows, 1) decode scales amax/127, at least
    INT8_SCALE_FLOOR, so a zero row quantizes to zeros)."""
    values = _int8_activation_values(x, rotate_groupsize)
    amax = values.abs().amax(dim=-1, keepdim=True)
    # The divisor is a tensor on amax's device: CUDA divides by a Python number as a multiply by its
    # rounded reciprocal, one ulp off in ~5% of rows; the kernels divide correctly rounded, as the CPU does.
    scale = (amax / torch.full_like(amax, INT8_MAX)).clamp(min=INT8_SCALE_FLOOR)
    return _round_to_int8(values * (1.0 / scale)), scale


def int8_scaled_mm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                   bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The W8A8 product the INT8 GEMM kernels reproduce: (a @ b^T as exact integers) * a_scale * b_scale
    + bias, in fp32 in that order, cast to out_dtype. a int8 (M, K), b int8 (N, K), a_scale (M, 1),
    b_scale (N,), (1, N) or one value, bias (N,). The products are summed in float64, exact for any K
    below 2^53 / 127^2."""
    exact = a.double() @ b.double().t()
    y = exact.float() * a_scale.float().reshape(-1, 1) * b_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
