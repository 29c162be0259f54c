"""Rank functions of the multi-GPU tests that need ComfyUI: importing this module imports ComfyUI (CPU)
and the pack as ComfyUI does (scripts/comfyui_pack.py), so spawned gloo ranks can unpickle them. The tiny
LTX-2.3 model is built the same way on every rank (same seed, the pack's loader and ops)."""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(REPO, "scripts"))
from comfyui_pack import import_pack  # noqa: E402

import_pack(cpu=True)
import comfy.utils  # noqa: E402
import torch  # noqa: E402

from ltx2_quant.nodes import model_io  # noqa: E402
from ltx2_quant.nodes.sequence_parallel_ltx import (SequenceParallelAttention, attention_role_patches,  # noqa: E402
                                                    sharded_forward)
from ltx2_quant.quant import conversion, ltx2  # noqa: E402
from ltx2_quant.quant.load_options import LoadOptions  # noqa: E402
from ltx2_quant.quant.policies import get_policy  # noqa: E402
from ltx2_quant.quant.safetensors_io import MemoryTensors  # noqa: E402
from ltx2_quant.quant.sequence_parallel import SequenceGroup  # noqa: E402

# 4 heads a stream: Ulysses divides them over 2 and 4 ranks.
CONFIG = ltx2.tiny_config(num_layers=2, heads=4, head_dim=16, audio_heads=4, audio_head_dim=8)


def build(policy: str):
    loaded = conversion.load_converted(MemoryTensors(ltx2.synthetic_state_dict(CONFIG, seed=3),
                                                     ltx2.header_metadata(CONFIG)), get_policy(policy))
    patcher, _ = model_io.build_model(loaded, LoadOptions(policy, text_connectors_on_cpu=False))
    model = patcher.model.diffusion_model
    for key, forward in attention_role_patches(model, prefix="").items():
        comfy.utils.set_attr(model, key, forward)
    return model


def inputs(kind: str, frames: int = 3, height: int = 3, width: int = 5, audio_tokens: int = 11):
    """(x, (video timestep, audio timestep), context): per-token timesteps with the first latent frame
    kept (0, as image-to-video conditioning gives) so the per-frame compressed path runs."""
    g = torch.Generator().manual_seed(5)
    video = torch.randn(1, 128, frames, height, width, generator=g)
    tokens = frames * height * width
    v_timestep = torch.full((1, tokens, 1), 0.7)
    v_timestep[:, :height * width] = 0.0
    context = torch.randn(1, 16, CONFIG["cross_attention_dim"] + CONFIG["audio_cross_attention_dim"], generator=g)
    if kind == "video":
        return [video], (v_timestep, torch.tensor([0.7])), context  # ComfyUI passes a list of one
    audio = torch.randn(1, 8, audio_tokens, 16, generator=g)
    return [video, audio], (v_timestep, torch.full((1, audio_tokens, 1), 0.7)), context


def forward(model, x, timestep, context, attention=None):
    x = [t.clone() for t in x] if isinstance(x, list) else x.clone()
    with torch.no_grad():
        if attention is None:
            return model(x, timestep, context, None, frame_rate=25, transformer_options={})
        return sharded_forward(model, attention, x, timestep[0], context, None, 25, {}, None,
                               denoise_mask=None, a_timestep=timestep[1])


def compare(rank: int, world: int, policy: str, kind: str, mode: str, shape: dict):
    """This rank's sequence-parallel output, and on rank 0 the one-process output too."""
    model = build(policy)
    x, timestep, context = inputs(kind, **shape)
    result = {"parallel": forward(model, x, timestep, context,
                                  SequenceParallelAttention(SequenceGroup(None, rank, world, mode)))}
    if rank == 0:
        result["single"] = forward(model, x, timestep, context)
    return result
