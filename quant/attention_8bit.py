"""Triton 8-bit flash attention for Hopper (the triton-int8 and triton-fp8 implementations of
quant/attention.py), and the operand helpers the 8-bit attentions share. Q INT8 (per token) or E4M3, K
INT8 per 128 tokens (smoothed by its mean over tokens) or E4M3, P and V E4M3 (V centred on its
per-channel mean, scaled per channel and stored transposed), fp32 softmax and accumulation."""

from __future__ import annotations

import torch

from . import kernels
from .formats import FP8_MAX

LOG2E = 1.4426950408889634
FP32_TINY = torch.finfo(torch.float32).tiny


def empty_output(q: torch.Tensor) -> torch.Tensor:
    """An uninitialised (B, H, Sq, D) output like q, laid out (B, Sq, H, D) underneath, so ComfyUI's
    reshape back to (B, Sq, H*D) is a view."""
    batch, heads, sq, dim = q.shape
    return q.new_empty((batch, sq, heads, dim)).transpose(1, 2)


def centred_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, H, S, D) -> its per-channel mean over tokens and the per-channel largest |x - mean|, both
    (B, H, 1, D) fp32, in one read of x: per channel the centred extremes are max - mean and mean - min."""
    low, high = torch.aminmax(x, dim=2, keepdim=True)
    mean = x.mean(dim=2, keepdim=True, dtype=torch.float32)
    return mean, torch.maximum(high.float() - mean, mean - low.float())


if kernels.AVAILABLE:
    import triton
    import triton.language as tl

    from .kernels import _round_to_float_grid, _to_bf16, _to_fp8_bits

    _FP8_MAX = tl.constexpr(FP8_MAX)
    _INT8_MAX = tl.constexpr(127.0)
    _FP32_TINY = tl.constexpr(FP32_TINY)

    @triton.jit
    def _positive_scale(scale):
        """A scale of at least the smallest normal fp32 (an all-zero or denormal block keeps a finite
        inverse, so its zeros stay zeros); NaN stays NaN."""
        return tl.maximum(scale, _FP32_TINY, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _qk_quantize(x, QK_INT8: tl.constexpr, INTERPRET: tl.constexpr):
        """Rows of fp32 x (BLOCK, D) -> (8-bit operand, fp32 scale per row). The operand is what tl.dot
        multiplies: INT8 or E4M3 on the GPU; in the interpreter (whose fp8 casts round wrongly) the
        same values kept fp32."""
        # |x| bits order like the floats and NaN outranks all: a NaN row gets a NaN scale, so NaN
        # reaches the output (an INT8 cast alone would turn it into 0).
        amax = tl.max(tl.abs(x).to(tl.int32, bitcast=True), axis=1).to(tl.float32, bitcast=True)
        scale = _positive_scale(amax / (_INT8_MAX if QK_INT8 else _FP8_MAX))
        y = x * (1.0 / scale)[:, None]
        if QK_INT8:
            y = tl.floor(y + 0.5)
            if not INTERPRET:
                y = y.to(tl.int8)
        elif INTERPRET:
            y = _round_to_float_grid(y, 3, -6)
        else:
            y = y.to(tl.float8e4nv)
        return y, scale

    @triton.jit
    def _tile_operand(tile, QK_INT8: tl.constexpr, INTERPRET: tl.constexpr):
        """A K or V^T tile as the MMA takes it: on the GPU the descriptor already holds INT8 or E4M3; the
        interpreter holds E4M3 as uint8 bits and multiplies fp32 values."""
        if INTERPRET:
            if QK_INT8:
                operand = tile.to(tl.float32)
            else:
                operand = tile.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        else:
            operand = tile
        return operand

    @triton.jit
    def _fp8_operand(x, INTERPRET: tl.constexpr):
        if INTERPRET:
            operand = _round_to_float_grid(x, 3, -6)
        else:
            operand = x.to(tl.float8e4nv)
        return operand

    @triton.jit
    def _attn_prepare_kv_kernel(K, V, k_mean_ptr, v_mean_ptr, v_inv_ptr, k8_ptr, k_scale_ptr, vt8_ptr,
                                stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                                H, S, S_PAD, K_BLOCKS, HEAD_DIM: tl.constexpr, K_BLOCK: tl.constexpr,
                                QK_INT8: tl.constexpr, INTERPRET: tl.constexpr):
        """One K_BLOCK-token block of one head: K minus its mean over tokens -> 8-bit with one scale for
        the block, (B*H, S, D); V minus its mean, times its per-channel inverse scale -> E4M3 transposed,
        (B*H, D, S_PAD), zeros in the padding (the MMA multiplies them by P = 0, and 0 * NaN would not
        be 0)."""
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        rows = tl.program_id(0) * K_BLOCK + tl.arange(0, K_BLOCK)
        cols = tl.arange(0, HEAD_DIM)
        inside = rows[:, None] < S
        k = tl.load(K + b.to(tl.int64) * stride_kb + h * stride_kh + rows[:, None].to(tl.int64) * stride_ks
                    + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        k = tl.where(inside, k - tl.load(k_mean_ptr + bh * HEAD_DIM + cols)[None, :], 0.0)
        # |k| bits order like the floats and NaN outranks all, so a NaN reaches the block's scale
        amax = tl.max(tl.max(tl.abs(k).to(tl.int32, bitcast=True), axis=1), axis=0).to(tl.float32, bitcast=True)
        scale = _positive_scale(amax / (_INT8_MAX if QK_INT8 else _FP8_MAX))
        tl.store(k_scale_ptr + bh * K_BLOCKS + tl.program_id(0), scale)
        y = k * (1.0 / scale)
        if QK_INT8:
            bits = tl.floor(y + 0.5).to(tl.int8)
        else:
            bits = _to_fp8_bits(y, INTERPRET)
        tl.store(k8_ptr + (bh.to(tl.int64) * S + rows[:, None]) * HEAD_DIM + cols[None, :], bits, mask=inside)
        v = tl.load(V + b.to(tl.int64) * stride_vb + h * stride_vh + rows[:, None].to(tl.int64) * stride_vs
                    + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        v = tl.where(inside, v - tl.load(v_mean_ptr + bh * HEAD_DIM + cols)[None, :], 0.0)
        v = v * tl.load(v_inv_ptr + bh * HEAD_DIM + cols)[None, :]
        tl.store(vt8_ptr + (bh.to(tl.int64) * HEAD_DIM + cols[None, :]) * S_PAD + rows[:, None],
                 _to_fp8_bits(v, INTERPRET), mask=rows[:, None] < S_PAD)

    @triton.jit
    def _attn_scores(q8, k_desc, bh, start_n, HEAD_DIM: tl.constexpr, QK_INT8: tl.constexpr,
                     INTERPRET: tl.constexpr, BLOCK_N: tl.constexpr):
        """Q K^T of one BLOCK_N-token block of keys, unscaled (int32 for INT8 operands)."""
        k8 = _tile_operand(k_desc.load([bh, start_n, 0]).reshape(BLOCK_N, HEAD_DIM), QK_INT8, INTERPRET)
        if QK_INT8 and not INTERPRET:
            qk = tl.dot(q8, k8.T, out_dtype=tl.int32)
        else:
            qk = tl.dot(q8, k8.T)
        return qk

    @triton.jit
    def _attn_update(acc, l_i, m_i, qk, row_factor, k_scale_ptr, vt_desc, bh, start_n, Skv, K_BLOCKS,
                     HEAD_DIM: tl.constexpr, K_BLOCK: tl.constexpr, INTERPRET: tl.constexpr,
                     BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr):
        """Online-softmax update of (acc, l_i, m_i) with the scores qk of the block at start_n and its values."""
        qk = qk.to(tl.float32)
        # One factor per row (Q's scale, the block's K scale, softmax scale, log2 e; >= 0): one FMA per score.
        # P tops out at 2^8 through the exponent (E4M3's largest is 448; values down to 2^-14 of the row's
        # maximum stay normal), and l_i carries the same 2^8.
        factor = row_factor * tl.load(k_scale_ptr + bh * K_BLOCKS + start_n // K_BLOCK)
        if EVEN_N:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * factor)
            p = tl.math.exp2(qk * factor[:, None] - (m_new - 8.0)[:, None])
        else:  # keys past the end masked after scaling (-inf times a zero factor would be NaN)
            s = tl.where((start_n + tl.arange(0, BLOCK_N))[None, :] < Skv, qk * factor[:, None], float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - (m_new - 8.0)[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        vt8 = _tile_operand(vt_desc.load([bh, 0, start_n]).reshape(HEAD_DIM, BLOCK_N), False, INTERPRET)
        acc = tl.dot(_fp8_operand(p, INTERPRET), vt8.T, acc)
        return acc, l_i, m_new

    @triton.heuristics({"EVEN_N": lambda args: args["Skv"] % args["BLOCK_N"] == 0})
    @triton.jit
    def _attn_kernel(Q, k_desc, k_scale_ptr, vt_desc, v_mean_ptr, v_scale_ptr, Out,
                     stride_qb, stride_qh, stride_qs, stride_ob, stride_oh, stride_os, H, Sq, Skv, K_BLOCKS, qk_scale,
                     HEAD_DIM: tl.constexpr, K_BLOCK: tl.constexpr, QK_INT8: tl.constexpr, OUT_BF16: tl.constexpr,
                     INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr):
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qs
                    + offs_d[None, :], mask=offs_m[:, None] < Sq, other=0.0).to(tl.float32)
        # Q quantized per token once, in registers
        q8, q_scale = _qk_quantize(q, QK_INT8, INTERPRET)
        row_factor = q_scale * qk_scale
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        # The scores of the next key block are issued before this block's softmax, so the MMA runs while the
        # softmax does (FlashAttention-3's overlap within a warpgroup, by hand; 3% faster at 24,576 tokens
        # with 128-key blocks).
        qk = _attn_scores(q8, k_desc, bh, 0, HEAD_DIM, QK_INT8, INTERPRET, BLOCK_N)
        if INTERPRET:  # its range() cannot take a runtime bound (numpy >= 2.4); the GPU needs for-loops to pipeline
            start_n = BLOCK_N
            while start_n < Skv:
                qk_next = _attn_scores(q8, k_desc, bh, start_n, HEAD_DIM, QK_INT8, INTERPRET, BLOCK_N)
                acc, l_i, m_i = _attn_update(acc, l_i, m_i, qk, row_factor, k_scale_ptr, vt_desc, bh, start_n - BLOCK_N,
                                             Skv, K_BLOCKS, HEAD_DIM, K_BLOCK, INTERPRET, BLOCK_N, EVEN_N)
                qk = qk_next
                start_n += BLOCK_N
        else:
            for start_n in range(BLOCK_N, Skv, BLOCK_N):
                qk_next = _attn_scores(q8, k_desc, bh, start_n, HEAD_DIM, QK_INT8, INTERPRET, BLOCK_N)
                acc, l_i, m_i = _attn_update(acc, l_i, m_i, qk, row_factor, k_scale_ptr, vt_desc, bh, start_n - BLOCK_N,
                                             Skv, K_BLOCKS, HEAD_DIM, K_BLOCK, INTERPRET, BLOCK_N, EVEN_N)
                qk = qk_next
        last_n = (Skv - 1) // BLOCK_N * BLOCK_N
        acc, l_i, m_i = _attn_update(acc, l_i, m_i, qk, row_factor, k_scale_ptr, vt_desc, bh, last_n, Skv, K_BLOCKS,
                                     HEAD_DIM, K_BLOCK, INTERPRET, BLOCK_N, EVEN_N)
        # softmax rows sum to 1: V's mean comes back whole
        out = acc / l_i[:, None] * tl.load(v_scale_ptr + bh * HEAD_DIM + offs_d)[None, :] \
            + tl.load(v_mean_ptr + bh * HEAD_DIM + offs_d)[None, :]
        o_ptrs = Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_os \
            + offs_d[None, :]
        if OUT_BF16:
            tl.store(o_ptrs, _to_bf16(out, INTERPRET), mask=offs_m[:, None] < Sq)
        else:
            tl.store(o_ptrs, out, mask=offs_m[:, None] < Sq)


# Tokens per K scale; a multiple of every BLOCK_N below.
K_BLOCK = 128
# Measured on an H200 at 24,576 tokens (bench/bench_attention.py --tiles; docs/BENCHMARKS.md "Attention
# kernels"): 64-row tiles with one warpgroup beat 128-row tiles by ~10% (more blocks resident per SM hide the
# softmax; Triton 3.6's warp specialization did not compile or did not help here); with the scores issued one
# block ahead, 128-key blocks in 3 stages are 8% faster than 64x64 in 2 (64x64 gets slower with it); the
# interpreter takes small ones.
_TILE = dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1) if kernels.INTERPRET else \
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3)


def _attention_8bit_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           qk_int8: bool) -> torch.Tensor:
    from triton.tools.tensor_descriptor import TensorDescriptor

    batch, heads, sq, dim = q.shape
    skv = k.shape[2]
    device = q.device
    block_m, block_n = _TILE["BLOCK_M"], _TILE["BLOCK_N"]
    if K_BLOCK % block_n:
        raise ValueError(f"attention tile BLOCK_N={block_n} must divide K_BLOCK={K_BLOCK} (one K scale per block)")
    k_mean = k.mean(dim=2, dtype=torch.float32).contiguous()  # (B, H, D)
    k_blocks = triton.cdiv(skv, K_BLOCK)
    k8 = torch.empty((batch * heads, skv, dim), dtype=torch.int8 if qk_int8 else torch.uint8, device=device)
    k_scale = torch.empty((batch * heads, k_blocks), dtype=torch.float32, device=device)
    # V centred on its per-channel mean (SageAttention2's V smoothing: the output's mean part stays exact,
    # E4M3 carries only the deviations; on the full-size model it took the final error's excess over
    # exact attention from +31% to +1%, docs/BENCHMARKS.md "Attention kernels"), then one scale per channel.
    v_mean, v_amax = centred_range(v)  # (B, H, 1, D): the kernels index them as (B*H, D)
    v_mean = v_mean.contiguous()
    v_scale = (v_amax / FP8_MAX).clamp_min(FP32_TINY).contiguous()  # NaN stays NaN
    s_pad = (skv + 15) // 16 * 16  # 16-byte aligned rows of V^T (a TMA rule)
    vt8 = torch.empty((batch * heads, dim, s_pad), dtype=torch.uint8, device=device)
    _attn_prepare_kv_kernel[(k_blocks, batch * heads)](
        k, v, k_mean, v_mean, 1.0 / v_scale, k8, k_scale, vt8, k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), heads, skv, s_pad, k_blocks, HEAD_DIM=dim, K_BLOCK=K_BLOCK,
        QK_INT8=qk_int8, INTERPRET=kernels.INTERPRET, num_warps=4)
    if not kernels.INTERPRET:  # the MMA reads E4M3 straight from shared memory; the interpreter bit-casts
        k8 = k8 if qk_int8 else k8.view(torch.float8_e4m3fn)
        vt8 = vt8.view(torch.float8_e4m3fn)
    # TMA descriptors per head (3-D): a block past the end of a head reads zeros, not the next head.
    k_desc = TensorDescriptor(k8, list(k8.shape), list(k8.stride()), [1, block_n, dim])
    vt_desc = TensorDescriptor(vt8, list(vt8.shape), list(vt8.stride()), [1, dim, block_n])
    out = empty_output(q)
    _attn_kernel[(triton.cdiv(sq, block_m), batch * heads)](
        q, k_desc, k_scale, vt_desc, v_mean, v_scale, out, q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2), heads, sq, skv, k_blocks, scale * LOG2E, HEAD_DIM=dim,
        K_BLOCK=K_BLOCK, QK_INT8=qk_int8, OUT_BF16=q.dtype == torch.bfloat16, INTERPRET=kernels.INTERPRET, **_TILE)
    return out


# A torch custom op, so torch.compile traces through the kernels as one node; eager calls launch directly.
@torch.library.custom_op("ltx2_quant::attention_8bit", mutates_args=())
def _attention_8bit_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       qk_int8: bool) -> torch.Tensor:
    return _attention_8bit_launch(q, k, v, scale, qk_int8)


@_attention_8bit_op.register_fake
def _(q, k, v, scale, qk_int8):
    return empty_output(q)


def attention_8bit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                   qk_int8: bool = True) -> torch.Tensor:
    """Triton 8-bit attention: q (B, H, Sq, D), k/v (B, H, Skv, D), D 64 or 128, bf16 or fp32, last
    dimension contiguous -> (B, H, Sq, D) in q's dtype. Q is INT8 (qk_int8) or E4M3 with one scale per
    token, K the same with one scale per K_BLOCK tokens; P and V are E4M3 (V centred on its mean)."""
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("attention_8bit needs q, k and v contiguous in the head dimension")
    if q.shape[-1] not in (64, 128):
        raise ValueError(f"attention_8bit takes head size 64 or 128, not {q.shape[-1]}")
    if k.shape[2] == 0:  # the kernel's last key block would start before the first
        raise ValueError("attention_8bit needs at least one key")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not scale >= 0:  # the kernel takes each row's maximum before scaling
        raise ValueError(f"attention_8bit needs a softmax scale >= 0, not {scale}")
    if torch.compiler.is_compiling():
        return _attention_8bit_op(q, k, v, scale, qk_int8)
    return _attention_8bit_launch(q, k, v, scale, qk_int8)
