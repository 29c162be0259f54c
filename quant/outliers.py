"""Outlier handling before quantization: smoothing and a low-rank branch.

Real transformers have a few input channels far larger than the rest (25-42x the median on the
real-weights proxy); they stretch a format's grid, so every other channel rounds coarsely. Each
transform here leaves x @ W^T unchanged in exact arithmetic and changes only what gets rounded:

- smoothing (SmoothQuant): per input channel j a factor s_j = amax(x_j)^alpha / amax(W[:, j])^(1 - alpha)
  from the calibration's per-channel amax; the weight is quantized as W * s and the activation is
  multiplied by `pre_quant_scale` = 1/s before its quantization (ComfyUI's and ModelOpt's name and
  convention, which stock ComfyUI v0.33 applies to NVFP4 layers).
- low-rank branch (SVDQuant): the largest singular directions of the (smoothed) weight stay in bf16,
  y += (x @ low_rank_down^T) @ low_rank_up^T on the unquantized input; only the residual is quantized.

Rotation (ConvRot/QuaRot) is the third: it is a format of its own, INT8_CONVROT (weights.rotation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BRANCH_DTYPE = torch.bfloat16
# A singular direction goes into the branch only while its singular value is at least this many times
# the median one: a flat spectrum (random Gaussian weights: largest/median about 2-3x) keeps no
# branch, and the byte cap is spent only where a few directions dominate (real weights, and smoothed
# weights whose outlier columns were scaled up).
LOW_RANK_KNEE = 3.0


@dataclass(frozen=True)
class Outliers:
    """What a policy's quantized block Linears do about outlier channels (off by default).
    `smooth_alpha`: SmoothQuant's migration strength in (0, 1], applied where the calibration file has
    the layer's per-channel amax. `low_rank_bytes`: the bf16 low-rank branch's bytes at most this
    fraction of the layer's quantized weight bytes (0: no branch)."""

    smooth_alpha: float = 0.0
    low_rank_bytes: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(f"smooth_alpha must lie in [0, 1], got {self.smooth_alpha}")
        if self.low_rank_bytes < 0.0:
            raise ValueError(f"low_rank_bytes must not be negative, got {self.low_rank_bytes}")

    @property
    def active(self) -> bool:
        return self.smooth_alpha > 0.0 or self.low_rank_bytes > 0.0


NONE = Outliers()


def pre_quant_scale(channel_amax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """1/s per input channel, rounded to bf16 (the dtype files and stock ComfyUI hold it in, so the
    weight is quantized against the value that will be applied). A channel whose activation or weight
    column is all zero keeps 1: there is nothing to move."""
    x_amax = channel_amax.float().to(weight.device)
    w_amax = weight.float().abs().amax(dim=0)
    if x_amax.shape != w_amax.shape:
        raise ValueError(f"per-channel amax has {x_amax.numel()} values, the weight takes {w_amax.numel()} inputs")
    if not bool(torch.isfinite(x_amax).all()) or bool((x_amax < 0).any()):
        bad = x_amax[~torch.isfinite(x_amax) | (x_amax < 0)][0].item()
        raise ValueError(f"per-channel amax must be finite and non-negative, got {bad}")
    usable = (x_amax > 0) & (w_amax > 0)
    s = x_amax.clamp(min=torch.finfo(torch.float32).tiny) ** alpha / w_amax.clamp(
        min=torch.finfo(torch.float32).tiny) ** (1.0 - alpha)
    scale = torch.where(usable, 1.0 / s, torch.ones_like(s))
    return scale.to(torch.bfloat16)


def smoothed_amax(amax: float, channel_amax: torch.Tensor | None, scale: torch.Tensor | None) -> float:
    """The calibrated amax of what a smoothed layer quantizes, x * pre_quant_scale, for its static
    activation scale (`amax` itself where the layer is not smoothed)."""
    if scale is None:
        return amax
    if channel_amax is None:
        raise ValueError("a smoothed layer's static activation scale needs its per-channel amax")
    return float((channel_amax.float() * scale.float()).max())


def branch_rank_cap(shape: tuple[int, int], quantized_bytes: int, byte_fraction: float) -> int:
    """The most directions a branch of `byte_fraction` of the quantized weight's bytes pays for."""
    n, k = shape
    return int(byte_fraction * quantized_bytes // ((n + k) * BRANCH_DTYPE.itemsize))


def _knee_rank(singular_values: torch.Tensor, cap: int) -> int:
    """The directions at least LOW_RANK_KNEE times the median singular value, at most `cap`."""
    return min(cap, int((singular_values >= LOW_RANK_KNEE * singular_values.median()).sum()))


def branch_rank(weight: torch.Tensor, quantized_bytes: int, byte_fraction: float) -> int:
    """The rank low_rank_branch gives `weight`: the directions at least LOW_RANK_KNEE times the median
    singular value, at most branch_rank_cap. A file's header is written before its tensors, so its
    writer asks for the rank ahead and passes it back to low_rank_branch."""
    cap = branch_rank_cap(tuple(weight.shape), quantized_bytes, byte_fraction)
    if cap < 1:
        return 0
    return _knee_rank(torch.linalg.svdvals(weight.float()), cap)


def low_rank_branch(weight: torch.Tensor, quantized_bytes: int, byte_fraction: float, rank: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(down (r, K), up (N, r)) in BRANCH_DTYPE, up @ down the best rank-r approximation of `weight`
    (truncated SVD, the singular values folded into up), or None for rank 0. r counts the directions
    at least LOW_RANK_KNEE times the median singular value, at most as many as `byte_fraction` of the
    quantized weight's bytes pay for; `rank` fixes r instead (branch_rank's answer, asked ahead)."""
    cap = branch_rank_cap(tuple(weight.shape), quantized_bytes, byte_fraction)
    if cap < 1 or rank == 0:
        return None
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    if rank is None:
        rank = _knee_rank(s, cap)
    if rank == 0:
        return None
    return vh[:rank].to(BRANCH_DTYPE), (u[:, :rank] * s[:rank]).to(BRANCH_DTYPE)
