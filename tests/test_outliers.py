"""Outlier handling (quant.outliers): smoothing's pre_quant_scale, the low-rank branch, and how a
QuantizedWeight carrying them computes (reference_linear, dequantize, LoRA re-quantization).

Inputs with outlier channels follow bench/quality_outliers.py's recipe (the ratios measured on the
real-weights proxy); every case draws fresh random weights and inputs."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from quant import outliers, runtime, weights
from quant.capability import Capability
from quant.outliers import Outliers, low_rank_branch, pre_quant_scale, smoothed_amax
from quant.reference import reference_linear, relative_error

_spec = importlib.util.spec_from_file_location(
    "quality_outliers", os.path.join(os.path.dirname(__file__), "..", "bench", "quality_outliers.py"))
recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe)

SMOOTH = Outliers(smooth_alpha=0.5)


def outlier_case(n=128, k=512, tokens=64, max_ratio=42.0, seed=0):
    """(weight, calibration input, evaluation input): one Linear whose input channels carry the
    recipe's gains; calibration and evaluation are different tokens through the same gains."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    gains = recipe.outlier_gains(k, max_ratio, g)
    return w, torch.randn(tokens, k, generator=g) * gains, torch.randn(tokens, k, generator=g) * gains


def test_outlier_recipe_reaches_its_ratio():
    g = torch.Generator().manual_seed(1)
    gains = recipe.outlier_gains(4096, 25.0, g)
    assert gains.max() / gains.median() == pytest.approx(25.0, rel=1e-5)
    share = float((gains >= 4.0).float().mean())
    assert 0.005 < share < 0.02  # ~1% of channels at 4x the median or more, as on the real proxy


def test_pre_quant_scale_is_smoothquants_factor_in_bf16():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 48, generator=g)
    channel_amax = torch.rand(48, generator=g) * 10
    channel_amax[5] = 0.0  # a channel that never fired: nothing to move
    w[:, 7] = 0.0
    alpha = 0.4
    expected = w.abs().amax(0) ** (1 - alpha) / channel_amax ** alpha
    expected[5] = expected[7] = 1.0
    scale = pre_quant_scale(channel_amax, w, alpha)
    assert scale.dtype == torch.bfloat16
    assert torch.equal(scale, expected.to(torch.bfloat16))


@pytest.mark.parametrize("bad, message", [(torch.ones(47), "47 values"), (torch.tensor([float("nan")] * 48), "nan"),
                                          (-torch.ones(48), "-1.0")])
def test_pre_quant_scale_refuses_bad_calibration(bad, message):
    with pytest.raises(ValueError, match=message):
        pre_quant_scale(bad, torch.randn(8, 48), 0.5)


def test_outliers_refuses_out_of_range_options():
    with pytest.raises(ValueError, match="smooth_alpha"):
        Outliers(smooth_alpha=1.5)
    with pytest.raises(ValueError, match="low_rank_bytes"):
        Outliers(low_rank_bytes=-0.1)


def test_smoothed_amax_is_the_amax_of_what_gets_quantized():
    channels = torch.tensor([1.0, 40.0, 2.0])
    scale = torch.tensor([1.0, 0.125, 0.5])
    assert smoothed_amax(40.0, channels, scale) == 5.0
    assert smoothed_amax(40.0, None, None) == 40.0
    with pytest.raises(ValueError, match="per-channel amax"):
        smoothed_amax(40.0, None, scale)


@pytest.mark.parametrize("fmt", [weights.FP8_ROWWISE, weights.MXFP8, weights.INT8, weights.INT8_CONVROT, weights.NVFP4])
def test_transformed_weight_computes_the_same_function(fmt):
    """quantize(W) with smoothing and a branch: the layer without activation quantization is x @
    dequantize()^T, and dequantize() is as close to W as the plain format's (the transforms move error,
    they do not add a bias)."""
    w, calibration, x = outlier_case(seed=3)
    w[:, :2] += 0.2 * torch.randn(w.shape[0], 1) @ torch.randn(1, 2)  # a dominant direction for the branch
    qw = weights.quantize_weight(w, fmt, Outliers(smooth_alpha=0.5, low_rank_bytes=0.2), calibration.abs().amax(0))
    assert qw.pre_quant_scale is not None and qw.low_rank is not None
    torch.testing.assert_close(reference_linear(x, qw), x @ qw.dequantize().t(), rtol=1e-4, atol=1e-4)
    plain = relative_error(weights.quantize_weight(w, fmt).dequantize(), w)
    assert relative_error(qw.dequantize(), w) < 3 * plain


@pytest.mark.parametrize("fmt, activation, at_most", [
    (weights.INT8, "int8", 0.7), (weights.INT8_CONVROT, "int8", 0.9), (weights.NVFP4, "none", 0.9)])
def test_smoothing_lowers_the_error_on_outlier_channels(fmt, activation, at_most):
    """What smoothing is for: the layer's output error on inputs with outlier channels, calibrated on
    other tokens. Measured on bench/quality_outliers.py's 2-block model: INT8 -66%, ConvRot -32%,
    NVFP4 -27%; `at_most` leaves room for one layer's draw."""
    for seed in range(3):
        w, calibration, x = outlier_case(seed=10 + seed)
        expected = x @ w.t()
        plain = relative_error(reference_linear(x, weights.quantize_weight(w, fmt), None, activation), expected)
        qw = weights.quantize_weight(w, fmt, SMOOTH, calibration.abs().amax(0))
        assert relative_error(reference_linear(x, qw, None, activation), expected) < at_most * plain


def test_branch_only_where_a_few_directions_dominate():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(256, 256, generator=g) / 16
    assert low_rank_branch(w, weights.storage_nbytes(weights.NVFP4, w.shape), 0.5) is None  # flat spectrum
    spikes = torch.randn(256, 3, generator=g) @ torch.randn(3, 256, generator=g)
    down, up = low_rank_branch(w + spikes, weights.storage_nbytes(weights.NVFP4, w.shape), 0.5)
    assert down.shape == (3, 256) and up.shape == (256, 3) and down.dtype == outliers.BRANCH_DTYPE
    # the byte cap bounds the rank: 3 directions of (256 + 256) bf16 values each need 3,072 bytes
    assert low_rank_branch(w + spikes, 3 * 512 * 2 - 1, 1.0)[0].shape[0] == 2
    plain = relative_error(weights.quantize_weight(w + spikes, weights.NVFP4).dequantize(), w + spikes)
    branched = weights.quantize_weight(w + spikes, weights.NVFP4, Outliers(low_rank_bytes=0.5))
    assert relative_error(branched.dequantize(), w + spikes) < 0.5 * plain


def test_smoothing_needs_the_layers_calibration():
    w, _, _ = outlier_case(seed=5)
    qw = weights.quantize_weight(w, weights.INT8, SMOOTH, None)
    assert qw.pre_quant_scale is None and torch.equal(qw.data, weights.quantize_weight(w, weights.INT8).data)


@pytest.mark.parametrize("fmt", [weights.INT8, weights.FP8_ROWWISE, weights.NVFP4])
def test_lora_requantization_keeps_the_transforms(fmt):
    """requantize_like maps a merged dense weight into the smoothed, branch-less basis: re-quantizing the
    layer's own dequantized weight gives its values back (NVFP4 zeros may come back as -0, and an element
    whose stored value is small next to the branch's may move one step: fp32 rounding of the branch's
    subtraction, at 1e-7 of the weight)."""
    w, calibration, _ = outlier_case(seed=6)
    qw = weights.quantize_weight(w, fmt, Outliers(smooth_alpha=0.5, low_rank_bytes=0.2), calibration.abs().amax(0))
    again = weights.requantize_like(qw, qw.dequantize())
    moved = (again.quantized_part() != qw.quantized_part()).float().mean()
    assert float(moved) < 1e-3, f"{float(moved):.2%} of the elements changed"
    assert again.pre_quant_scale is qw.pre_quant_scale and again.low_rank == qw.low_rank


# ---------------------------------------------------------------------------------------------
# The GPU form (quant.runtime.run): the scale before the path's quantizer, the branch beside it
# ---------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("interpreter_loops")
@pytest.mark.parametrize("fmt, path, activation, gelu", [
    (weights.INT8, "bf16-dequant", "none", False), (weights.FP8_ROWWISE, "bf16-dequant", "none", True),
    (weights.NVFP4, "nvfp4-jit-bf16", "none", False),
    (weights.INT8, "int8-rowwise", "int8", False), (weights.INT8_CONVROT, "int8-rowwise", "int8", True),
    (weights.FP8_ROWWISE, "fp8-rowwise", "fp8", False)])
def test_paths_run_the_transforms_as_the_reference(fmt, path, activation, gelu):
    """A smoothed layer with a branch on the GPU paths (run on the CPU; the INT8 kernel under
    TRITON_INTERPRET=1), against the fp32 reference on the same bf16 input: they differ by bf16
    rounding (input times the scale, weights, the branch's GEMMs, output: ~0.4% each), while dropping
    either transform costs several times the layer's quantization error."""
    if path == "int8-rowwise" and not runtime.kernels_int8.AVAILABLE:
        pytest.skip("triton is not installed")
    w, calibration, x = outlier_case(n=128, k=512, tokens=16, seed=20)
    w[:, :2] += 0.2 * torch.randn(w.shape[0], 1) @ torch.randn(1, 2)
    bias = torch.randn(128) * 0.1
    qw = weights.quantize_weight(w, fmt, Outliers(smooth_alpha=0.5, low_rank_bytes=0.2), calibration.abs().amax(0))
    assert qw.pre_quant_scale is not None and qw.low_rank is not None
    tensors = runtime.prepare(qw, path, "cpu")
    x = x.bfloat16()
    y = runtime.run(x, path, tensors, qw.shape, bias, fmt, activation, input_gelu=gelu)
    x_in = runtime.ffn_gelu(x.float()) if gelu else x
    expected = reference_linear(x_in, qw, bias, activation)
    error = relative_error(y.float(), expected)
    assert error < 1.5e-2
    bare = {k: v for k, v in tensors.items() if k not in weights.OUTLIER_SUFFIXES}
    assert relative_error(runtime.run(x, path, bare, qw.shape, bias, fmt, activation, input_gelu=gelu).float(),
                          expected) > 5 * error
    kept = runtime.stored_form(path, tensors, fmt, qw.shape)
    assert all(torch.equal(kept.tensors[k], qw.tensors[k]) for k in weights.OUTLIER_SUFFIXES)


def test_transforms_never_keep_a_layer_off_the_gpu():
    hopper = Capability("cuda", (9, 0), True)
    assert runtime.choose_path(weights.INT8, "int8", hopper, (4096, 4096)).path == "int8-rowwise"


@pytest.mark.usefixtures("interpreter_loops")
def test_a_scale_applied_outside_the_kernel_multiplies_the_gelu_output(monkeypatch):
    """On a GPU the FFN's GELU runs inside a path's activation quantizer; a path that does not apply
    pre_quant_scale itself gets the scale from run(), which must then apply the GELU first:
    gelu(x) * p, not gelu(x * p). Emulated on the CPU: the INT8 path (its kernel applies the GELU
    under TRITON_INTERPRET=1) with a run that leaves the scale out, as fp8-rowwise's quantizer does on
    a GPU, and the GELU declared fusable."""
    if not runtime.kernels_int8.AVAILABLE:
        pytest.skip("triton is not installed")
    from dataclasses import replace
    kernels_int8 = runtime.kernels_int8

    def run_without_scale(x2d, tensors, shape, bias, fmt, activation, gelu, out_dtype):
        a, a_scale = kernels_int8.quantize_int8_rows(x2d, gelu)
        return kernels_int8.int8_scaled_mm(a, tensors["weight"], a_scale, tensors["weight_scale"], bias, out_dtype)
    monkeypatch.setitem(runtime.BY_NAME, "int8-rowwise", replace(
        runtime.BY_NAME["int8-rowwise"], fuses_pre_quant_scale=False, run=run_without_scale))
    monkeypatch.setattr(runtime, "gelu_fuses", lambda path, device: True)
    w, calibration, x = outlier_case(n=128, k=512, tokens=16, seed=21)
    qw = weights.quantize_weight(w, weights.INT8, SMOOTH, runtime.ffn_gelu(calibration).abs().amax(0))
    tensors = runtime.prepare(qw, "int8-rowwise", "cpu")
    y = runtime.run(x.bfloat16(), "int8-rowwise", tensors, qw.shape, None, weights.INT8, "int8", input_gelu=True)
    expected = reference_linear(runtime.ffn_gelu(x.bfloat16().float()), qw, None, "int8")
    assert relative_error(y.float(), expected) < 1.5e-2
