"""Path selection, the CPU reference path, the MXFP8 re-blocking claim, and the Blackwell paths'
tensor plumbing (through an emulated block-scaled GEMM, since no Blackwell card is available)."""

import pytest
import torch

from quant import formats, runtime
from quant.reference import reference_linear, relative_error
from quant.weights import FORMATS, FP8_ROWWISE, FP8_TENSOR, MXFP8, NVFP4, quantize_weight

CPU = runtime.Capability("cpu", None, False)
AMPERE = runtime.Capability("cuda", (8, 0), True)
ADA = runtime.Capability("cuda", (8, 9), True)
HOPPER = runtime.Capability("cuda", (9, 0), True)
HOPPER_NO_TRITON = runtime.Capability("cuda", (9, 0), False)


@pytest.mark.parametrize("fmt,activation,cap,mode,expected", [
    (FP8_ROWWISE, "fp8", HOPPER, "fast", "fp8-rowwise"),
    (FP8_TENSOR, "fp8", ADA, "fast", "fp8-rowwise"),
    (FP8_ROWWISE, "none", HOPPER, "fast", "bf16-dequant"),
    (MXFP8, "fp8", HOPPER, "fast", "mxfp8-as-fp8"),
    (MXFP8, "none", HOPPER, "fast", "bf16-dequant"),  # a weight-only (few-token) MXFP8 layer
    (NVFP4, "none", HOPPER, "fast", "nvfp4-jit-fp8"),
    (NVFP4, "none", HOPPER, "exact", "nvfp4-jit-bf16"),
    (NVFP4, "none", HOPPER_NO_TRITON, "fast", "reference"),
    (FP8_ROWWISE, "fp8", AMPERE, "fast", "reference"),
    (MXFP8, "fp8", CPU, "fast", "reference"),
])
def test_choose_path(fmt, activation, cap, mode, expected):
    path, reason = runtime.choose_path(fmt, activation, cap, (4096, 4096), mode)
    assert path == expected
    assert reason  # every choice says why


def test_odd_shapes_avoid_scaled_mm():
    path, reason = runtime.choose_path(FP8_ROWWISE, "fp8", HOPPER, (4096, 100))
    assert path == "bf16-dequant" and "16" in reason


def test_blackwell_uses_native_block_scaled_paths():
    if not hasattr(torch.nn.functional, "scaled_mm"):
        pytest.skip("this torch has no torch.nn.functional.scaled_mm")
    blackwell = runtime.Capability("cuda", (10, 0), True)
    assert runtime.choose_path(MXFP8, "fp8", blackwell, (4096, 4096))[0] == "mxfp8-native"


def test_weight_only_layers_choose_exact_paths():
    """A layer whose config asks for full-precision matmuls never quantizes its input: NVFP4 goes
    exact whatever the model's mode; FP8 and MXFP8 dequantize to bf16."""
    conf = {"full_precision_matrix_mult": True}
    assert runtime.layer_nvfp4_mode(conf, "fast") == "exact"
    assert runtime.layer_nvfp4_mode({}, "fast") == "fast"
    for fmt, expected in ((NVFP4, "nvfp4-jit-bf16"), (MXFP8, "bf16-dequant"), (FP8_ROWWISE, "bf16-dequant")):
        path, _ = runtime.choose_path(fmt, runtime.layer_activation({"format": fmt, **conf}), HOPPER, (4096, 4096),
                                      runtime.layer_nvfp4_mode(conf, "fast"))
        assert path == expected, fmt


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
        runtime.choose_path(NVFP4, "none", HOPPER, (64, 64), "turbo")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("activation", ["none", "fp8"])
def test_cpu_reference_path_matches_oracle(fmt, activation):
    torch.manual_seed(0)
    w = torch.randn(96, 160) * 0.08
    bias = torch.randn(96)
    qw = quantize_weight(w, fmt)
    layer = runtime.PreparedLinear(qw, bias, activation, "cpu")
    assert layer.path == "reference"
    x = torch.randn(2, 7, 160).bfloat16()
    y = layer(x)
    assert y.shape == (2, 7, 96) and y.dtype == torch.bfloat16
    assert relative_error(y.float(), reference_linear(x, qw, bias, activation)) < 4e-3  # bf16 output rounding


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
