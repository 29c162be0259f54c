"""Path selection, the CPU reference path, the MXFP8 re-blocking claim, and the Blackwell paths'
tensor plumbing (through an emulated block-scaled GEMM, since no Blackwell card is available)."""

import pytest
import torch

from quant import formats, ltx2, runtime
from quant.capability import Capability
from quant.comfy_quant import layer_conf
from quant.modes import Activation, layer_activation
from quant.policies import POLICIES, plan
from quant.reference import reference_linear, relative_error
from quant.weights import FORMATS, FP8_ROWWISE, FP8_TENSOR, INT8, INT8_CONVROT, MXFP8, NVFP4, quantize_weight

CPU = Capability("cpu", None, False)
HOPPER = Capability("cuda", (9, 0), True)
HOPPER_NO_TRITON = Capability("cuda", (9, 0), False)
GENERATIONS = {"cpu": CPU, **{f"sm_{major}{minor}": Capability("cuda", (major, minor), True)
                              for major, minor in ((7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0))}}
NATIVE = hasattr(torch.nn.functional, "scaled_mm")  # Blackwell's block-scaled GEMMs need it
PRE_FP8, FP8_GPUS, BLACKWELL = ("sm_75", "sm_80", "sm_86"), ("sm_89", "sm_90"), ("sm_100", "sm_120")


def _expected_video_path(policy: str, mode: str, gpu: str) -> str:
    """The path a video-token block Linear (many tokens: W8A8/W4A4 where the GPU can) takes."""
    if gpu == "cpu":
        return "reference"
    family = "pre" if gpu in PRE_FP8 else "fp8" if gpu in FP8_GPUS else "blackwell"
    if family == "blackwell" and not NATIVE:
        family = "fp8"
    return {
        "fp8-cast": "bf16-dequant",
        "fp8-scaled-mm": {"pre": "bf16-dequant"}.get(family, "fp8-rowwise"),
        "int8-scaled-mm": "int8-rowwise", "int8-convrot": "int8-rowwise",
        "mxfp8": {"pre": "bf16-dequant", "fp8": "mxfp8-as-fp8", "blackwell": "mxfp8-native"}[family],
        "nvfp4": "nvfp4-jit-bf16" if mode == "exact" else
                 {"pre": "nvfp4-jit-bf16", "fp8": "nvfp4-jit-fp8", "blackwell": "nvfp4-native"}[family],
    }[policy]


# Few-token layers (audio stream, text keys/values) run weight-only under every policy.
WEIGHT_ONLY_PATH = {FP8_ROWWISE: "bf16-dequant", FP8_TENSOR: "bf16-dequant", MXFP8: "bf16-dequant",
                    INT8: "bf16-dequant", INT8_CONVROT: "bf16-dequant", NVFP4: "nvfp4-jit-bf16"}


def _planned_paths(policy: str, mode: str, cap: Capability) -> dict[str, str]:
    """Every quantized layer of a tiny LTX-2.3 model -> the path our ops would take, from the policy's
    plan and the per-layer config the loader writes (no hand-picked arguments)."""
    config = ltx2.tiny_config(num_layers=2, heads=4, head_dim=16, audio_heads=4, audio_head_dim=16)
    layers = [(key[: -len(".weight")], shape, "BF16", 0) for key, shape in ltx2.model_shapes(config).items()
              if key.endswith(".weight")]
    paths = {}
    for decision in plan(POLICIES[policy], layers, config["num_layers"]):
        if decision.changed:
            conf = layer_conf(decision)
            paths[decision.layer] = runtime.choose_path(decision.target_format, layer_activation(conf, mode), cap,
                                                        decision.shape)[0]
    return paths


@pytest.mark.parametrize("gpu", list(GENERATIONS))
@pytest.mark.parametrize("policy,mode", [(name, "fast") for name in POLICIES if name != "bf16"] + [("nvfp4", "exact")])
def test_every_policy_on_every_generation(policy, mode, gpu):
    """The dispatch table: each policy's layers on each GPU generation, through policies.plan(). No
    CUDA GPU ever runs the fp32 reference."""
    paths = _planned_paths(policy, mode, GENERATIONS[gpu])
    assert paths
    video = "transformer_blocks.0.attn1.to_q"
    assert paths[video] == _expected_video_path(policy, mode, gpu)
    few_tokens = "transformer_blocks.0.audio_attn1.to_q"
    if few_tokens in paths:  # fp8-scaled-mm keeps some layers in bf16, never this one
        fmt = POLICIES[policy].weight_format
        assert paths[few_tokens] == ("reference" if gpu == "cpu" else WEIGHT_ONLY_PATH[fmt])
    if gpu != "cpu":
        assert "reference" not in paths.values()


@pytest.mark.parametrize("fmt,activation,cap,expected", [
    (FP8_ROWWISE, "fp8", HOPPER, "fp8-rowwise"),
    (FP8_TENSOR, "fp8", GENERATIONS["sm_89"], "fp8-rowwise"),
    (MXFP8, "none", HOPPER, "bf16-dequant"),  # a weight-only (few-token) MXFP8 layer
    (NVFP4, "nvfp4", HOPPER_NO_TRITON, "nvfp4-jit-bf16"),  # the FP8 expansion kernel is Triton
    (INT8, "int8", HOPPER_NO_TRITON, "bf16-dequant"),
    (INT8_CONVROT, "int8", GENERATIONS["sm_75"], "int8-rowwise"),
    (MXFP8, "fp8", CPU, "reference"),
])
def test_choose_path(fmt, activation, cap, expected):
    path, reason, _ = runtime.choose_path(fmt, activation, cap, (4096, 4096))
    assert path == expected
    assert reason  # every choice says why


def test_fallbacks_say_why():
    """A W8A8 policy on a GPU without FP8 tensor cores runs weight-only and the reason names the cause."""
    path, reason, _ = runtime.choose_path(FP8_ROWWISE, "fp8", GENERATIONS["sm_86"], (4096, 4096))
    assert path == "bf16-dequant" and "fp8 activations not run here" in reason and "sm_89" in reason
    path, reason, _ = runtime.choose_path(INT8, "int8", HOPPER_NO_TRITON, (4096, 4096))
    assert path == "bf16-dequant" and "Triton" in reason


def test_odd_shapes_avoid_scaled_mm():
    path, reason, _ = runtime.choose_path(FP8_ROWWISE, "fp8", HOPPER, (4096, 100))
    assert path == "bf16-dequant" and "16" in reason


def test_every_path_declares_its_costs():
    """quant.memory reads each path's per-call temporaries; the registry's names are unique and every
    format has a path on every CUDA generation for weight-only use."""
    names = [path.name for path in runtime.PATHS] + [runtime.REFERENCE.name]
    assert len(names) == len(set(names))
    for path in runtime.PATHS:
        assert path.expanded_bytes_per_weight in (0, 1, 2) and path.summary
        assert not path.quantizes_input or path.expanded_bytes_per_weight <= 1
    for cap in GENERATIONS.values():
        for fmt in FORMATS:
            runtime.choose_path(fmt, Activation.NONE, cap, (64, 64))


def test_weight_only_layers_choose_exact_paths():
    """A layer whose config asks for full-precision matmuls never quantizes its input: NVFP4 goes
    exact whatever the model's mode; FP8, MXFP8 and INT8 expand to 16 bits."""
    for fmt, expected in ((NVFP4, "nvfp4-jit-bf16"), (MXFP8, "bf16-dequant"), (FP8_ROWWISE, "bf16-dequant"),
                          (INT8, "bf16-dequant")):
        activation = layer_activation({"format": fmt, "full_precision_matrix_mult": True}, "fast")
        assert activation == Activation.NONE
        assert runtime.choose_path(fmt, activation, HOPPER, (4096, 4096))[0] == expected, fmt


def test_weight_only_mxfp8_runs_the_reblocked_weight_in_bf16():
    """bf16-dequant of an MXFP8 layer: prepare() re-blocks to per-row FP8 and run() dequantizes it;
    the result is the exact MXFP8 weight times a bf16 input."""
    torch.manual_seed(4)
    w, bias, x = torch.randn(64, 256) * 0.05, torch.randn(64), torch.randn(3, 256).bfloat16()
    qw = quantize_weight(w, MXFP8)
    tensors = runtime.prepare(qw, "bf16-dequant", "cpu")
    assert tensors["weight"].dtype == torch.float8_e4m3fn and tensors["weight_scale"].shape == (1, 64)
    y = runtime.run(x, "bf16-dequant", tensors, (64, 256), bias, MXFP8, "none")
    assert relative_error(y.float(), reference_linear(x, qw, bias, "none")) < 8e-3  # bf16 weight and output
    assert runtime.stored_form("bf16-dequant", tensors, MXFP8, (64, 256)).format == FP8_ROWWISE


def test_unknown_nvfp4_mode():
    with pytest.raises(ValueError, match="nvfp4 mode"):
        layer_activation({"format": NVFP4}, "turbo")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("activation", list(Activation))
def test_cpu_reference_path_matches_oracle(fmt, activation):
    torch.manual_seed(0)
    w = torch.randn(96, 256) * 0.08
    bias = torch.randn(96)
    qw = quantize_weight(w, fmt)
    layer = runtime.PreparedLinear(qw, bias, activation, "cpu")
    assert layer.path == "reference"
    # Each format's own W8A8 is emulated; NVFP4 runs weight-only on the CPU, as ComfyUI's CPU path does.
    own = Activation.INT8 if fmt in (INT8, INT8_CONVROT) else Activation.NONE if fmt == NVFP4 else Activation.FP8
    fallback = {Activation.NVFP4: own if own == Activation.FP8 else Activation.NONE}
    assert layer.activation == (activation if activation in (Activation.NONE, own) else
                                fallback.get(activation, Activation.NONE))
    x = torch.randn(2, 7, 256).bfloat16()
    y = layer(x)
    assert y.shape == (2, 7, 96) and y.dtype == torch.bfloat16
    assert relative_error(y.float(), reference_linear(x, qw, bias, layer.activation)) < 4e-3  # bf16 output rounding


def test_mxfp8_reblock_is_exact_except_underflow():
    """Folding 1x32 E8M0 scales into per-row power-of-two FP8 changes nothing but elements that fall
    below E4M3's smallest subnormal relative to the row's largest block."""
    torch.manual_seed(1)
    w = torch.randn(64, 256)
    w[:, :32] *= 1e-3  # blocks far smaller than the row max: some elements underflow
    qw = quantize_weight(w, MXFP8)
    tensors = runtime.prepare(qw, "mxfp8-as-fp8", "cpu")
    reblocked = tensors["weight"].float() * tensors["weight_scale"].reshape(-1, 1)
    exact = qw.dequantize()
    assert relative_error(reblocked, exact) < 1e-4
    big = w.abs() > w.abs().amax(dim=1, keepdim=True) * 2.0 ** -8  # not near underflow
    assert torch.equal(reblocked[big], exact[big])
    assert tensors["weight_scale"].log2().frac().eq(0).all()  # row scales are powers of two


def _emulated_scaled_mm(a, b, scale_a, recipe_a, scale_b, recipe_b, swizzle_a=None, swizzle_b=None,
                        bias=None, output_dtype=torch.bfloat16, **_):
    """What cuBLAS computes for BlockWise1x32 (E8M0) and [BlockWise1x16, TensorWise] (NVFP4),
    with SWIZZLE_32_4_4 block scales, written from the layout spec (our unswizzle)."""
    from torch.nn.functional import ScalingType

    def decode(mat, scales, recipe, rows, k):
        if isinstance(recipe, list):  # NVFP4: packed e2m1 (rows, k/2), e4m3 block scales, fp32 global
            packed = mat.view(torch.uint8)
            return formats.dequantize_nvfp4(packed, scales[0].view(torch.float8_e4m3fn),
                                            scales[1], (rows, k))
        assert recipe == ScalingType.BlockWise1x32
        swizzled = scales.view(torch.uint8)
        blocks = formats.unswizzle_scales(swizzled, rows, k // 32)
        return (mat.float().reshape(rows, k // 32, 32) * formats.e8m0_to_float(blocks).unsqueeze(-1)).reshape(rows, k)

    b_rows = b.t()  # b arrives as (K, N) view of an (N, K) weight
    packed = isinstance(recipe_a, list)
    k = a.shape[1] * (2 if packed else 1)
    a_full = decode(a, scale_a, recipe_a, a.shape[0], k)
    b_full = decode(b_rows, scale_b, recipe_b, b_rows.shape[0], k)
    return (a_full @ b_full.t()).to(output_dtype)


@pytest.mark.parametrize("fmt,path,activation", [(MXFP8, "mxfp8-native", "fp8"), (NVFP4, "nvfp4-native", "nvfp4")])
def test_blackwell_paths_pass_the_right_layouts(monkeypatch, fmt, path, activation):
    if not hasattr(torch.nn.functional, "scaled_mm"):
        pytest.skip("this torch has no torch.nn.functional.scaled_mm")
    monkeypatch.setattr(torch.nn.functional, "scaled_mm", _emulated_scaled_mm)
    torch.manual_seed(2)
    w = torch.randn(160, 96) * 0.1  # rows not a multiple of 128: padded swizzle tiles
    bias = torch.randn(160)
    qw = quantize_weight(w, fmt)
    tensors = runtime.prepare(qw, path, "cpu")
    x = torch.randn(37, 96)
    y = runtime.run(x.bfloat16(), path, tensors, qw.shape, bias, fmt, activation)
    assert y.shape == (37, 160)
    # Native block-scaled GEMMs quantize activations to the weight's format: compare with that.
    if fmt == MXFP8:
        xa, xs = formats.quantize_mxfp8(x.bfloat16())
        x_deq = formats.dequantize_mxfp8(xa, xs, tuple(x.shape))
    else:
        xp, xs, xg = formats.quantize_nvfp4(x.bfloat16())
        x_deq = formats.dequantize_nvfp4(xp, xs, xg, tuple(x.shape))
    expected = x_deq @ qw.dequantize().t() + bias
    assert relative_error(y.float(), expected) < 5e-3


def test_static_scaled_mm_compiles_once_per_token_count():
    """The static-scale W8A8 path under torch.compile (Compile Blocks): one graph per token count, and
    the compiled result is the eager one. Its cached unit row scales were a dict lookup that Dynamo
    guarded on, so a token count seen after another compiled twice."""
    import torch._dynamo.utils
    torch._dynamo.reset()
    weight = (torch.randn(32, 64) / 8).to(torch.float8_e4m3fn)
    weight_scale, input_scale = torch.full((1, 32), 0.01), torch.tensor(0.02)

    def linear(x):
        return runtime._scaled_mm_rowwise(x, weight, weight_scale, None, input_scale, torch.bfloat16)

    compiled = torch.compile(linear, backend="eager", dynamic=False)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for rows in (16, 16, 24, 24, 16):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        assert torch.equal(compiled(x), linear(x))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 2


@pytest.mark.parametrize("gpu,roomy,tight", [
    ("sm_75", "int8-convrot", "nvfp4"), ("sm_80", "int8-convrot", "nvfp4"), ("sm_86", "int8-convrot", "nvfp4"),
    ("sm_89", "fp8-scaled-mm", "nvfp4"), ("sm_90", "fp8-scaled-mm", "nvfp4"),
    ("sm_100", "nvfp4", "nvfp4"), ("sm_120", "nvfp4", "nvfp4"), ("cpu", "bf16", "bf16"),
])
def test_auto_policy_per_generation(gpu, roomy, tight):
    """`auto` per generation: the fastest policy that fits (weights plus headroom), else the next
    smaller one; the reason names the device and the sizes."""
    from quant import advice, memory
    sizes = {name: memory.planned_bytes(name, text_connectors_on_cpu=True) for name in POLICIES}
    cap = GENERATIONS[gpu]
    gib = 2 ** 30
    name, reason = advice.choose_auto_policy(cap, 80 * gib, sizes, 6 * gib)
    assert name == roomy and cap.describe() in reason
    name, reason = advice.choose_auto_policy(cap, 20 * gib, sizes, 6 * gib)
    assert name == tight, reason
    assert advice.choose_auto_policy(cap, None, sizes, 6 * gib)[0] == roomy
