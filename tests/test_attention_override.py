"""ComfyUI's attention-override calling convention (nodes/attention_override.py) against a stand-in for
ComfyUI's own attention: layouts, masks, and the calls handed back to it."""

import dataclasses

import pytest
import torch
from test_attention import DEVICE, LOSSY_BOUNDS, runs_here

from nodes.attention_override import comfy_override
from quant.attention import IMPLEMENTATIONS, reference_attention, relative_error


class ComfyAttention:
    """Stands in for ComfyUI's own attention function: records that the call came back to it."""

    def __init__(self):
        self.calls = 0

    def __call__(self, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                 **kwargs):
        self.calls += 1
        return "comfy"


def comfy_inputs(b=2, sq=24, skv=24, heads=4, d=64, dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    return [torch.randn(b, n, heads * d, generator=g).to(DEVICE, dtype) for n in (sq, skv, skv)]


def heads_view(t, heads):
    b, s, inner = t.shape
    return t.view(b, s, heads, inner // heads).transpose(1, 2)


def test_override_keeps_comfyui_layouts():
    q, k, v = comfy_inputs()
    func = ComfyAttention()
    override = comfy_override(IMPLEMENTATIONS["sdpa"])
    ref = reference_attention(*(heads_view(t, 4) for t in (q, k, v)))
    out = override(func, q, k, v, 4, transformer_options={}, _inside_attn_wrapper=True)
    assert out.shape == q.shape and relative_error(out, ref.transpose(1, 2).reshape(q.shape)) < 1e-5
    q4, k4, v4 = (heads_view(t, 4) for t in (q, k, v))
    out4 = override(func, q4, k4, v4, 4, skip_reshape=True, skip_output_reshape=True)
    assert out4.shape == q4.shape and relative_error(out4, ref) < 1e-5
    assert func.calls == 0 and override.attention == "sdpa"


def test_override_masked_call():
    q, k, v = comfy_inputs(sq=20, skv=30)
    mask = torch.zeros(20, 30, device=DEVICE)
    mask[:, 25:] = float("-inf")
    func = ComfyAttention()
    assert comfy_override(IMPLEMENTATIONS["sdpa-flash"])(func, q, k, v, 4, mask) == "comfy" and func.calls == 1
    out = comfy_override(IMPLEMENTATIONS["sdpa"])(func, q, k, v, 4, mask)
    ref = reference_attention(*(heads_view(t, 4) for t in (q, k, v)), mask=mask[None, None])
    assert relative_error(out, ref.transpose(1, 2).reshape(out.shape)) < 1e-5 and func.calls == 1


@pytest.fixture
def no_length_rule(monkeypatch):
    """triton-int8 taking calls of any length (the override tests use short ones)."""
    monkeypatch.setitem(IMPLEMENTATIONS, "triton-int8", dataclasses.replace(IMPLEMENTATIONS["triton-int8"], min_tokens=0))


@pytest.mark.parametrize("kwargs, dtype, d", [({"low_precision_attention": False}, torch.bfloat16, 64),
                                              ({}, torch.float16, 64), ({}, torch.bfloat16, 96),
                                              ({"enable_gqa": True}, torch.bfloat16, 64)])
def test_override_hands_back_what_the_kernel_cannot_take(kwargs, dtype, d, no_length_rule):
    # Without the length rule, so each of these reasons alone sends the call back.
    q, k, v = comfy_inputs(d=d, dtype=dtype)
    func = ComfyAttention()
    assert comfy_override(IMPLEMENTATIONS["triton-int8"])(func, q, k, v, 4, **kwargs) == "comfy" and func.calls == 1


@pytest.mark.skipif(runs_here("triton-int8") is not None, reason=runs_here("triton-int8") or "")
def test_override_runs_the_8bit_kernel_on_calls_it_takes(no_length_rule):
    q, k, v = comfy_inputs(sq=40, skv=70)
    func = ComfyAttention()
    out = comfy_override(IMPLEMENTATIONS["triton-int8"])(func, q, k, v, 4)
    ref = reference_attention(*(heads_view(t, 4) for t in (q, k, v)))
    assert func.calls == 0 and out.shape == q.shape
    assert 1e-4 < relative_error(out, ref.transpose(1, 2).reshape(q.shape)) < LOSSY_BOUNDS["triton-int8"]


def test_short_calls_go_back_to_comfyui():
    """The 8-bit kernels take only long calls (LTX-2.3's text, audio and audio-video attention are short)."""
    func = ComfyAttention()
    q, k, v = comfy_inputs(d=128, dtype=torch.bfloat16)
    assert comfy_override(IMPLEMENTATIONS["triton-int8"])(func, q, k, v, 4) == "comfy" and func.calls == 1
