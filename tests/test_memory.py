import math

import pytest

from quant import ltx2, memory, runtime, weights
from quant.capability import Capability
from quant.memory import GIB
from quant.outliers import NONE, Outliers
from quant.policies import POLICIES

# Peak VRAM (GiB, torch.cuda.max_memory_allocated over an 8-step run) measured by
# `bench/bench_model.py` through ComfyUI v0.20.1 on an NVIDIA H200, 2026-11-27: the "48 blocks" and "8 blocks"
# tables of docs/benchmarks/log/01-linear-layers-and-full-model.md. Model: LTX-2.3 widths, text connectors cut to
# one layer.
# "core bf16" is ComfyUI core with bf16 weights, i.e. the bf16 policy. Key: (blocks, policy, width, height).
MEASURED_PEAK_GIB = {
    # "48 blocks (19.24 B parameters, the real depth)"
    (48, "bf16", 768, 512): 36.5, (48, "bf16", 1536, 1024): 38.2,
    (48, "fp8-scaled-mm", 768, 512): 19.3, (48, "fp8-scaled-mm", 1536, 1024): 21.0,
    (48, "nvfp4", 768, 512): 11.7, (48, "nvfp4", 1536, 1024): 13.5,
    # 48 blocks, the rerun after the host-overhead change (6,144 tokens only)
    (48, "mxfp8", 768, 512): 19.3, (48, "fp8-cast", 768, 512): 19.3,
    # "8 blocks, every mode (3.77 B parameters)"
    (8, "bf16", 768, 512): 7.7, (8, "bf16", 1536, 1024): 9.4,
    (8, "fp8-cast", 768, 512): 4.8, (8, "fp8-cast", 1536, 1024): 6.5,
    (8, "fp8-scaled-mm", 768, 512): 4.8, (8, "fp8-scaled-mm", 1536, 1024): 6.5,
    (8, "mxfp8", 768, 512): 4.8, (8, "mxfp8", 1536, 1024): 6.5,
    (8, "nvfp4", 768, 512): 3.6, (8, "nvfp4", 1536, 1024): 5.3,
}
FRAMES = 121


def bench_config(blocks: int) -> dict:
    return dict(ltx2.LTX23_CONFIG, num_layers=blocks, connector_num_layers=1)  # as bench_model.py builds it


# The peaks above were measured with the text connectors resident (before text_connectors_on_cpu).
MEASURED_WITH_CONNECTORS_ON_GPU = {"text_connectors_on_cpu": False}


@pytest.mark.parametrize("blocks,policy,width,height", sorted(MEASURED_PEAK_GIB))
def test_estimate_within_15_percent_of_measured_peak(blocks, policy, width, height):
    measured = MEASURED_PEAK_GIB[(blocks, policy, width, height)]
    estimate = memory.estimate_vram(policy, width, height, FRAMES, config=bench_config(blocks),
                                    **MEASURED_WITH_CONNECTORS_ON_GPU)
    assert estimate.phase == "sampling"
    assert abs(estimate.total_bytes / GIB / measured - 1) <= 0.15, (estimate.as_gib(), measured)


@pytest.mark.parametrize("blocks,policy", sorted({(b, p) for b, p, w, _ in MEASURED_PEAK_GIB if w == 1536}))
def test_activation_growth_within_15_percent_of_measured(blocks, policy):
    """Weights dominate the peak; the difference between the two sizes isolates the activation term."""
    measured = MEASURED_PEAK_GIB[(blocks, policy, 1536, 1024)] - MEASURED_PEAK_GIB[(blocks, policy, 768, 512)]
    small, large = (memory.estimate_vram(policy, w, h, FRAMES, config=bench_config(blocks),
                                         **MEASURED_WITH_CONNECTORS_ON_GPU)
                    for w, h in ((768, 512), (1536, 1024)))
    estimated = (large.total_bytes - small.total_bytes) / GIB
    assert abs(estimated / measured - 1) <= 0.15, (estimated, measured)


# Same card and ComfyUI (docs/BENCHMARKS.md, "Peak VRAM and the estimator"): the release's 8-layer text
# connectors, streamed from host memory (the loader's default), 768x512x121. Key: (policy, scope items).
MEASURED_STREAMED_PEAK_GIB = {("nvfp4", ()): 11.5, ("fp8-cast", ()): 18.9, ("nvfp4", (("audio_8bit", True),)): 13.2}


@pytest.mark.parametrize("policy,scope", sorted(MEASURED_STREAMED_PEAK_GIB))
def test_estimate_with_streamed_text_connectors_within_5_percent_of_measured(policy, scope):
    measured = MEASURED_STREAMED_PEAK_GIB[(policy, scope)]
    estimate = memory.estimate_vram(policy, 768, 512, FRAMES, scope=dict(scope), config=dict(ltx2.LTX23_CONFIG))
    assert abs(estimate.total_bytes / GIB / measured - 1) <= 0.05, (estimate.as_gib(), measured)


def test_tokens_follow_the_latent_shapes():
    estimate = memory.estimate_vram("bf16", 768, 512, 121)
    assert estimate.video_tokens == 6144  # ltx2.md: 121 frames at 768x512
    assert estimate.audio_tokens == 127  # ComfyUI: ceil(121 / 24 * 25)
    assert memory.estimate_vram("bf16", 1536, 1024, 121).video_tokens == 24576


def test_weights_come_from_the_policy_plan():
    for name in ("bf16", "fp8-cast", "fp8-scaled-mm", "nvfp4"):
        assert memory.estimate_vram(name, 768, 512, 121, text_connectors_on_cpu=False).weight_bytes == \
            memory.planned_bytes(name)
        assert memory.estimate_vram(name, 768, 512, 121).weight_bytes == \
            memory.planned_bytes(name, text_connectors_on_cpu=True)
    bf16 = memory.planned_bytes("bf16")
    assert bf16 == 2 * sum(math.prod(s) for s in ltx2.model_shapes(ltx2.LTX23_CONFIG).values())
    # Ada/Hopper hold MXFP8 re-blocked to per-row FP8: the size of fp8-scaled-mm, less than its file.
    mxfp8 = memory.estimate_vram("mxfp8", 768, 512, 121, text_connectors_on_cpu=False).weight_bytes
    assert mxfp8 == memory.planned_bytes("fp8-scaled-mm", {"policy_scope": False}) < memory.planned_bytes("mxfp8")
    # Keeping blocks in bf16 costs memory; the scope reaches the plan.
    kept = memory.estimate_vram("nvfp4", 768, 512, 121, scope={"keep_first_blocks": 2, "keep_last_blocks": 2},
                                text_connectors_on_cpu=False)
    assert kept.weight_bytes == memory.planned_bytes("nvfp4", {"keep_first_blocks": 2, "keep_last_blocks": 2})
    assert memory.planned_bytes("nvfp4") < kept.weight_bytes < bf16


def test_weight_expanded_per_call_adds_at_small_sizes():
    """fp8-cast and NVFP4 expand one layer's weight per call; at few tokens that temporary sets the peak."""
    small = {name: memory.estimate_vram(name, 256, 256, 9, nvfp4_mode=mode).activation_bytes
             for name, mode in (("bf16", "fast"), ("fp8-cast", "fast"), ("fp8-scaled-mm", "fast"))}
    exact = memory.estimate_vram("nvfp4", 256, 256, 9, nvfp4_mode="exact").activation_bytes
    fast = memory.estimate_vram("nvfp4", 256, 256, 9, nvfp4_mode="fast").activation_bytes
    ffn_weight = 16384 * 4096
    assert small["fp8-cast"] - small["bf16"] > 0.9 * 2 * ffn_weight  # a bf16 copy of the FFN weight
    assert exact - small["bf16"] > 0.9 * 2 * ffn_weight
    # fp8-scaled-mm runs its few-token layers weight-only: its largest temporary is the audio FFN in bf16.
    audio_ffn_weight = 8192 * 2048
    assert 0.9 * ffn_weight < fast - (small["fp8-scaled-mm"] - 2 * audio_ffn_weight) < 1.1 * ffn_weight  # FP8 copy


def test_two_stage_adds_the_upsampler_phase():
    assert abs(memory.upsampler_bytes() / 1e9 - 1.0) < 0.05  # the released file is ~1 GB in bf16 (ltx2.md)
    one = memory.estimate_vram("fp8-scaled-mm", 768, 512, 121)
    two = memory.estimate_vram("fp8-scaled-mm", 768, 512, 121, two_stage=True)
    assert two.phase == "upsampling" and two.weight_bytes == one.weight_bytes + memory.upsampler_bytes()
    assert two.total_bytes > one.total_bytes
    # At 24,576 tokens the stage-2 activations outweigh the upsampler.
    big = memory.estimate_vram("fp8-scaled-mm", 1536, 1024, 121, two_stage=True)
    assert big.phase == "sampling"
    assert big.total_bytes == memory.estimate_vram("fp8-scaled-mm", 1536, 1024, 121).total_bytes


@pytest.mark.parametrize("width,height,frames,two_stage,needle", [
    (768, 512, 120, False, "frames must be 8k+1 (e.g. 113 or 121), got 120"),
    (700, 512, 121, False, "width must be a multiple of 32, got 700 (e.g. 672 or 704)"),
    (768, 544, 121, True, "height must be a multiple of 64 for the two-stage flow, got 544 (e.g. 512 or 576)"),
])
def test_bad_sizes_are_refused(width, height, frames, two_stage, needle):
    with pytest.raises(ValueError) as err:
        memory.estimate_vram("bf16", width, height, frames, two_stage=two_stage)
    assert needle in str(err.value)


CPU = Capability("cpu", None, False)


def answer(policy="auto", width=768, height=512, frames=121, read_errors=(), **options):
    video = {k: v for k, v in (("width", width), ("height", height), ("frames", frames)) if v is not None}
    return memory.estimate_answer(policy, video, capability=CPU, free_bytes=None, auto_headroom_bytes=6 * GIB,
                                  read_errors=read_errors, **options)


def test_answer_matches_the_estimator():
    got = answer(policy="nvfp4", width=768, height=512, frames=121, two_stage=False)
    expected = memory.estimate_vram("nvfp4", 768, 512, 121).as_gib()
    assert got["errors"] == [] and got["policy"] == "nvfp4" and got["phase"] == "sampling"
    assert {k: got[k] for k in expected} == expected
    assert got["video_tokens"] == 6144
    two = answer(policy="nvfp4", width=768, height=512, frames=121, two_stage=True)
    assert two["total_gib"] == memory.estimate_vram("nvfp4", 768, 512, 121, two_stage=True).as_gib()["total_gib"]


def test_answer_lists_every_bad_value():
    unread = "height must be a whole number from 1 to 16,384, got 'abc'"  # the route's reading of the text
    got = answer(policy="int3", width=700, height=None, frames=120, read_errors=[unread])
    assert got["total_gib"] is None and got["weights_gib"] is None
    assert got["errors"] == [unread, f"unknown policy 'int3'; choose one of: auto, {', '.join(POLICIES)}"]
    assert answer(policy="bf16", width=0, frames=16385)["errors"] == [
        "width must be a whole number from 1 to 16,384, got 0",
        "frames must be a whole number from 1 to 16,384, got 16385"]
    got = answer(policy="bf16", width=700, height=512, frames=120, two_stage=False)
    assert got["errors"] == ["frames must be 8k+1 (e.g. 113 or 121), got 120",
                             "width must be a multiple of 32, got 700 (e.g. 672 or 704)"]
    got = answer(policy="bf16", width=768, height=544, frames=121, two_stage=True)
    assert got["errors"] == ["height must be a multiple of 64 for the two-stage flow, got 544 (e.g. 512 or 576)"]
    assert answer(policy="nvfp4", width=768, height=512, frames=121, nvfp4_mode="fastest")["errors"] == [
        "unknown nvfp4_mode 'fastest'; choose one of: fast, exact"]


def test_auto_resolves_like_the_loader():
    hopper = Capability("cuda", (9, 0), True)

    def auto(capability, free_gib, **options):
        return memory.estimate_answer("auto", {"width": 768, "height": 512, "frames": 121}, capability=capability,
                                      free_bytes=None if free_gib is None else free_gib * GIB,
                                      auto_headroom_bytes=6 * GIB, **options)
    roomy = auto(hopper, 80)
    assert roomy["policy"] == "fp8-scaled-mm" and "fits" in roomy["auto_reason"]
    tight = auto(hopper, 22)  # fp8 19.3 + 6 does not fit
    assert tight["policy"] == "nvfp4"
    assert tight["total_gib"] == memory.estimate_vram("nvfp4", 768, 512, 121).as_gib()["total_gib"]
    on_cpu = auto(CPU, None)
    assert on_cpu["policy"] == "bf16" and on_cpu["auto_reason"].startswith("cpu")
    # 26 GiB free: fp8-scaled-mm's 19.3 GiB of resident weights + 6 fit while the text connectors
    # stream from host memory (the default), not with them on the GPU (23.0 + 6).
    assert auto(hopper, 26)["policy"] == "fp8-scaled-mm"
    assert auto(hopper, 26, text_connectors_on_cpu=False)["policy"] == "nvfp4"


def test_text_connectors_on_cpu_leave_the_resident_weights():
    """The release's connectors (8 layers each, bf16 unless the scope quantizes them) are ~3.7 GiB of
    the resident weights; kept in host memory (the loader's default) they leave the estimate, and
    nothing else changes (they never run during a denoising step)."""
    config = ltx2.LTX23_CONFIG
    shapes = ltx2.model_shapes(config)
    streamed = [k for k in shapes if ltx2.tensor_runs_once_per_prompt(k, config)]
    assert streamed and all(k.startswith(("video_embeddings_connector.transformer_1d_blocks.",
                                          "audio_embeddings_connector.transformer_1d_blocks.")) for k in streamed)
    assert not ltx2.tensor_runs_once_per_prompt("video_embeddings_connector.learnable_registers", config)
    connector_bytes = 2 * sum(math.prod(shapes[k]) for k in streamed)
    assert 3.5 * GIB < connector_bytes < 4 * GIB
    for policy in ("bf16", "fp8-cast", "nvfp4"):
        on_gpu = memory.estimate_vram(policy, 768, 512, 121, text_connectors_on_cpu=False)
        on_cpu = memory.estimate_vram(policy, 768, 512, 121)
        assert on_gpu.weight_bytes - on_cpu.weight_bytes == connector_bytes
        assert (on_cpu.activation_bytes, on_cpu.overhead_bytes) == (on_gpu.activation_bytes, on_gpu.overhead_bytes)
    # Quantized by the scope, they still leave the estimate: their 8-bit size.
    scope = {"connectors": True}
    quantized = (memory.estimate_vram("fp8-scaled-mm", 768, 512, 121, scope=scope, text_connectors_on_cpu=False)
                 .weight_bytes - memory.estimate_vram("fp8-scaled-mm", 768, 512, 121, scope=scope).weight_bytes)
    assert connector_bytes / 2.1 < quantized < connector_bytes / 1.9
    # The web widget's query carries the option (default on).
    off = answer(policy="nvfp4", width=768, height=512, frames=121, text_connectors_on_cpu=False)
    assert off["weights_gib"] == on_gpu_gib("nvfp4")
    assert answer(policy="nvfp4", width=768, height=512, frames=121)["weights_gib"] == \
        memory.estimate_vram("nvfp4", 768, 512, 121).weight_bytes / GIB


def on_gpu_gib(policy: str) -> float:
    return memory.estimate_vram(policy, 768, 512, 121, text_connectors_on_cpu=False).weight_bytes / GIB


def test_caption_projection_streams_only_where_it_runs_before_the_connectors():
    """LTX-2.3 projects the caption before the connectors (once per prompt); LTX-2.0 projects the
    context inside every step, so its projection stays resident."""
    assert ltx2.runs_once_per_prompt("caption_projection.linear_1", caption_proj_before_connector=True)
    assert ltx2.runs_once_per_prompt("audio_caption_projection.linear_1", caption_proj_before_connector=True)
    assert not ltx2.runs_once_per_prompt("caption_projection.linear_1", caption_proj_before_connector=False)
    assert ltx2.runs_once_per_prompt("audio_embeddings_connector.transformer_1d_blocks.7.attn1.k_norm", False)
    for module in ("video_embeddings_connector", "transformer_blocks.0.attn2.to_k", "adaln_single.linear",
                   "my_video_embeddings_connector.x"):
        assert not ltx2.runs_once_per_prompt(module, True)


# Outlier handling (quant.outliers) on the LTX-2.3 release's shapes: what each option adds.
def _own_format_block_linears(policy_name: str, weight_only: bool | None = None) -> list[tuple[int, int]]:
    """The (N, K) of the Linears a policy's outlier handling applies to: its own-format block Linears
    (only those that run weight-only, or only the others, if `weight_only` says)."""
    policy = POLICIES[policy_name]
    _, decisions, _ = memory.weight_plan(policy_name)
    return [d.shape for d in decisions if d.changed and ltx2.BLOCK_LINEAR_RE.match(d.layer)
            and d.target_format == policy.weight_format and weight_only in (None, d.weight_only)]


def _branch_cap_bytes(fmt: str, shapes, fraction: float) -> int:
    """Each branch at the largest rank `fraction` of its layer's quantized bytes pays for, r x K + N x r bf16."""
    total = 0
    for n, k in shapes:
        rank = int(fraction * weights.storage_nbytes(fmt, (n, k)) // ((n + k) * 2))
        total += rank * (n + k) * 2
    return total


@pytest.mark.parametrize("policy", ["int8-convrot", "nvfp4", "fp8-scaled-mm"])
def test_outlier_tensors_add_their_bytes_to_the_weights(policy):
    shapes = _own_format_block_linears(policy)
    assert len(shapes) >= 48 * 20  # every block's Linears (fp8-scaled-mm keeps 3 per block bf16)
    base = memory.planned_bytes(policy)
    smooth = memory.planned_bytes(policy, handling=Outliers(smooth_alpha=0.5))
    assert smooth - base == sum(2 * k for _, k in shapes)  # pre_quant_scale: K bf16 per layer
    fmt = POLICIES[policy].weight_format
    branch = memory.planned_bytes(policy, handling=Outliers(low_rank_bytes=0.1))
    assert branch - base == _branch_cap_bytes(fmt, shapes, 0.1)
    # bounded by the cap: at most a tenth of those layers' quantized bytes, and not far below it
    quantized = sum(weights.storage_nbytes(fmt, s) for s in shapes)
    assert 0.09 * quantized < branch - base <= 0.1 * quantized
    both = memory.planned_bytes(policy, handling=Outliers(0.5, 0.1))
    assert both - base == (smooth - base) + (branch - base)
    # the estimate's resident weights grow by the same bytes
    video = (768, 512, FRAMES)
    plain = memory.estimate_vram(policy, *video)
    assert memory.estimate_vram(policy, *video, handling=Outliers(0.5, 0.1)).weight_bytes - plain.weight_bytes == both - base


def test_outlier_call_temporaries_follow_the_path():
    rows, shape = 100, (48, 64)
    # The INT8 and FP8 activation kernels fuse x * pre_quant_scale; the 16-bit expansion and native NVFP4
    # paths take a copy of the input; the reference applies both in its own math.
    assert runtime.outlier_call_bytes("int8-rowwise", shape, True, 0, rows) == 0
    assert runtime.outlier_call_bytes("fp8-rowwise", shape, True, 0, rows) == 0
    assert runtime.outlier_call_bytes("nvfp4-jit-bf16", shape, True, 0, rows) == rows * 64 * 2
    assert runtime.outlier_call_bytes("nvfp4-native", shape, True, 0, rows) == rows * 64 * 2
    assert runtime.outlier_call_bytes("reference", shape, True, 5, rows) == 0
    # the branch: rows x r intermediate, its rows x N output and the sum
    assert runtime.outlier_call_bytes("int8-rowwise", shape, True, 5, rows) == rows * (5 + 2 * 48) * 2
    assert runtime.outlier_call_bytes("nvfp4-jit-bf16", shape, True, 5, rows) == rows * (64 + 5 + 2 * 48) * 2


def test_outlier_temporaries_add_to_the_activation_peak():
    width, height = 768, 512
    rows = max(memory.sampling.video_tokens(width, height, FRAMES), memory.audio_tokens(FRAMES, 24.0),
               memory.TEXT_TOKENS)
    shapes = _own_format_block_linears("nvfp4")

    def activations(mode: str, handling: Outliers) -> int:
        return memory.estimate_vram("nvfp4", width, height, FRAMES, nvfp4_mode=mode, handling=handling).activation_bytes

    # fast on an FP8 GPU: nvfp4-jit-fp8, whose FP8 quantizer applies the smoothing, except on the layers
    # that read few tokens (weight-only, nvfp4-jit-bf16): the widest of those takes a copy of its input
    weight_only = _own_format_block_linears("nvfp4", weight_only=True)
    assert weight_only and max(k for _, k in weight_only) < max(k for _, k in shapes)
    assert activations("fast", Outliers(smooth_alpha=0.5)) - activations("fast", NONE) == rows * 2 * max(
        k for _, k in weight_only)
    # exact: nvfp4-jit-bf16 multiplies a copy of the input, the widest one (the FFN down-projection's)
    exact = activations("exact", NONE)
    assert activations("exact", Outliers(smooth_alpha=0.5)) - exact == rows * max(k for _, k in shapes) * 2
    # the branch's temporaries at the rank cap, the largest of any layer
    fmt = weights.NVFP4

    def per_row(n, k, smoothed):
        rank = int(0.1 * weights.storage_nbytes(fmt, (n, k)) // ((n + k) * 2))
        return (k if smoothed else 0) + (rank + 2 * n if rank else 0)
    assert activations("fast", Outliers(low_rank_bytes=0.1)) - activations("fast", NONE) == rows * 2 * max(
        per_row(n, k, False) for n, k in shapes)
    assert activations("exact", Outliers(0.5, 0.1)) - exact == rows * 2 * max(per_row(n, k, True) for n, k in shapes)


def test_auto_weighs_the_outlier_tensors():
    """The estimate route's `auto` sizes each policy with the branch: a GPU whose free memory fits
    fp8-scaled-mm without it, and not with it, gets the next smaller policy."""
    sizes = {name: memory.planned_bytes(name, text_connectors_on_cpu=True) for name in POLICIES}
    branch = memory.planned_bytes("fp8-scaled-mm", text_connectors_on_cpu=True, handling=Outliers(low_rank_bytes=0.5))
    free = (sizes["fp8-scaled-mm"] + branch) // 2 + 6 * GIB
    video = {"width": 768, "height": 512, "frames": 121}
    hopper = Capability("cuda", (9, 0), True)

    def auto(handling):
        return memory.estimate_answer("auto", video, capability=hopper, free_bytes=free, auto_headroom_bytes=6 * GIB,
                                      handling=handling)["policy"]
    assert auto(NONE) == "fp8-scaled-mm"
    assert auto(Outliers(low_rank_bytes=0.5)) == "nvfp4"
