"""VRAM needed to sample an LTX-2.3 video with a policy: the transformer's resident weights (the
policy's plan over the real shapes), the activation peak of one transformer block at the chosen
size, and fixed overheads. tests/test_memory.py checks it against the peaks bench/bench_model.py
measured through ComfyUI (docs/BENCHMARKS.md).

Scope: the sampling phase (and, two-stage, the latent upsampler) with the transformer resident
(by default without its text connectors, which the loader keeps in host memory: they run once per
prompt; ltx2.runs_once_per_prompt); ComfyUI runs the text encoder and the VAE when the transformer
can be offloaded. Batch size 1,
text-to-video (image conditioning adds a per-token AdaLN embedding before the blocks, smaller than
the feed-forward peak below). Outlier handling (quant.outliers) adds its stored tensors to the weights and
its per-call temporaries to the activation peak, both bounded from above (outlier_bytes, _runtime_layers)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import torch

from . import advice, ltx2, outliers, runtime, sampling, weights
from .advice import GIB
from .capability import Capability
from .modes import NVFP4_MODES, layer_activation
from .comfy_quant import layer_conf
from .policies import POLICIES, LayerDecision, get_policy, plan, summarize
from .safetensors_io import DTYPE_NAMES

BF16 = 2
FP32 = 4
LATENT_CHANNELS = 128  # video latent channels; an audio token is 8 channels x 16 mel bins, also 128
AUDIO_LATENTS_PER_SECOND = 25
# The text context after the connectors is padded to 1,024 tokens (ltx2.md; bench_model.py feeds it).
TEXT_TOKENS = 1024
# Latent-sized fp32 tensors alive on the GPU while the model runs: ComfyUI's sampler keeps the noise,
# the initial latent, x and the last denoised estimate, and the model call adds its scaled input and
# its output (both fp32).
SAMPLER_LATENT_COPIES = 6
# cuBLAS/cuBLASLt workspace that PyTorch allocates through its caching allocator (32 MiB on Hopper).
CUDA_WORKSPACE = 32 * 2 ** 20
# The x2 spatial upsampler of the two-stage flow (ltx-2.3-spatial-upscaler-x2-1.1, ltx2.md): Conv3d
# 128 -> 1024, 4 ResBlocks, Conv2d 1024 -> 4*1024 + PixelShuffle(2), 4 ResBlocks, Conv3d 1024 -> 128,
# all 3x3(x3) kernels with bias, run in bf16.
UPSAMPLER_MID = 1024
UPSAMPLER_BLOCKS_PER_STAGE = 4
# Mid-width tensors alive at once in an upsampler ResBlock at full size (input, conv, norm, SiLU).
UPSAMPLER_LIVE_TENSORS = 4
# Default hardware: an FP8 GPU (Ada/Hopper), where fp8-cast and NVFP4 expand weights per call.
FP8_GPU = Capability("cuda", (9, 0), True)
# ComfyUI's largest width, height and length (its MAX_RESOLUTION, EmptyLTXVLatentVideo's limits).
MAX_VIDEO_SIZE = 16384
VIDEO_SIZE_NAMES = ("width", "height", "frames")


@dataclass(frozen=True)
class VramEstimate:
    policy: str
    phase: str  # the phase that sets the peak: "sampling" or "upsampling"
    video_tokens: int
    audio_tokens: int
    weight_bytes: int  # resident during that phase (the transformer, plus the upsampler there)
    activation_bytes: int
    overhead_bytes: int  # text context and library workspace

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes + self.overhead_bytes

    def as_gib(self) -> dict:
        return {"weights_gib": self.weight_bytes / GIB, "activations_gib": self.activation_bytes / GIB,
                "overhead_gib": self.overhead_bytes / GIB, "total_gib": self.total_bytes / GIB}


def audio_tokens(frames: int, frame_rate: float) -> int:
    """Audio latents of a clip: 25 per second, rounded up (ComfyUI's LTXVEmptyLatentAudio)."""
    return math.ceil(frames / frame_rate * AUDIO_LATENTS_PER_SECOND)


def _stream_widths(config: dict) -> tuple[int, int]:
    return (config["num_attention_heads"] * config["attention_head_dim"],
            config["audio_num_attention_heads"] * config["audio_attention_head_dim"])


def weight_plan(policy_name: str, scope: dict | None = None, config: dict | None = None,
                text_connectors_on_cpu: bool = False, handling: outliers.Outliers = outliers.NONE):
    """(policy, decisions, bytes of the tensors the plan does not cover) for a bf16 transformer of
    `config` (default: the LTX-2.3 release) as the loader would convert it, with the outlier `handling`
    asked; with `text_connectors_on_cpu`, only the tensors that stay on the GPU
    (ltx2.tensor_runs_once_per_prompt are streamed from host memory when they run)."""
    config = config or ltx2.LTX23_CONFIG
    policy = replace(get_policy(policy_name, **(scope or {})), outliers=handling)
    shapes = ltx2.model_shapes(config)
    if text_connectors_on_cpu:
        shapes = {key: shape for key, shape in shapes.items() if not ltx2.tensor_runs_once_per_prompt(key, config)}
    source = DTYPE_NAMES[torch.bfloat16]
    layers = [(key[: -len(".weight")], shape, source, math.prod(shape) * BF16)
              for key, shape in shapes.items() if key.endswith(".weight")]
    other = sum(math.prod(shape) * BF16 for key, shape in shapes.items() if not key.endswith(".weight"))
    return policy, plan(policy, layers, config["num_layers"]), other


def branch_rank_bound(d: LayerDecision) -> int:
    """The largest rank a layer's low-rank branch may get: its byte cap's (the SVD picks at most that)."""
    if not d.outliers.low_rank_bytes:
        return 0
    return outliers.branch_rank_cap(d.shape, weights.storage_nbytes(d.target_format, d.shape), d.outliers.low_rank_bytes)


def outlier_bytes(d: LayerDecision) -> int:
    """The most bytes a layer's outlier tensors take (weights.outlier_specs): pre_quant_scale, K bf16,
    where smoothed (the loader smooths only the layers the calibration file covers), and the low-rank
    branch, r x K + N x r bf16, at branch_rank_bound."""
    if not d.outliers.active:  # also every layer that is not a 2-D Linear
        return 0
    n, k = d.shape
    rank = branch_rank_bound(d)
    return (k * BF16 if d.outliers.smooth_alpha else 0) + rank * (n + k) * outliers.BRANCH_DTYPE.itemsize


def planned_bytes(policy_name: str, scope: dict | None = None, config: dict | None = None,
                  text_connectors_on_cpu: bool = False, handling: outliers.Outliers = outliers.NONE) -> int:
    """The converted transformer's size as the loader's `auto` weighs it: the plan's stored sizes
    (outlier tensors at their bound) plus biases, tables and registers in bf16 (`text_connectors_on_cpu`:
    the part kept on the GPU)."""
    _, decisions, other = weight_plan(policy_name, scope, config, text_connectors_on_cpu, handling)
    return summarize(decisions)["bytes_after"] + sum(map(outlier_bytes, decisions)) + other


def _runtime_layers(decisions, capability: Capability, nvfp4_mode: str, rows: int) -> tuple[int, int, bool, int]:
    """(bytes the quantized layers hold on the GPU, the largest per-call weight temporary, whether
    any layer quantizes its input to 8 or 4 bits, the largest per-call outlier temporary on `rows`
    input rows), from the execution path each layer takes (runtime.ExecutionPath's declared per-call
    costs, runtime.outlier_call_bytes)."""
    held, expanded, w8a8, outlier_call = 0, 0, False, 0
    for d in decisions:
        if not d.changed:
            continue
        conf = layer_conf(d)  # the path our ops choose when they load this layer
        name = runtime.choose_path(d.target_format, layer_activation(conf, nvfp4_mode), capability, d.shape).path
        path = runtime.BY_NAME[name]
        held += weights.storage_nbytes(runtime.resident_format(name, d.target_format), d.shape) + outlier_bytes(d)
        expanded = max(expanded, path.expanded_bytes_per_weight * math.prod(d.shape))
        w8a8 = w8a8 or path.quantizes_input
        outlier_call = max(outlier_call, runtime.outlier_call_bytes(name, d.shape, d.outliers.smooth_alpha > 0,
                                                                    branch_rank_bound(d), rows))
    return held, expanded, w8a8, outlier_call


def upsampler_bytes() -> int:
    conv3d = lambda cin, cout: cin * cout * 27 + cout  # noqa: E731
    norm = 2 * UPSAMPLER_MID  # GroupNorm weight and bias
    res_block = 2 * (conv3d(UPSAMPLER_MID, UPSAMPLER_MID) + norm)
    params = (conv3d(LATENT_CHANNELS, UPSAMPLER_MID) + norm + 2 * UPSAMPLER_BLOCKS_PER_STAGE * res_block
              + UPSAMPLER_MID * 4 * UPSAMPLER_MID * 9 + 4 * UPSAMPLER_MID + conv3d(UPSAMPLER_MID, LATENT_CHANNELS))
    return params * BF16


def estimate_vram(policy: str, width: int, height: int, frames: int, two_stage: bool = False,
                  scope: dict | None = None, nvfp4_mode: str = "fast", config: dict | None = None,
                  capability: Capability = FP8_GPU, frame_rate: float = 24.0,
                  text_connectors_on_cpu: bool = True, handling: outliers.Outliers = outliers.NONE) -> VramEstimate:
    """Peak VRAM of sampling `width` x `height` x `frames` (two-stage: stage 2 at that size after
    stage 1 at half size, and the upsampler between them) with the transformer resident, except,
    with `text_connectors_on_cpu` (the loader's default), the text connectors: they stay in host
    memory and run once per prompt, before the first step, one layer on the GPU at a time. `handling`:
    the outlier handling the model is loaded with."""
    sampling.check_video_shape(width, height, frames, two_stage)
    config = config or ltx2.LTX23_CONFIG
    policy_obj, decisions, other = weight_plan(policy, scope, config, text_connectors_on_cpu, handling)
    tokens, audio = sampling.video_tokens(width, height, frames), audio_tokens(frames, frame_rate)
    # A layer reads video, audio or text rows; its outlier temporaries are bounded at the most of them.
    quantized, expanded, w8a8, outlier_call = _runtime_layers(decisions, capability, nvfp4_mode,
                                                              max(tokens, audio, TEXT_TOKENS))
    model = quantized + sum(d.bytes_after for d in decisions if not d.changed) + other
    v, a = _stream_widths(config)
    ffn = ltx2.block_shapes(config)["ff.net.0.proj.weight"][0]
    latents = SAMPLER_LATENT_COPIES * LATENT_CHANNELS * FP32

    # Alive through every block, per video token: the residual stream (v), the self-attention RoPE
    # cos+sin (v/2 each) and the audio<->video cross-attention RoPE (a/2 each); per audio token the
    # same at audio width. Blocks run one after another, so only one block's temporaries add to it.
    carried = tokens * (BF16 * (2 * v + a) + latents) + audio * (BF16 * 3 * a + latents)
    # The video feed-forward is the largest moment of a block (attention holds q, k, v and its output,
    # 4-6 widths; flash attention adds only a per-row log-sum-exp). While GELU runs: the modulated
    # input, the up-projection and its GELU (both 4v wide). While the down-projection runs: the
    # input, the GELU output, an FP8 copy of it for W8A8, the output, and the expanded weight.
    gelu_moment = tokens * BF16 * (v + 2 * ffn)
    down_moment = tokens * (BF16 * (2 * v + ffn) + (ffn + FP32 if w8a8 else 0)) + expanded
    # One Linear's outlier temporaries live only during its call: added in full to the largest moment,
    # an upper bound wherever that Linear runs.
    activations = carried + max(gelu_moment, down_moment) + outlier_call
    # The conditioning as ComfyUI passes it (fp32) and its bf16 video/audio split.
    overhead = TEXT_TOKENS * (v + a) * (FP32 + BF16) + CUDA_WORKSPACE

    estimate = VramEstimate(policy_obj.name, "sampling", tokens, audio, model, activations, overhead)
    if two_stage:
        # ComfyUI's LTXVLatentUpsampler moves the upsampler onto the GPU next to a resident model.
        upsampling = tokens * (UPSAMPLER_LIVE_TENSORS * UPSAMPLER_MID * BF16 + latents)
        alternative = VramEstimate(policy_obj.name, "upsampling", tokens, audio, model + upsampler_bytes(), upsampling,
                                   overhead)
        estimate = max(estimate, alternative, key=lambda e: e.total_bytes)
    return estimate


def estimate_answer(policy: str, video: Mapping[str, int], *, two_stage: bool = False, nvfp4_mode: str = "fast",
                    text_connectors_on_cpu: bool = True, scope: dict | None = None, capability: Capability,
                    free_bytes: int | None, auto_headroom_bytes: int, read_errors: Sequence[str] = (),
                    handling: outliers.Outliers = outliers.NONE) -> dict:
    """The JSON the web widget shows: the estimate in GiB, or `errors` naming each bad value. `video`
    holds the width, height and frames that were given as whole numbers; `read_errors` says why any
    other was not (listed first). `auto` is resolved the way the loader resolves it on this server's
    device; the estimate is for this server's GPU, or an FP8 GPU when the server has none."""
    answer: dict = {"policy": policy, "auto_reason": None, "errors": list(read_errors),
                    "weights_gib": None, "activations_gib": None, "overhead_gib": None, "total_gib": None}
    for name, value in video.items():
        if not 1 <= value <= MAX_VIDEO_SIZE:
            answer["errors"].append(f"{name} must be a whole number from 1 to {MAX_VIDEO_SIZE:,}, got {value!r}")
    if len(video) == len(VIDEO_SIZE_NAMES) and not answer["errors"]:
        answer["errors"] += sampling.video_shape_errors(video["width"], video["height"], video["frames"], two_stage)
    if policy not in ("auto", *POLICIES):
        answer["errors"].append(f"unknown policy {policy!r}; choose one of: auto, {', '.join(POLICIES)}")
    if nvfp4_mode not in NVFP4_MODES:
        answer["errors"].append(f"unknown nvfp4_mode {nvfp4_mode!r}; choose one of: {', '.join(NVFP4_MODES)}")
    if answer["errors"]:
        return answer
    if policy == "auto":
        sizes = {name: planned_bytes(name, scope, text_connectors_on_cpu=text_connectors_on_cpu, handling=handling)
                 for name in POLICIES}
        answer["policy"], answer["auto_reason"] = advice.choose_auto_policy(capability, free_bytes, sizes,
                                                                            auto_headroom_bytes)
    target = capability if capability.device_type == "cuda" else FP8_GPU
    estimate = estimate_vram(answer["policy"], video["width"], video["height"], video["frames"], two_stage,
                             scope=scope, nvfp4_mode=nvfp4_mode, capability=target,
                             text_connectors_on_cpu=text_connectors_on_cpu, handling=handling)
    answer.update(estimate.as_gib(), phase=estimate.phase, video_tokens=estimate.video_tokens)
    return answer
