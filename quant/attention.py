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

The 8-bit kernels live in attention_8bit.py (Triton) and attention_cudnn.py (cuDNN); this file is the
registry, the probe and the choice. ORDER lists them fastest first as expected on Hopper;
bench/bench_attention.py measures speed and error. "auto" takes the first exact (16-bit) one that
works; "auto-8bit" also the 8-bit ones.
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
from .attention_8bit import attention_8bit
from .attention_cudnn import attention_fp8_cudnn
from .capability import Capability

log = logging.getLogger("ltx2_quant")

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


def _triton_8bit(qk_int8: bool):
    return lambda q, k, v, scale, mask: attention_8bit(q, k, v, scale, qk_int8)


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

