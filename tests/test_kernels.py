"""Triton kernels vs their plain-torch twins, bit for bit, on fresh random inputs.
On a CPU-only machine they run under TRITON_INTERPRET=1 (set by conftest.py) at small shapes."""

import os

import pytest
import torch

from quant import formats, kernels

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def same_fp8(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Byte-equal, except that NaN of either sign matches NaN."""
    both_nan = a.float().isnan() & b.float().isnan()
    return bool(((a.view(torch.uint8) == b.view(torch.uint8)) | both_nan).all())


@pytest.mark.parametrize("shape", [(7, 300), (3, 2048), (1, 16), (5, 4100), (2, 20000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rowwise_quant_matches_reference(shape, dtype):
    x = (torch.randn(shape) * 3).to(dtype)
    data, scale = kernels.quantize_fp8_rows(x.to(DEVICE))
    ref_data, ref_scale = formats.quantize_fp8_rowwise_dynamic(x)
    assert same_fp8(data.cpu(), ref_data)
    assert torch.equal(scale.cpu(), ref_scale)


def test_rowwise_quant_special_values():
    x = torch.randn(6, 64) * 3
    x[0, 5] = float("nan")  # a NaN row stays NaN (scale NaN), never silently finite
    x[1] = 0.0  # zero row: scale 1, zero data
    x[2, :4] = torch.tensor([float("inf"), -1e30, 1e-30, -0.0])
    x[3, :3] = torch.tensor([464.0, 480.0, 300.0]) * x[3].abs().max() / 448  # ties and saturation
    data, scale = kernels.quantize_fp8_rows(x.to(DEVICE))
    ref_data, ref_scale = formats.quantize_fp8_rowwise_dynamic(x)
    assert same_fp8(data.cpu(), ref_data)
    assert torch.allclose(scale.cpu(), ref_scale, equal_nan=True)
    assert scale[0].isnan().all() and data[0].float().isnan().all()
    assert scale[1].item() == 1.0 and (data[1].float() == 0).all()


@pytest.mark.parametrize("shape", [(7, 300), (3, 2048), (2, 20000)])
def test_gelu_quant_matches_gelu_then_quant(shape):
    """One pass of tanh GELU + per-row quantization against torch's GELU in fp32 then the reference
    quantizer: the kernel's GELU (one exp) differs from torch's tanh by float rounding only, which
    moves a few elements across an FP8 rounding boundary, never more than one step."""
    x = (torch.randn(shape) * 3).bfloat16()
    data, scale = kernels.quantize_fp8_rows(x.to(DEVICE), gelu=True)
    g = torch.nn.functional.gelu(x.float(), approximate="tanh")
    ref_data, ref_scale = formats.quantize_fp8_rowwise_dynamic(g)
    assert torch.allclose(scale.cpu(), ref_scale, rtol=1e-6, atol=0)
    codes, ref_codes = data.cpu().view(torch.uint8).int(), ref_data.view(torch.uint8).int()
    assert (codes == ref_codes).float().mean() > 0.999 and (codes - ref_codes).abs().max() <= 1
    dequantized = data.cpu().float() * scale.cpu()
    assert ((dequantized - g).norm() / g.norm()).item() < 0.03


@pytest.mark.parametrize("shape", [(7, 300), (2, 20000)])
def test_smoothed_quant_matches_reference(shape):
    """A smoothed layer's input (quant.outliers): x times its bf16 pre_quant_scale in fp32, then the
    reference quantizers, byte for byte (dynamic per row and static; whole rows and two chunks)."""
    x = (torch.randn(shape) * 3).bfloat16()
    p = (torch.rand(shape[1]) * 2 + 0.05).bfloat16()
    smoothed = x.float() * p.float()
    data, scale = kernels.quantize_fp8_rows(x.to(DEVICE), pre_quant_scale=p.to(DEVICE))
    ref_data, ref_scale = formats.quantize_fp8_rowwise_dynamic(smoothed)
    assert same_fp8(data.cpu(), ref_data) and torch.equal(scale.cpu(), ref_scale)
    static = torch.tensor(smoothed.abs().max().item() / 448 * 0.8)  # some values saturate
    data = kernels.quantize_fp8_static(x.to(DEVICE), static.to(DEVICE), pre_quant_scale=p.to(DEVICE))
    assert same_fp8(data.cpu(), formats.quantize_fp8_static(smoothed, static))


def test_smoothed_gelu_quant_applies_the_gelu_first():
    x = (torch.randn(5, 2048) * 3).bfloat16()
    p = (torch.rand(2048) * 2 + 0.05).bfloat16()
    data, scale = kernels.quantize_fp8_rows(x.to(DEVICE), gelu=True, pre_quant_scale=p.to(DEVICE))
    g = torch.nn.functional.gelu(x.float(), approximate="tanh") * p.float()
    ref_data, ref_scale = formats.quantize_fp8_rowwise_dynamic(g)
    assert torch.allclose(scale.cpu(), ref_scale, rtol=1e-6, atol=0)
    codes, ref_codes = data.cpu().view(torch.uint8).int(), ref_data.view(torch.uint8).int()
    assert (codes == ref_codes).float().mean() > 0.999 and (codes - ref_codes).abs().max() <= 1
    with pytest.raises(ValueError, match="pre_quant_scale has 100 values"):
        kernels.quantize_fp8_rows(x.to(DEVICE), pre_quant_scale=torch.ones(100, device=DEVICE))


def test_gelu_static_quant_clamps_and_keeps_nan():
    x = (torch.randn(4, 96) * 3).bfloat16()
    x[0, 0], x[1, 1], x[2, 2], x[3, 3] = 1e9, float("nan"), -1e9, float("inf")
    scale = torch.tensor(0.02)
    out = kernels.quantize_fp8_static(x.to(DEVICE), scale.to(DEVICE), gelu=True).cpu()
    g = torch.nn.functional.gelu(x.float(), approximate="tanh")
    ref = formats.quantize_fp8_static(g, scale)
    finite = g.isfinite()
    assert ((out.float() - ref.float()).abs()[finite] <= ref.float().abs()[finite] / 8 + 1e-6).all()
    assert out[0, 0].float().item() == 448.0 and out[3, 3].float().item() == 448.0  # clamped, not inf
    assert out[1, 1].float().isnan()
    assert out[2, 2].float().item() == 0.0  # gelu(-1e9) = -0


def test_every_fp8_value_and_midpoint_rounds_like_torch():
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = values[values.isfinite()].sort().values
    midpoints = (finite[1:] + finite[:-1]) / 2
    probe = torch.cat([finite, midpoints, midpoints.nextafter(torch.tensor(float("inf"))),
                       torch.tensor([449.0, 464.0, 470.0, 1e6, -1e6])]).reshape(1, -1)
    one = torch.tensor(1.0)
    assert same_fp8(kernels.quantize_fp8_static(probe.to(DEVICE), one.to(DEVICE)).cpu(),
                    formats.quantize_fp8_static(probe, one))


def test_static_quant_clamps_and_keeps_nan():
    x = torch.randn(4, 96) * 10
    x[0, 0] = 1e9
    x[1, 1] = float("nan")
    scale = torch.tensor(0.02)
    out = kernels.quantize_fp8_static(x.to(DEVICE), scale.to(DEVICE)).cpu()
    assert same_fp8(out, formats.quantize_fp8_static(x, scale))
    assert out[0, 0].float().item() == 448.0
    assert out[1, 1].float().isnan()


@pytest.mark.parametrize("shape", [(40, 96), (300, 13 * 16), (7, 32), (129, 64)])
def test_nvfp4_expansion_matches_reference(shape):
    w = torch.randn(shape)
    w[0, :16] = 0.0  # a zero block
    packed, block_scales, global_scale = formats.quantize_nvfp4(w)
    ratio = kernels.nvfp4_row_ratio(block_scales, shape)
    on = [t.to(DEVICE) for t in (packed, block_scales, global_scale, ratio)]
    fp8 = kernels.nvfp4_to_fp8(on[0], on[1], on[2], on[3], *shape).cpu()
    unit = formats.dequantize_nvfp4(packed, block_scales, torch.tensor(1.0), shape)
    assert same_fp8(fp8, formats.cast_to_fp8(unit * ratio[:, None]))
    bf16 = kernels.nvfp4_to_bf16(on[0], on[1], on[2], *shape).cpu()
    assert torch.equal(bf16, formats.dequantize_nvfp4(packed, block_scales, global_scale, shape).bfloat16())


def test_nvfp4_fp8_expansion_error_is_small():
    """The fast Hopper path's extra rounding (NVFP4 element x block scale onto E4M3 per row)."""
    shape = (64, 512)
    w = torch.randn(shape)
    packed, block_scales, global_scale = formats.quantize_nvfp4(w, search_scales=True)
    ratio = kernels.nvfp4_row_ratio(block_scales, shape)
    assert torch.equal(ratio, torch.exp2(torch.log2(ratio).round()))  # powers of two
    fp8 = kernels.nvfp4_to_fp8(packed.to(DEVICE), block_scales.to(DEVICE), global_scale.to(DEVICE),
                               ratio.to(DEVICE), *shape).cpu()
    assert not fp8.float().isnan().any() and fp8.float().abs().max() <= formats.FP8_MAX
    expanded = fp8.float() * (global_scale / ratio)[:, None]
    exact = formats.dequantize_nvfp4(packed, block_scales, global_scale, shape)
    extra = float((expanded - exact).norm() / exact.norm())
    assert 0 < extra < 0.025, extra


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_every_e4m3_code_decodes_like_torch(out_dtype):
    """The expansion kernels decode E4M3 from its bits (no FP8 type before sm_89): all 256 codes,
    NaN codes included, against torch's float8_e4m3fn -> float32 (every E4M3 value is exact in bf16
    and fp16, so the output rounding changes nothing)."""
    codes = torch.arange(256, dtype=torch.uint8).reshape(2, 128)
    out = kernels.fp8_rows_to_bf16(codes.view(torch.float8_e4m3fn).to(DEVICE), torch.ones(2, device=DEVICE),
                                   out_dtype=out_dtype).cpu()
    expected = codes.view(torch.float8_e4m3fn).float()
    assert out.dtype == out_dtype
    assert torch.equal(out.float().isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert torch.equal(out.float()[finite], expected[finite])
    assert torch.equal(out.float().signbit()[finite], expected.signbit()[finite])  # -0 stays -0


@pytest.mark.parametrize("shape", [(40, 96), (17, 300)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_fp8_rows_dequantize_matches_reference(shape, out_dtype):
    w = torch.randn(shape) * 0.05
    data, scale = formats.quantize_fp8_rowwise_dynamic(w)
    out = kernels.fp8_rows_to_bf16(data.to(DEVICE), scale.reshape(-1).to(DEVICE), out_dtype=out_dtype).cpu()
    assert torch.equal(out, formats.dequantize_fp8(data, scale, out_dtype))


@pytest.mark.parametrize("shape", [(40, 96), (300, 13 * 16)])
def test_nvfp4_expansion_to_fp16(shape):
    """Turing's output dtype: the same values rounded to fp16 (E2M1 x E4M3 x global is exact in fp32)."""
    w = torch.randn(shape)
    packed, block_scales, global_scale = formats.quantize_nvfp4(w)
    out = kernels.nvfp4_to_bf16(packed.to(DEVICE), block_scales.to(DEVICE), global_scale.to(DEVICE), *shape,
                                out_dtype=torch.float16).cpu()
    assert out.dtype == torch.float16
    assert torch.equal(out, formats.dequantize_nvfp4(packed, block_scales, global_scale, shape).half())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_gpu_expansions_under_compile(out_dtype):
    shape = (4096, 2048)
    data, scale = formats.quantize_fp8_rowwise_dynamic(torch.randn(shape, device="cuda") * 0.05)
    packed, block_scales, global_scale = formats.quantize_nvfp4(torch.randn(shape, device="cuda"))

    def expand(data, scale, packed, block_scales, global_scale):
        return (kernels.fp8_rows_to_bf16(data, scale.reshape(-1), out_dtype),
                kernels.nvfp4_to_bf16(packed, block_scales, global_scale, *shape, out_dtype))

    eager = expand(data, scale, packed, block_scales, global_scale)
    compiled = torch.compile(expand, fullgraph=True)(data, scale, packed, block_scales, global_scale)
    assert torch.equal(eager[0], formats.dequantize_fp8(data, scale, out_dtype))
    assert torch.equal(eager[1], formats.dequantize_nvfp4(packed, block_scales, global_scale, shape).to(out_dtype))
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])


@pytest.mark.parametrize("shape", [(1, 16), (37, 96), (130, 304), (300, 2048)])
@pytest.mark.parametrize("calibrated", [False, True])
def test_nvfp4_activation_quant_matches_reference(shape, calibrated):
    """Blackwell's W4A4 input: the kernel's codes, swizzled block scales and global scale are
    formats.quantize_nvfp4's bytes (comfy-kitchen's layout), with the live amax or a calibrated
    global scale (values beyond it saturate at 6 x the block scale)."""
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 3).bfloat16()
    x[0, :16] = 0  # a zero block: scale code 0, zero codes
    global_scale = (x.abs().amax().float() / 2688 * 0.5) if calibrated else None
    packed, scales, global_out = kernels.quantize_nvfp4_activation(x.to(DEVICE), global_scale)
    ref_packed, ref_scales, ref_global = formats.quantize_nvfp4(x, global_scale)
    assert torch.equal(packed.cpu(), ref_packed), seed
    assert torch.equal(scales.cpu().view(torch.uint8), ref_scales.view(torch.uint8)), seed
    assert torch.equal(global_out.cpu(), ref_global), seed
