"""Every GPU fast path against the CPU reference on fresh random inputs (skips without CUDA)."""

import pytest
import torch

from quant import runtime
from quant.reference import reference_linear, relative_error
from quant.weights import FP8_ROWWISE, FP8_TENSOR, INT8, INT8_CONVROT, MXFP8, NVFP4, quantize_weight

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (format, the activation the layer asks for, bound vs the fp32 reference of what the path runs).
# Paths that round exactly like the reference differ only by bf16 output rounding and accumulation
# order; the NVFP4 fast path on Hopper (W4A4 asked, FP8 activations run) adds its documented E4M3
# re-rounding of the weight.
CASES = [
    (FP8_ROWWISE, "fp8", 6e-3),
    (FP8_TENSOR, "fp8", 6e-3),
    (FP8_ROWWISE, "none", 6e-3),
    (MXFP8, "fp8", 6e-3),
    (NVFP4, "none", 6e-3),
    (NVFP4, "nvfp4", 0.06),
    (INT8, "int8", 6e-3),
    (INT8_CONVROT, "int8", 6e-3),
    (INT8_CONVROT, "none", 6e-3),
]


@pytest.mark.parametrize("fmt,activation,bound", CASES)
@pytest.mark.parametrize("m,k,n", [(256, 4096, 4096), (1000, 2048, 8192), (77, 16384, 4096)])
def test_fast_path_matches_reference(fmt, activation, bound, m, k, n):
    torch.manual_seed(m + k + n)
    w = torch.randn(n, k) * k ** -0.5
    bias = torch.randn(n) * 0.1
    x = torch.randn(m, k).bfloat16()
    qw = quantize_weight(w, fmt)
    layer = runtime.PreparedLinear(qw, bias, activation, "cuda")
    assert layer.path != "reference", layer.reason
    y = layer(x.cuda()).float().cpu()
    assert not y.isnan().any()
    err = relative_error(y, reference_linear(x, qw, bias, layer.activation))
    assert err < bound, (layer.path, err)


def test_static_input_scale_clamps_outliers():
    torch.manual_seed(0)
    w = torch.randn(512, 1024) * 1024 ** -0.5
    qw = quantize_weight(w, FP8_ROWWISE)
    qw.tensors["input_scale"] = torch.tensor(2.0 / 448)  # calibrated for |x| <= 2
    x = torch.randn(64, 1024).bfloat16()
    x[0, 0] = 1e4  # far outside the calibrated range: clamped, never inf/NaN
    layer = runtime.PreparedLinear(qw, None, "fp8", "cuda")
    y = layer(x.cuda()).float().cpu()
    assert y.isfinite().all()
    assert relative_error(y, reference_linear(x, qw, None, "fp8")) < 6e-3


def test_weights_stay_4bit_for_nvfp4_fast_path():
    w = torch.randn(4096, 4096) * 4096 ** -0.5
    layer = runtime.PreparedLinear(quantize_weight(w, NVFP4), None, "nvfp4", "cuda")
    resident = sum(t.numel() * t.element_size() for t in layer.tensors.values())
    assert resident * 8 / w.numel() < 4.6  # bits per weight: 4 + block scales + row factors


@pytest.mark.parametrize("fmt,activation,bound", CASES)
def test_compiled_path_matches_eager(fmt, activation, bound):
    """Under torch.compile (the Compile Blocks node) the activation quantization is traced as plain
    torch and fused by Inductor, and the weight kernels run as triton_ops: same numbers as eager."""
    torch.manual_seed(7)
    w = torch.randn(2048, 1024) * 1024 ** -0.5
    qw = quantize_weight(w, fmt)
    layer = runtime.PreparedLinear(qw, torch.randn(2048) * 0.1, activation, "cuda")
    x = torch.randn(300, 1024, device="cuda").bfloat16()
    producer = lambda x: layer(torch.nn.functional.gelu(x * 1.5))  # noqa: E731 (quantization fuses here)
    compiled = torch.compile(producer, dynamic=False)(x).float().cpu()
    assert compiled.isfinite().all()
    # Inductor keeps the GELU output in fp32 where eager rounds it to bf16, which moves some FP8
    # roundings: compare each with the reference on the activation it really quantizes.
    fused = torch.nn.functional.gelu(x.float() * 1.5).cpu()
    rounded = torch.nn.functional.gelu(x * 1.5).float().cpu()
    bias = layer.bias.cpu()
    assert relative_error(compiled, reference_linear(fused, qw, bias, layer.activation)) < bound * 1.5, layer.path
    eager = producer(x).float().cpu()
    assert relative_error(eager, reference_linear(rounded, qw, bias, layer.activation)) < bound * 1.5, layer.path


@pytest.mark.parametrize("fmt,activation,bound", CASES)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_input_gelu_is_gelu_then_the_layer(fmt, activation, bound, compiled):
    """run(..., input_gelu=True), what a FeedForward's second Linear does after fuse_ffn_gelu, is
    layer(gelu_tanh(x)): fused into the activation quantization on the W8A8 paths (GELU in fp32),
    applied before the layer on the others (GELU rounded to bf16, as the model does)."""
    torch.manual_seed(11)
    w = torch.randn(2048, 1024) * 1024 ** -0.5
    qw = quantize_weight(w, fmt)
    layer = runtime.PreparedLinear(qw, torch.randn(2048) * 0.1, activation, "cuda")
    x = (torch.randn(300, 1024, device="cuda") * 2).bfloat16()
    call = lambda x: runtime.run(x, layer.path, layer.tensors, layer.shape, layer.bias, layer.format,  # noqa: E731
                                 layer.activation, input_gelu=True)
    y = (torch.compile(call, dynamic=False) if compiled else call)(x).float().cpu()
    assert y.isfinite().all()
    fused = runtime.gelu_fuses(layer.path, x.device)
    assert fused == (layer.activation != "none"), layer.path  # every 8-bit activation quantizer fuses it
    gelu = torch.nn.functional.gelu(x.float() if fused else x, approximate="tanh").float().cpu()
    assert relative_error(y, reference_linear(gelu, qw, layer.bias.cpu(), layer.activation)) < bound * 1.5, layer.path


@pytest.mark.parametrize("policy_name", ["fp8-scaled-mm", "nvfp4", "mxfp8", "int8-convrot"])
def test_load_through_staging_buffers_matches_plain_copies(tmp_path, policy_name, monkeypatch):
    """Quantize-at-load on the GPU reads into and downloads through reused page-locked buffers
    (conversion.HostStaging); the converted state dict is byte for byte what plain copies give."""
    from quant import conversion, ltx2
    from quant.policies import get_policy
    from quant.safetensors_io import save_tensors

    config = ltx2.tiny_config(num_layers=2)
    path = str(tmp_path / "bf16.safetensors")
    save_tensors(path, ltx2.synthetic_state_dict(config, seed=3), ltx2.header_metadata(config))
    staged = conversion.load_converted(path, get_policy(policy_name), device="cuda").state_dict
    monkeypatch.setattr(conversion, "_host_staging", lambda *args: None)
    plain = conversion.load_converted(path, get_policy(policy_name), device="cuda").state_dict
    assert staged.keys() == plain.keys()
    for key, tensor in plain.items():
        assert staged[key].device.type == "cpu" and not staged[key].is_pinned(), key
        assert staged[key].dtype == tensor.dtype, key
        assert torch.equal(staged[key].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), key
