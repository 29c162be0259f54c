"""The LTX-2 transformer's forward with its tokens split across the ranks of a SequenceGroup (ComfyUI
glue: it runs ComfyUI's own LTXAVModel methods and blocks; the exchanges are quant/sequence_parallel.py).

Every rank runs the whole input stage (patchify, timestep and text embeddings, RoPE tables: cheap, and it
spares a broadcast), keeps its contiguous range of video tokens and of audio tokens, runs all blocks on it,
and the full streams are gathered once, before the output stage. Inside a block every token-wise layer (the
quantized Linears, norms, AdaLN modulation, gates, feed-forwards) runs on the local tokens unchanged; only
the attention calls exchange anything:

- video / audio self-attention: queries and keys local; Ulysses all-to-all over heads (or ring).
- text cross-attention (attn2, audio_attn2): queries local, the prompt replicated; no exchange.
- audio-to-video (Q video, K/V audio): queries local; the audio K and V all-gathered (small).
- video-to-audio (Q audio, K/V video): the audio queries all-gathered, attended to the local video keys,
  the partial results merged by log-sum-exp in one all-reduce; each rank keeps its audio rows.

The video K/V of video-to-audio never travel: moving them would cost as much as a video self-attention's
exchange, while the audio side is ~126 tokens. A stream with fewer tokens than ranks is not split (every
rank holds all of it: a video-only latent's empty audio, or a tiny test latent).

Each attention module's call is tagged with its role (which of the rows above) through transformer_options,
by an instance forward that ComfyUI object-patches onto the module (attention_role_patches); the
dispatcher (SequenceParallelAttention) is the attention override, and it calls the override that was
there before it (the pack's chosen kernel) or ComfyUI's attention for the actual attention."""

from __future__ import annotations

import functools

import torch

import comfy.ldm.lightricks.av_model as av_model
from comfy.ldm.lightricks.av_model import CompressedTimestep

from ..quant.sequence_parallel import (RING, SequenceGroup, gather_tokens, replicated_query_attention,
                                       ring_attention, shard, token_range, token_splits, ulysses_attention)

ROLE = "ltx2_quant_sequence_parallel_role"
VIDEO_SELF, AUDIO_SELF, TEXT, AUDIO_TO_VIDEO, VIDEO_TO_AUDIO = "video self", "audio self", "text", "a2v", "v2a"
ROLES = {"attn1": VIDEO_SELF, "audio_attn1": AUDIO_SELF, "attn2": TEXT, "audio_attn2": TEXT,
         "audio_to_video_attn": AUDIO_TO_VIDEO, "video_to_audio_attn": VIDEO_TO_AUDIO}


def check_model(diffusion_model) -> None:
    if not isinstance(diffusion_model, av_model.LTXAVModel):
        raise ValueError(f"Multi-GPU sampling splits the LTX-2 audio-video transformer; this model is a "
                         f"{type(diffusion_model).__name__}")


def _tagged_forward(module, role, x, context=None, mask=None, pe=None, k_pe=None, transformer_options={}):
    return type(module).forward(module, x, context=context, mask=mask, pe=pe, k_pe=k_pe,
                                transformer_options={**transformer_options, ROLE: role})


def attention_role_patches(diffusion_model, prefix: str = "diffusion_model.") -> dict:
    """{object-patch key: instance forward} that tags each block attention's calls with its role."""
    check_model(diffusion_model)
    patches = {}
    for index, block in enumerate(diffusion_model.transformer_blocks):
        for name, role in ROLES.items():
            module = getattr(block, name)
            patches[f"{prefix}transformer_blocks.{index}.{name}.forward"] = functools.partial(
                _tagged_forward, module, role)
    return patches


class StreamSplit:
    """One stream's token ranges, or None ranges when the stream is held whole by every rank."""

    def __init__(self, tokens: int, sp: SequenceGroup):
        self.tokens = tokens
        self.splits = token_splits(tokens, sp.world) if tokens >= sp.world > 1 else None

    def local(self, x: torch.Tensor, rank: int, dim: int = 1) -> torch.Tensor:
        return x if self.splits is None else shard(x, dim, self.splits, rank)


class SequenceParallelAttention:
    """The attention override while a sequence-parallel forward runs (see the module docstring). One
    instance per model and group, kept across steps: Compile Blocks guards on the override's identity."""

    def __init__(self, sp: SequenceGroup):
        self.sp = sp
        self.video: StreamSplit | None = None  # set by sharded_forward for each step
        self.audio: StreamSplit | None = None
        self.inner = None  # the override that was there before (the pack's chosen kernel), or None

    def attend(self, func, q, k, v, heads, **kwargs):
        if self.inner is not None:
            return self.inner(func, q, k, v, heads, **kwargs)
        return func(q, k, v, heads, **kwargs)

    @torch.compiler.disable
    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        role = (kwargs.get("transformer_options") or {}).get(ROLE)
        sp = self.sp
        if role in (VIDEO_SELF, AUDIO_SELF):
            stream = self.video if role == VIDEO_SELF else self.audio
            if stream.splits is None:
                return self.attend(func, q, k, v, heads, *args, **kwargs)
            if kwargs.get("mask") is not None or args:
                raise ValueError("Multi-GPU sampling does not take a self-attention mask (keyframe guide "
                                 "attention); sample this latent on one GPU")
            if sp.mode == RING or heads % sp.world:
                return ring_attention(q, k, v, heads, stream.splits, sp, kwargs.get("scale"))
            return ulysses_attention(functools.partial(self.attend, func), q, k, v, heads, stream.splits,
                                     stream.splits, sp, **kwargs)
        if role == AUDIO_TO_VIDEO and self.audio.splits is not None:
            k = gather_tokens(k, 1, self.audio.splits, sp)
            v = gather_tokens(v, 1, self.audio.splits, sp)
        elif role == VIDEO_TO_AUDIO and self.video.splits is not None:
            if self.audio.splits is not None:
                q = gather_tokens(q, 1, self.audio.splits, sp)
            out = replicated_query_attention(q, k, v, heads, sp, kwargs.get("scale"))
            return self.audio.local(out, sp.rank)
        return self.attend(func, q, k, v, heads, *args, **kwargs)


def per_frame_timestep(data: torch.Tensor, patches_per_frame: int) -> CompressedTimestep:
    """A CompressedTimestep of per-frame rows [B, frames, D] (set directly: ComfyUI v0.20.1's constructor
    only compresses per-token rows)."""
    timestep = CompressedTimestep.__new__(CompressedTimestep)
    timestep.batch_size, timestep.num_frames, timestep.feature_dim = data.shape
    timestep.patches_per_frame, timestep.data = patches_per_frame, data
    return timestep


class TokenRangeTimestep(CompressedTimestep):
    """A per-frame CompressedTimestep seen through one rank's token range: the modulation is computed
    on the frames the range touches and expanded for those tokens only."""

    def __init__(self, whole: CompressedTimestep, start: int, end: int):
        ppf = whole.patches_per_frame
        self.first_frame, last_frame = start // ppf, -(-end // ppf)
        self.offset, self.count = start - self.first_frame * ppf, end - start
        self.frames = per_frame_timestep(whole.data[:, self.first_frame:last_frame], ppf)
        self.batch_size, self.num_frames, self.feature_dim = self.frames.data.shape
        self.patches_per_frame, self.data = ppf, self.frames.data

    def expand(self):
        return self.frames.expand()[:, self.offset:self.offset + self.count]

    def expand_for_computation(self, scale_shift_table, batch_size, indices=slice(None, None)):
        values = self.frames.expand_for_computation(scale_shift_table, batch_size, indices)
        return tuple(value[:, self.offset:self.offset + self.count] for value in values)


def local_timestep(timestep, stream: StreamSplit, rank: int):
    """This rank's rows of a per-token timestep embedding; one shared by all tokens stays as it is."""
    if timestep is None or stream.splits is None:
        return timestep
    if isinstance(timestep, CompressedTimestep):
        tokens = timestep.num_frames * timestep.patches_per_frame
        if tokens == 1:
            return timestep
        if tokens != stream.tokens:
            raise ValueError(f"a timestep embedding for {tokens} tokens on a stream of {stream.tokens}")
        if timestep.patches_per_frame == 1:
            return CompressedTimestep(stream.local(timestep.data, rank), None)
        return TokenRangeTimestep(timestep, *token_range(stream.splits, rank))
    if timestep.shape[1] == 1:
        return timestep
    if timestep.shape[1] != stream.tokens:
        raise ValueError(f"a timestep embedding of {timestep.shape[1]} rows on a stream of {stream.tokens} tokens")
    return stream.local(timestep, rank)


def local_rope(pe, stream: StreamSplit, rank: int):
    """RoPE tables cut to this rank's tokens. ComfyUI v0.33: (rotation [B, tokens, heads, ...], split flag);
    v0.20.1: (cos, sin, split flag), [B, heads, tokens, d/2] when split, else [B, tokens, d]."""
    *tables, split_mode = pe
    dim = 2 if len(tables) == 2 and split_mode else 1
    return (*(stream.local(table, rank, dim) for table in tables), split_mode)


def sharded_forward(model, attention: SequenceParallelAttention, x, timestep, context, attention_mask,
                    frame_rate=25, transformer_options={}, keyframe_idxs=None, denoise_mask=None, **kwargs):
    """LTXBaseModel._forward (the same arguments, as a DIFFUSION_MODEL wrapper receives them) with the
    transformer blocks run on this rank's tokens; every rank returns the whole output."""
    check_model(model)
    sp = attention.sp
    input_dtype, batch_size = (x[0].dtype, x[0].shape[0]) if isinstance(x, list) else (x.dtype, x.shape[0])
    merged_args = {**transformer_options, **kwargs}
    x, pixel_coords, additional_args = model._process_input(x, keyframe_idxs, denoise_mask, **merged_args)
    merged_args.update(additional_args)
    timestep, embedded_timestep, prompt_timestep = model._prepare_timestep(timestep, batch_size, input_dtype,
                                                                           **merged_args)
    merged_args["prompt_timestep"] = prompt_timestep
    context, attention_mask = model._prepare_context(context, batch_size, x, attention_mask)
    attention_mask = model._prepare_attention_mask(attention_mask, input_dtype)
    pe = model._prepare_positional_embeddings(pixel_coords, frame_rate, input_dtype)
    if model._build_guide_self_attention_mask(x, transformer_options, merged_args) is not None:
        raise ValueError("Multi-GPU sampling does not take keyframe guide attention yet; sample this latent "
                         "on one GPU")

    video, audio = StreamSplit(x[0].shape[1], sp), StreamSplit(x[1].shape[1], sp)
    rank = sp.rank
    v_timestep, a_timestep, cross, v_prompt, a_prompt = timestep
    if cross:
        a_scale_shift, v_scale_shift, a2v_gate, v2a_gate = cross
        cross = [local_timestep(a_scale_shift, audio, rank), local_timestep(v_scale_shift, video, rank),
                 local_timestep(a2v_gate, video, rank), local_timestep(v2a_gate, audio, rank)]
    timestep = [local_timestep(v_timestep, video, rank), local_timestep(a_timestep, audio, rank), cross,
                v_prompt, a_prompt]
    (v_pe, v_cross_pe), (a_pe, a_cross_pe) = pe
    pe = [(local_rope(v_pe, video, rank), local_rope(v_cross_pe, video, rank)),
          (local_rope(a_pe, audio, rank), local_rope(a_cross_pe, audio, rank))]
    # The blocks add into their inputs in place: the slices must not alias the whole streams.
    local_x = [video.local(x[0], rank).clone(), audio.local(x[1], rank).clone()]

    attention.video, attention.audio = video, audio
    attention.inner = transformer_options.get("optimized_attention_override")
    if attention.inner is attention:
        attention.inner = None
    block_options = {**transformer_options, "optimized_attention_override": attention}
    out = model._process_transformer_blocks(local_x, context, attention_mask, timestep, pe,
                                            transformer_options=block_options, self_attention_mask=None,
                                            **merged_args)
    whole = [out[0] if video.splits is None else gather_tokens(out[0], 1, video.splits, sp),
             out[1] if audio.splits is None else gather_tokens(out[1], 1, audio.splits, sp)]
    return model._process_output(whole, embedded_timestep, keyframe_idxs, **merged_args)
