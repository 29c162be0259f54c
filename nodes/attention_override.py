"""ComfyUI's per-model attention hook, `transformer_options["optimized_attention_override"]`, calling
one of quant.attention's implementations. No imports of the pack or of ComfyUI: the calling convention
is all it knows, so the unit tests hold it against a stand-in for ComfyUI's attention."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..quant.attention import Attention


def _to_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, s, inner = t.shape
    return t.view(b, s, heads, inner // heads).transpose(1, 2)


def _mask_4d(mask: torch.Tensor) -> torch.Tensor:
    """ComfyUI's masks are (Skv), (Sq, Skv), (B, Sq, Skv) or (B, H, Sq, Skv): broadcast as SDPA wants."""
    while mask.ndim < 4:
        mask = mask.unsqueeze(0) if mask.ndim < 3 else mask.unsqueeze(1)
    return mask


def comfy_override(impl: Attention):
    """The callable for ComfyUI's `transformer_options["optimized_attention_override"]`. ComfyUI calls
    it as override(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
    skip_output_reshape=False, **kwargs), with func its own attention; q/k/v are (B, S, heads*D), or
    (B, heads, S, D) with skip_reshape; it returns (B, Sq, heads*D), or (B, heads, Sq, D) with
    skip_output_reshape. Calls `impl` cannot take go to func."""

    def override(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                 skip_output_reshape=False, **kwargs):
        qh, kh, vh = (q, k, v) if skip_reshape else (_to_heads(t, heads) for t in (q, k, v))
        if not impl.takes(qh, kh, mask, kwargs.get("low_precision_attention", True) is not False) \
                or kwargs.get("enable_gqa"):
            return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                        skip_output_reshape=skip_output_reshape, **kwargs)
        out = impl.run(qh, kh, vh, kwargs.get("scale"), None if mask is None else _mask_4d(mask))
        if skip_output_reshape:
            return out
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)

    override.attention = impl.name  # which implementation a patched model runs (reports, tests)
    return override
