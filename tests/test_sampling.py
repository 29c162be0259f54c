"""Sampling facts: sigma lists, the non-distilled scheduler (against ComfyUI's LTXVScheduler when a
checkout is available), the gradient-estimation step on a hand-made case, shape rules."""

import math
import os
import re
import sys

import pytest
import torch

from quant import sampling


def test_sigma_lists_equal_the_reference_values():
    assert sampling.DISTILLED_STAGE1 == (1.0, 0.99375, 0.9875, 0.98125, 0.975, 0.909375, 0.725, 0.421875, 0.0)
    assert sampling.STAGE2_REFERENCE == (0.909375, 0.725, 0.421875, 0.0)
    assert sampling.STAGE2_COMFYUI == (0.85, 0.7250, 0.4219, 0.0)


def test_scheduler_shape_shift_and_stretch():
    sigmas = sampling.ltx2_scheduler(30, tokens=6144)
    assert sigmas.shape == (31,) and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert sigmas[-2].item() == pytest.approx(0.1, abs=1e-6)  # stretched terminal
    assert bool((sigmas[:-1] > sigmas[1:]).all())
    unstretched = sampling.ltx2_scheduler(4, tokens=None, terminal=None)
    shift = 2.05  # no latent: the maximum shift
    expected = [1.0] + [math.exp(shift) / (math.exp(shift) + 1 / s - 1) for s in (0.75, 0.5, 0.25)] + [0.0]
    assert unstretched.tolist() == pytest.approx(expected, abs=1e-6)


def test_more_tokens_shift_the_schedule_up():
    assert bool((sampling.ltx2_scheduler(20, 24576, terminal=None)[1:-1]
                 > sampling.ltx2_scheduler(20, 1024, terminal=None)[1:-1]).all())


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="COMFYUI_PATH is not set (compares with LTXVScheduler)")
def test_scheduler_matches_comfyui():
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    pytest.importorskip("comfy_api")
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    from comfy_extras.nodes_lt import LTXVScheduler
    latent = {"samples": torch.zeros(1, 128, 16, 16, 24)}
    ours = sampling.ltx2_scheduler(30, tokens=16 * 16 * 24)
    theirs = LTXVScheduler.execute(30, 2.05, 0.95, True, 0.1, latent).args[0]
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_gradient_estimation_step_by_hand():
    x = torch.tensor([1.0, -2.0])
    x0 = torch.tensor([0.5, -1.0])
    first, v1 = sampling.gradient_estimation_step(x, x0, sigma=0.5, sigma_next=0.25, previous_velocity=None)
    assert v1.tolist() == [1.0, -2.0]  # (x - x0) / sigma
    assert first.tolist() == [0.75, -1.5]  # plain Euler on the first step
    x0b = torch.tensor([0.5, -1.0])
    second, v2 = sampling.gradient_estimation_step(first, x0b, sigma=0.25, sigma_next=0.125, previous_velocity=v1)
    assert v2.tolist() == [1.0, -2.0]  # (0.75 - 0.5)/0.25, (-1.5 + 1)/0.25
    # v_tot = 2 * (v2 - v1) + v1 = v1 here; x' = x + v_tot * (0.125 - 0.25)
    assert second.tolist() == [0.625, -1.25]
    x0c = torch.tensor([0.0, 0.0])
    corrected, _ = sampling.gradient_estimation_step(first, x0c, sigma=0.25, sigma_next=0.125, previous_velocity=v1)
    v = torch.tensor([3.0, -6.0])  # (first - 0) / 0.25
    assert corrected.tolist() == (first + (2 * (v - v1) + v1) * -0.125).tolist()
    last, _ = sampling.gradient_estimation_step(second, x0b, sigma=0.125, sigma_next=0.0, previous_velocity=v2)
    assert torch.equal(last, x0b)  # the final step returns the denoised estimate


@pytest.mark.parametrize("width,height,frames,two_stage,needle", [
    (768, 512, 120, False, "8k+1"),
    (768, 512, 0, False, "8k+1 (e.g. 1 or 9), got 0"),
    (784, 512, 121, False, "width must be a multiple of 32, got 784"),
    (768, 544, 121, True, "height must be a multiple of 64"),
])
def test_bad_shapes_name_the_value(width, height, frames, two_stage, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        sampling.check_video_shape(width, height, frames, two_stage)


def test_good_shapes_and_tokens():
    sampling.check_video_shape(768, 512, 121, two_stage=True)
    sampling.check_video_shape(768, 544, 121, two_stage=False)
    assert sampling.video_tokens(768, 512, 121) == 6144
    assert sampling.video_tokens(1536, 1024, 121) == 24576


@pytest.mark.parametrize("shape,needle", [
    ((1, 128, 16, 16, 24), None),
    ((1, 128, 16, 16, 23), "width must be a multiple of 64 for the two-stage flow, got 736"),
    ((1, 128, 16, 17, 24), "height must be a multiple of 64 for the two-stage flow, got 544"),
    ((1, 16, 16, 16, 24), "[batch, 128, frames, height/32, width/32], got shape [1, 16, 16, 16, 24]"),
    ((1, 128, 16, 24), "got shape [1, 128, 16, 24]"),
])
def test_two_stage_latent_shapes(shape, needle):
    if needle is None:
        sampling.check_two_stage_latent_shape(shape)  # 768x512, 121 frames
    else:
        with pytest.raises(ValueError, match=re.escape(needle)):
            sampling.check_two_stage_latent_shape(shape)


@pytest.mark.parametrize("sigmas,needle", [
    ([1.0], "need at least two values"),
    ([0.5, 0.9, 0.0], "non-increasing"),
    ([1.0, float("nan"), 0.0], "finite"),
])
def test_bad_sigma_lists(sigmas, needle):
    with pytest.raises(ValueError, match=needle):
        sampling.check_sigmas(sigmas, "Stage-1")
    sampling.check_sigmas(list(sampling.DISTILLED_STAGE1), "Stage-1")
