"""Attention for the LTX-2 transformer: a registry of implementations, one chosen per model at load.

Every implementation computes softmax(q k^T * scale) v for q (B, H, Sq, D) and k, v (B, H, Skv, D)
(any strides, last dimension contiguous) and returns (B, H, Sq, D). `choose_attention()` picks one
for a device from its declared constraints, then probes it once on small inputs against an fp32
reference, falling back down the list when it raises, is inaccurate or not finite; the reason is
logged. nodes/attention_override.py hands the choice to ComfyUI's per-model hook; calls an
implementation cannot take (`Attention.takes`: a mask, a dtype, a head size, a short call) go to
ComfyUI's own attention.

  cudnn-fp8       cuDNN's FP8 flash attention (Hopper and newer; needs the optional nvidia-cudnn-frontend
                  package): E4M3 Q/K/V/P and output with one scale per tensor, K and V centred on their
                  means by torch ops that Compile Blocks fuses around the call. ~1.5x bf16 SDPA on long
                  calls; calls shorter than MIN_CUDNN_FP8_TOKENS go to ComfyUI's attention.
  triton-int8     Triton flash attention for Hopper (TMA-fed, 64x128 tiles): Q INT8 with one scale per
                  token, K INT8 with one scale per 128 tokens (K smoothed by its mean over tokens,
                  which softmax ignores), P and V E4M3 (V centred on its per-channel mean, scaled
                  per channel and stored transposed, as the FP8 MMA wants), fp32 softmax and
                  accumulation. SageAttention2's split of formats. It beats 16-bit SDPA only on long
                  calls, so calls shorter than MIN_8BIT_TOKENS on either side go to ComfyUI's own
                  attention.
  triton-fp8      the same with E4M3 Q/K (about 1.3x the error of INT8 on random inputs, about the
                  same speed).
  kitchen-int8    comfy-kitchen's INT8 attention (INT8 Q/K/V, unsigned INT8 P).
  sdpa-cudnn / sdpa-flash / sdpa-efficient   torch SDPA pinned to one CUDA backend.
  sdpa            torch SDPA's own dispatch (what ComfyUI core runs with --use-pytorch-cross-attention).
  sdpa-math       the exact math backend (slow; the fallback of last resort).

ORDER lists them fastest first as expected on Hopper; bench/bench_attention.py measures speed and
error. "auto" takes the first exact (16-bit) one that works; "auto-8bit" also the 8-bit ones.
"""

from __future__ import annotations

import importlib
import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import kernels
from .formats import FP8_MAX, cast_to_fp8
from .capability import Capability

log = logging.getLogger("ltx2_quant")

LOG2E = 1.4426950408889634
FP32_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class Attention:
    name: str
    summary: str
    exact: bool  # False: 8-bit operands (lossy); "auto" passes these over
    masks: bool  # takes an attention mask
    dtypes: tuple[torch.dtype, ...]
    head_dims: tuple[int, ...] | None  # None: any
    requires: Callable[[Capability], str | None]  # why it cannot run on this device, None if it can
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float | None, torch.Tensor | None], torch.Tensor]
    min_tokens: int = 0  # shorter calls (queries or keys) go to ComfyUI's attention: slower here

    def takes(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, low_precision_ok: bool) -> bool:
        return ((mask is None or self.masks) and q.dtype in self.dtypes and q.shape[1] == k.shape[1]
                and (self.head_dims is None or q.shape[-1] in self.head_dims) and (self.exact or low_precision_ok)
                and min(q.shape[2], k.shape[2]) >= self.min_tokens)


def _cuda_at_least(major: int, minor: int, what: str) -> Callable[[Capability], str | None]:
    def requires(cap: Capability) -> str | None:
        if cap.device_type != "cuda" or cap.compute_capability < (major, minor):
            return f"{what} needs CUDA sm_{major}{minor}+ ({cap.describe()})"
        return None
    return requires


def _sdpa(backend: SDPBackend | None):
    def run(q, k, v, scale, mask):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return run


def _kitchen_requires(cap: Capability) -> str | None:
    try:
        kitchen = importlib.import_module("comfy_kitchen")
    except ImportError:
        return "comfy-kitchen is not installed"
    if not hasattr(kitchen, "int8_attention"):
        return "this comfy-kitchen has no int8_attention (needs a newer one)"
    return _cuda_at_least(7, 5, "comfy-kitchen INT8 attention")(cap)


def _kitchen_int8(q, k, v, scale, mask):
    out = importlib.import_module("comfy_kitchen").int8_attention(q, k, v, scale=scale, attn_mask=mask)
    # comfy-kitchen's INT8 casts turn a NaN input into a finite output (seen on an H200): put the NaN
    # back, without a host sync, so a broken input never passes silently.
    broken = q.isnan().any() | k.isnan().any() | v.isnan().any()
    return torch.where(broken, torch.full_like(out, float("nan")), out)


def _triton_requires(major: int, minor: int, what: str) -> Callable[[Capability], str | None]:
    def requires(cap: Capability) -> str | None:
        if not kernels.AVAILABLE:
            return "triton is not installed"
        return _cuda_at_least(major, minor, what)(cap)
    return requires


def _empty_output(q: torch.Tensor) -> torch.Tensor:
    """An uninitialised (B, H, Sq, D) output like q, laid out (B, Sq, H, D) underneath, so ComfyUI's
    reshape back to (B, Sq, H*D) is a view."""
    batch, heads, sq, dim = q.shape
    return q.new_empty((batch, sq, heads, dim)).transpose(1, 2)


def _centred_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, H, S, D) -> its per-channel mean over tokens and the per-channel largest |x - mean|, both
    (B, H, 1, D) fp32, in one read of x: per channel the centred extremes are max - mean and mean - min."""
    low, high = torch.aminmax(x, dim=2, keepdim=True)
    mean = x.mean(dim=2, keepdim=True, dtype=torch.float32)
    return mean, torch.maximum(high.float() - mean, mean - low.float())


# ---------------------------------------------------------------------------------------------
# Triton 8-bit flash attention

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
    v_mean, v_amax = _centred_range(v)  # (B, H, 1, D): the kernels index them as (B*H, D)
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
    out = _empty_output(q)
    _attn_kernel[(triton.cdiv(sq, block_m), batch * heads)](
        q, k_desc, k_scale, vt_desc, v_mean, v_scale, out, q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2), heads, sq, skv, k_blocks, scale * LOG2E, HEAD_DIM=dim,
        K_BLOCK=K_BLOCK, QK_INT8=qk_int8, OUT_BF16=q.dtype == torch.bfloat16, INTERPRET=kernels.INTERPRET, **_TILE)
    return out


# A torch custom op, so torch.compile traces through the kernels as one node; eager calls launch directly.
@torch.library.custom_op("ltx2q::attention_8bit", mutates_args=())
def _attention_8bit_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       qk_int8: bool) -> torch.Tensor:
    return _attention_8bit_launch(q, k, v, scale, qk_int8)


@_attention_8bit_op.register_fake
def _(q, k, v, scale, qk_int8):
    return _empty_output(q)


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


def _triton_8bit(qk_int8: bool):
    return lambda q, k, v, scale, mask: attention_8bit(q, k, v, scale, qk_int8)


# ---------------------------------------------------------------------------------------------
# cuDNN FP8 flash attention (Hopper and newer) through NVIDIA's cudnn-frontend package, which ComfyUI does
# not bring: `pip install nvidia-cudnn-frontend`. cuDNN 9.19's FP8 forward runs ~1,050 TFLOP/s on an H200
# where its bf16 one (torch SDPA's choice there) runs ~700 (cudnn-frontend's published benchmark, head size
# 128, no mask); it takes one scale per tensor for Q, K and V.

P_SCALE = 256.0  # softmax probabilities (<= 1) times this are E4M3; a power of two, so undone exactly
# The output is E4M3 in V's scale times this. Exact softmax weights keep each output row inside V's range,
# but cuDNN rounds P to E4M3 before P V and divides by the fp32 row sum, so a row can exceed it by several
# percent. A power of two: only the output's subnormal range moves.
O_HEADROOM = 2.0


def _cudnn_fp8_requires(cap: Capability) -> str | None:
    why = _cuda_at_least(9, 0, "cuDNN FP8 attention")(cap)
    if why is not None:
        return why
    try:
        cudnn = importlib.import_module("cudnn")
    except ImportError:
        return "the cudnn-frontend package is not installed (pip install nvidia-cudnn-frontend)"
    try:  # the package can import and still fail to load libcudnn (none, or several, found)
        version = cudnn.backend_version()
    except Exception as e:
        return f"cudnn-frontend cannot load cuDNN: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    if version < 90100:
        return f"cuDNN {version} has no FP8 attention (needs 9.1+)"
    return None


def fp8_attention_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q, k, v (B, H, S, D) -> (q8, k8, v8, descales, v_mean): E4M3 in the inputs' layout with one fp32
    decode scale each (descales, shape (3,)), K and V first centred on their per-channel means over tokens.
    Softmax ignores K's mean (a constant per row of scores); V's, (B, H, 1, D) fp32, is added back to the
    output exactly, since each row of probabilities sums to 1. E4M3 then carries only the deviations."""
    k_mean, k_amax = _centred_range(k)
    v_mean, v_amax = _centred_range(v)
    operands, descales = [], []
    centred = ((q.float(), q.abs().amax().float()), (k - k_mean, k_amax.amax()), (v - v_mean, v_amax.amax()))
    for x, amax in centred:
        descale = (amax / FP8_MAX).clamp_min(FP32_TINY)  # zero or denormal: a finite inverse; NaN stays NaN
        operands.append(cast_to_fp8(x * (1.0 / descale)))
        descales.append(descale)
    return *operands, torch.stack(descales), v_mean


_CUDNN_HANDLES: dict[int, object] = {}
_CUDNN_GRAPHS: dict[tuple, tuple] = {}


def _cudnn_fp8_graph(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, out: torch.Tensor, scale: float):
    """The built cuDNN graph for these shapes, strides and scale (built once, kept for the process)."""
    key = (q8.device.index, q8.shape, q8.stride(), k8.shape, k8.stride(), v8.shape, v8.stride(), out.stride(), scale)
    if key in _CUDNN_GRAPHS:
        return _CUDNN_GRAPHS[key]
    cudnn = importlib.import_module("cudnn")
    device = q8.device.index
    if device not in _CUDNN_HANDLES:
        _CUDNN_HANDLES[device] = cudnn.create_handle()
    handle = _CUDNN_HANDLES[device]
    fp32, e4m3 = cudnn.data_type.FLOAT, cudnn.data_type.FP8_E4M3
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)
    operands = [graph.tensor(name=name, dim=list(t.shape), stride=list(t.stride()), data_type=e4m3)
                for name, t in (("q", q8), ("k", k8), ("v", v8))]
    scalars = [graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
               for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")]
    o, _, amax_s, amax_o = graph.sdpa_fp8(*operands, *scalars, generate_stats=False, attn_scale=scale,
                                          use_causal_mask=False)
    o.set_output(True).set_dim(list(out.shape)).set_stride(list(out.stride())).set_data_type(e4m3)
    for amax in (amax_s, amax_o):  # the ranges of P and O, for callers that scale by history; unused here
        amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    _CUDNN_GRAPHS[key] = (handle, graph, [*operands, o, amax_s, amax_o], scalars, graph.get_workspace_size())
    return _CUDNN_GRAPHS[key]


def _cudnn_fp8_launch(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descales: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """E4M3 output (B, H, Sq, D) in V's scale times O_HEADROOM: on Hopper cuDNN's FP8 attention writes only FP8."""
    cudnn = importlib.import_module("cudnn")
    with torch.cuda.device(q8.device):  # a cuDNN handle belongs to the device current when it is made
        out = _empty_output(q8)
        handle, graph, tensors, scalars, workspace_size = _cudnn_fp8_graph(q8, k8, v8, out, scale)
        # One scalar per 16 bytes: descale q, k, v, then P's descale and scale, and the output's scale.
        p_scale = torch.full((1,), P_SCALE, device=q8.device)  # made on the GPU: a host copy breaks CUDA graphs
        values = torch.cat([descales.float(), 1 / p_scale, p_scale, 1 / (descales[2:] * O_HEADROOM)])
        values = F.pad(values[:, None], (0, 3))
        amaxes = torch.empty((2, 4), dtype=torch.float32, device=q8.device)
        bindings = dict(zip(tensors, [q8, k8, v8, out, amaxes[0, :1], amaxes[1, :1]]))
        bindings.update((t, values[i, :1]) for i, t in enumerate(scalars))
        workspace = torch.empty(workspace_size, dtype=torch.uint8, device=q8.device)
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(q8.device).cuda_stream)
        graph.execute(bindings, workspace, handle=handle)
    return out


# A torch custom op, so torch.compile keeps the cuDNN call as one node and fuses the operands' preparation
# and the output's decoding around it.
@torch.library.custom_op("ltx2q::attention_fp8_cudnn", mutates_args=())
def _cudnn_fp8_op(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descales: torch.Tensor,
                  scale: float) -> torch.Tensor:
    return _cudnn_fp8_launch(q8, k8, v8, descales, scale)


@_cudnn_fp8_op.register_fake
def _(q8, k8, v8, descales, scale):
    return _empty_output(q8)


def attention_fp8_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """cuDNN FP8 attention: q (B, H, Sq, D), k/v (B, H, Skv, D), bf16 or fp16 on a CUDA device ->
    (B, H, Sq, D) in q's dtype. Q, K, V, P and the output are E4M3 with one scale per tensor (K and V
    centred, see fp8_attention_operands); softmax and accumulation in fp32."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q8, k8, v8, descales, v_mean = fp8_attention_operands(q, k, v)
    launch = _cudnn_fp8_op if torch.compiler.is_compiling() else _cudnn_fp8_launch
    out8 = launch(q8, k8, v8, descales, scale)
    return (out8.float() * (descales[2] * O_HEADROOM) + v_mean).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# Registry

_HALF = (torch.bfloat16, torch.float16)
_ANY = (torch.bfloat16, torch.float16, torch.float32)
_TRITON_DTYPES = (torch.bfloat16, torch.float32)
# Hopper: TMA tensor descriptors feed the FP8 MMA (Ada has FP8 MMA but no TMA; not measured there).
_FP8_TRITON = _triton_requires(9, 0, "Triton 8-bit attention (TMA and FP8 tensor cores)")
# triton-int8 vs bf16 SDPA on LTX-2.3's video self-attention alone, H200 (prepare pass included): 0.94x at 6,144
# tokens, 1.03x at 9,216, 1.09x at 12,288 and 14,080, 1.10-1.13x at 16,384, 1.13-1.15x at 24,576. Inside the
# model at 24,576 the kernel itself was 1.05x of cuDNN (1.17x alone), about 1.02x with the prepare pass, so
# the threshold is not lowered before a length below it is measured inside the model (docs/BENCHMARKS.md,
# "Attention kernels"). The text, audio and audio-video calls (126-1,024 tokens a side) are faster in SDPA
# too. Below this, calls go to ComfyUI's attention.
MIN_8BIT_TOKENS = 16384
# cudnn-fp8 vs bf16 SDPA on the video self-attention, H200 (docs/BENCHMARKS.md, "Attention kernels"): the
# call alone 1.51x at 12,288 tokens, 1.50x at 16,384 and 1.53x at 24,576, with its compiled preparation 1.35x,
# 1.33x and 1.39x; at 6,144 the call alone is 0.95x. Inside the model at 24,576 it kept its speed (10.8 ms
# against cuDNN bf16's 15.8).
MIN_CUDNN_FP8_TOKENS = 12288
IMPLEMENTATIONS = {a.name: a for a in [
    Attention("cudnn-fp8", "cuDNN FP8 flash attention, E4M3 Q/K/P/V with one scale per tensor (K and V centred "
              "on their means), fp32 softmax and accumulation (lossy)", exact=False, masks=False, dtypes=_HALF,
              head_dims=(64, 128), requires=_cudnn_fp8_requires,
              run=lambda q, k, v, scale, mask: attention_fp8_cudnn(q, k, v, scale), min_tokens=MIN_CUDNN_FP8_TOKENS),
    Attention("triton-int8", "Triton attention, INT8 Q (per token) and K (per 128 tokens), E4M3 P and V, fp32 "
              "softmax and accumulation (SageAttention2's split; lossy)", exact=False, masks=False,
              dtypes=_TRITON_DTYPES, head_dims=(64, 128), requires=_FP8_TRITON, run=_triton_8bit(qk_int8=True),
              min_tokens=MIN_8BIT_TOKENS),
    Attention("triton-fp8", "Triton attention, E4M3 Q/K/P/V (lossy)", exact=False, masks=False,
              dtypes=_TRITON_DTYPES, head_dims=(64, 128), requires=_FP8_TRITON,
              run=_triton_8bit(qk_int8=False), min_tokens=MIN_8BIT_TOKENS),
    Attention("kitchen-int8", "comfy-kitchen INT8 attention (8-bit Q/K/V/P, lossy)", exact=False, masks=True,
              dtypes=_ANY, head_dims=None, requires=_kitchen_requires, run=_kitchen_int8),
    Attention("sdpa-cudnn", "torch SDPA, cuDNN backend", exact=True, masks=False, dtypes=_HALF, head_dims=None,
              requires=_cuda_at_least(8, 0, "cuDNN attention"), run=_sdpa(SDPBackend.CUDNN_ATTENTION)),
    Attention("sdpa-flash", "torch SDPA, FlashAttention-2 backend", exact=True, masks=False, dtypes=_HALF,
              head_dims=None, requires=_cuda_at_least(8, 0, "flash attention"), run=_sdpa(SDPBackend.FLASH_ATTENTION)),
    Attention("sdpa-efficient", "torch SDPA, memory-efficient backend", exact=True, masks=True, dtypes=_ANY,
              head_dims=None, requires=_cuda_at_least(5, 0, "memory-efficient attention"),
              run=_sdpa(SDPBackend.EFFICIENT_ATTENTION)),
    Attention("sdpa", "torch SDPA, its own backend choice (ComfyUI core's pytorch attention)", exact=True, masks=True,
              dtypes=_ANY, head_dims=None, requires=lambda cap: None, run=_sdpa(None)),
    Attention("sdpa-math", "torch SDPA, math backend (exact, slow)", exact=True, masks=True, dtypes=_ANY,
              head_dims=None, requires=lambda cap: None, run=_sdpa(SDPBackend.MATH)),
]}
ORDER = list(IMPLEMENTATIONS)  # fastest first, as expected on Hopper
AUTO = "auto"
AUTO_8BIT = "auto-8bit"
CHOICES = [AUTO, AUTO_8BIT, *ORDER]
# Probe shapes (B, H, Sq, Skv, D): LTX-2.3's head sizes (video 128, audio 64), lengths off the block grid.
PROBE_SHAPES = [(1, 2, 80, 150, 128), (1, 2, 40, 33, 64)]


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 math reference every implementation is measured against."""
    if mask is not None and mask.is_floating_point():
        mask = mask.float()
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp32; NaN when out has a NaN or inf (so no bound passes it)."""
    out = out.float()
    if not torch.isfinite(out).all():
        return math.nan
    return float((out - ref).norm() / ref.norm())


def probe_bound(impl: Attention, dtype: torch.dtype) -> float:
    """Largest relative error vs fp32 a working implementation shows on random inputs."""
    if not impl.exact:
        return 0.1
    return 1e-4 if dtype == torch.float32 else 2e-2


def probe(impl: Attention, device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Runs `impl` once per probe shape on `device`; why it is unusable there, or None."""
    if dtype not in impl.dtypes:
        return f"takes {', '.join(str(d).removeprefix('torch.') for d in impl.dtypes)}, the model computes in " \
               f"{str(dtype).removeprefix('torch.')}"
    g = torch.Generator().manual_seed(0)
    for b, h, sq, skv, d in PROBE_SHAPES:
        if impl.head_dims is not None and d not in impl.head_dims:
            continue
        # (B, S, H, D) underneath, as ComfyUI hands q, k and v over
        q, k, v = (torch.randn(b, n, h, d, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
                   for n in (sq, skv, skv))
        try:
            out = impl.run(q, k, v, None, None)
        except Exception as e:  # a backend missing from this build or driver says so only when called
            return f"failed on a {d}-dim probe: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        err = relative_error(out.cpu(), reference_attention(q, k, v).cpu())
        if not err <= probe_bound(impl, dtype):
            return f"probe error {err:.3g} vs fp32 exceeds {probe_bound(impl, dtype):g} ({d}-dim heads)"
    return None


def choose_attention(cap: Capability, requested: str = AUTO, device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.bfloat16) -> tuple[str, str]:
    """(implementation, reason) for `requested` (a name, "auto" or "auto-8bit") on a device of `cap`.
    With `device`, each candidate is also probed there; a failing one falls back to the next
    (a requested one to what "auto" picks), and the reason says what was passed over and why."""
    if requested not in CHOICES:
        raise ValueError(f"unknown attention {requested!r}; choose one of {', '.join(CHOICES)}")
    exact_only = requested != AUTO_8BIT
    automatic = [n for n in ORDER if IMPLEMENTATIONS[n].exact or not exact_only]
    candidates = automatic if requested in (AUTO, AUTO_8BIT) else [requested] + [
        n for n in automatic if n != requested and IMPLEMENTATIONS[n].exact]
    passed_over = []
    for name in candidates:
        impl = IMPLEMENTATIONS[name]
        why = impl.requires(cap)
        if why is None and device is not None:
            why = probe(impl, device, dtype)
        if why is None:
            reason = f"{impl.summary} on {cap.describe()}"
            if passed_over:
                reason += "; passed over: " + "; ".join(passed_over)
            log.info("LTX-2 Quant attention (%s): %s: %s", requested, name, reason)
            return name, reason
        passed_over.append(f"{name} ({why})")
    raise RuntimeError(f"no attention implementation works on {cap.describe()}: {'; '.join(passed_over)}")

