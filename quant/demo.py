"""The embedded default: quantize a small LTX-2.3-shaped model with every policy and report
memory and output error. Runs in seconds on a CPU; no download, no ComfyUI."""

from __future__ import annotations

import torch

from . import ltx2
from .comfy_quant import layer_conf
from .policies import POLICIES, Policy, plan, summarize
from .reference import reference_linear, relative_error
from .modes import Nvfp4Mode, layer_activation
from .weights import QuantizedWeight, quantize_weight

# One block's main path per stream: attention values and output, then the feed-forward.
VIDEO_STACK = ("attn1.to_v", "attn1.to_out.0", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
AUDIO_STACK = tuple("audio_" + name for name in VIDEO_STACK)


def run_stack(layers: dict, names: tuple[str, ...], x: torch.Tensor, activations: dict[str, str]) -> torch.Tensor:
    """The stack in fp32 reference math; `activations` gives each layer's handling ("none" when absent)."""
    h = x
    for name in names:
        weight, bias = layers[name + ".weight"], layers[name + ".bias"]
        h = reference_linear(h, weight, bias, activations.get(name, "none"))
        if name.endswith("net.0.proj"):
            h = torch.nn.functional.gelu(h, approximate="tanh")
    return h


def quantize_block(state: dict[str, torch.Tensor], policy: Policy, block: int, num_blocks: int
                   ) -> tuple[dict, dict[str, str]]:
    """Block `block`'s tensors under `policy` (quantized weights as QuantizedWeight, the rest as is)
    and each quantized layer's activation handling (weight-only layers: "none")."""
    prefix = f"transformer_blocks.{block}."
    table = [(k[: -len(".weight")], tuple(v.shape), "BF16", v.numel() * 2)
             for k, v in state.items() if k.startswith(prefix) and k.endswith(".weight")]
    decisions = plan(policy, table, num_blocks)
    targets = {d.layer: d.target_format for d in decisions}
    # NVFP4 layers as the exact mode runs them (weight-only): the fast modes differ per GPU.
    activations = {d.layer[len(prefix):]: layer_activation(layer_conf(d), Nvfp4Mode.EXACT)
                   for d in decisions if d.changed}
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        if layer is not None and targets.get(layer, "BF16") != "BF16":
            out[name] = quantize_weight(value, targets[layer])
        else:
            out[name] = value
    return out, activations


def run_demo(num_layers: int = 4, tokens: int = 256, seed: int = 0) -> list[dict]:
    config = ltx2.tiny_config(num_layers=num_layers, heads=4, head_dim=64, audio_heads=4, audio_head_dim=32)
    state = ltx2.synthetic_state_dict(config, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    video_x = torch.randn(tokens, config["num_attention_heads"] * config["attention_head_dim"], generator=gen)
    audio_x = torch.randn(tokens // 4, config["audio_num_attention_heads"] * config["audio_attention_head_dim"],
                          generator=gen)
    block = num_layers // 2  # a middle block: in scope for every policy
    table = [(k[: -len(".weight")], tuple(v.shape), "BF16", v.numel() * v.element_size())
             for k, v in state.items() if k.endswith(".weight")]
    exact, _ = quantize_block(state, POLICIES["bf16"], block, num_layers)
    video_ref = run_stack(exact, VIDEO_STACK, video_x, {})
    audio_ref = run_stack(exact, AUDIO_STACK, audio_x, {})
    rows = []
    for policy in POLICIES.values():
        summary = summarize(plan(policy, table, num_layers))
        layers, activations = quantize_block(state, policy, block, num_layers)
        quantized = sum(isinstance(v, QuantizedWeight) for v in layers.values())
        rows.append({
            "policy": policy.name,
            "bytes": summary["bytes_after"],
            "ratio": summary["ratio"],
            "video_error": relative_error(run_stack(layers, VIDEO_STACK, video_x, activations), video_ref),
            "audio_error": relative_error(run_stack(layers, AUDIO_STACK, audio_x, activations), audio_ref),
            "quantized_in_block": quantized,
        })
    return rows


def format_demo(rows: list[dict]) -> str:
    lines = [f"{'policy':<14}{'weight bytes':>14}{'vs bf16':>9}{'video err':>11}{'audio err':>11}",
             "-" * 59]
    for r in rows:
        lines.append(f"{r['policy']:<14}{r['bytes']:>14,}{r['ratio']:>8.2f}x{r['video_error']:>11.4f}"
                     f"{r['audio_error']:>11.4f}")
    lines.append("error: relative L2 error of one block's linear stack (attn v/out, cross-attn v/out, FFN) "
                 "vs the bf16 weights, fp32 reference math")
    return "\n".join(lines)
