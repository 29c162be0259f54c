"""LTX-2 sampling facts as plain functions: the distilled sigma lists, the non-distilled scheduler,
the gradient-estimation step, and the shape rules of the (two-stage) pipeline."""

from __future__ import annotations

import math

import torch

# Distilled stage 1 (8 Euler steps at half resolution in the two-stage flow).
DISTILLED_STAGE1 = (1.0, 0.99375, 0.9875, 0.98125, 0.975, 0.909375, 0.725, 0.421875, 0.0)
# Stage 2 (refine at full size): Lightricks' reference pipeline, and ComfyUI's official templates.
STAGE2_REFERENCE = (0.909375, 0.725, 0.421875, 0.0)
STAGE2_COMFYUI = (0.85, 0.7250, 0.4219, 0.0)
SIGMA_PRESETS = {
    "distilled stage 1": DISTILLED_STAGE1,
    "distilled stage 2 (Lightricks)": STAGE2_REFERENCE,
    "distilled stage 2 (ComfyUI templates)": STAGE2_COMFYUI,
}


def ltx2_scheduler(steps: int, tokens: int | None = None, max_shift: float = 2.05, base_shift: float = 0.95,
                   terminal: float | None = 0.1) -> torch.Tensor:
    """The non-distilled schedule: linspace(1, 0), a token-dependent shift (2.05 with no latent),
    then stretched so that the last non-zero sigma equals `terminal` (None: no stretch)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    slope = (max_shift - base_shift) / (4096 - 1024)
    shift = (4096 if tokens is None else tokens) * slope + (base_shift - slope * 1024)
    sigmas = torch.where(sigmas != 0, math.exp(shift) / (math.exp(shift) + (1 / sigmas - 1)), 0.0)
    if terminal is not None:
        nonzero = sigmas != 0
        one_minus = 1.0 - sigmas[nonzero]
        sigmas[nonzero] = 1.0 - one_minus / (one_minus[-1] / (1.0 - terminal))
    return sigmas


def gradient_estimation_step(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float,
                             previous_velocity: torch.Tensor | None, gamma: float = 2.0
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of Lightricks' gradient-estimation loop: returns (next x, velocity to carry).
    v = (x - x0)/sigma; with a previous v, v_tot = gamma*(v - v_prev) + v_prev and the Euler step
    uses x0' = x - v_tot*sigma; the carried velocity is the uncorrected v; at sigma_next 0 -> x0."""
    velocity = (x - denoised) / sigma
    if sigma_next == 0:
        return denoised, velocity
    total = velocity if previous_velocity is None else gamma * (velocity - previous_velocity) + previous_velocity
    return x + total * (sigma_next - sigma), velocity


def video_shape_errors(width: int, height: int, frames: int, two_stage: bool) -> list[str]:
    """Every rule the size breaks, each naming the bad value and the nearest good ones: frames must
    be 8k+1; width and height multiples of 32, or of 64 for the two-stage flow (its first stage runs
    at half size)."""
    errors = []
    if frames < 1 or (frames - 1) % 8:
        lower = max(1, (frames - 1) // 8 * 8 + 1)
        errors.append(f"frames must be 8k+1 (e.g. {lower} or {lower + 8}), got {frames}")
    multiple = 64 if two_stage else 32
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % multiple:
            lower = max(multiple, value // multiple * multiple)
            errors.append(f"{name} must be a multiple of {multiple}{' for the two-stage flow' if two_stage else ''}"
                          f", got {value} (e.g. {lower} or {lower + multiple})")
    return errors


def check_video_shape(width: int, height: int, frames: int, two_stage: bool) -> None:
    """Raise a ValueError naming every bad value (see `video_shape_errors`)."""
    errors = video_shape_errors(width, height, frames, two_stage)
    if errors:
        raise ValueError("; ".join(errors))


def video_tokens(width: int, height: int, frames: int) -> int:
    """Transformer tokens of a video latent: one per latent cell (32x32 pixels x 8 frames)."""
    return ((frames - 1) // 8 + 1) * (height // 32) * (width // 32)


def check_two_stage_latent_shape(shape: tuple[int, ...]) -> None:
    """Validate the full-size video latent [B, 128, latent frames, H/32, W/32] of the two-stage flow,
    naming the pixel size it stands for."""
    if len(shape) != 5 or shape[1] != 128:
        raise ValueError(f"Expected an LTX-2 video latent [batch, 128, frames, height/32, width/32], got shape "
                         f"{list(shape)}; use EmptyLTXVLatentVideo (+ LTXVEmptyLatentAudio, LTXVConcatAVLatent).")
    check_video_shape(shape[4] * 32, shape[3] * 32, (shape[2] - 1) * 8 + 1, two_stage=True)


def check_sigmas(sigmas: list[float], stage: str) -> None:
    """A sigma list a sampler can run: at least one step, finite, non-increasing."""
    if len(sigmas) < 2:
        raise ValueError(f"{stage} sigmas need at least two values, got {sigmas}")
    if not all(math.isfinite(s) for s in sigmas) or any(b > a for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"{stage} sigmas must be finite and non-increasing, got {sigmas}")
