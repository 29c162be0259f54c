"""INT8 kernels (quant.kernels_int8) vs their plain-torch twins (quant.formats) and comfy-kitchen,
on fresh random inputs: each test draws its own seed and prints it (set LTX2Q_TEST_SEED to replay one).
On a CPU-only machine they run under TRITON_INTERPRET=1 (set by conftest.py) at small shapes; the
tests marked `gpu` run at the LTX-2 shapes on a CUDA device."""

import os
import subprocess
import sys

import pytest
import torch

from quant import formats, kernels, kernels_int8

pytestmark = [pytest.mark.skipif(not kernels.AVAILABLE, reason="triton is not installed"),
              pytest.mark.usefixtures("interpreter_loops")]  # its GEMMs loop over K and tiles (conftest.py)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def fresh_seed():
    seed = int(os.environ.get("LTX2Q_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"LTX2Q_TEST_SEED={seed}")
    torch.manual_seed(seed)


def codes_close(codes, ref_codes, max_mismatch=1e-3):
    """INT8 codes equal except a few off by one (float rounding of the input moved them across a
    rounding boundary): at most a `max_mismatch` fraction, plus 4 (on short rows the expected count
    of such cases is below 1)."""
    diff = (codes.cpu().int() - ref_codes.cpu().int()).abs()
    return bool(diff.max() <= 1) and (diff != 0).sum().item() <= max_mismatch * diff.numel() + 4


def gelu_tanh(x):
    """The FFN's GELU as the kernels fuse it: in fp32, not rounded to x's dtype first."""
    return torch.nn.functional.gelu(x.float(), approximate="tanh")


def reference_rows(x, gelu=False, group=0):
    return formats.quantize_int8_rowwise_dynamic(gelu_tanh(x) if gelu else x, group)


def random_rows(shape, dtype, outliers=True):
    x = torch.randn(shape) * 3
    if outliers:  # a few large channels, as LTX activations have
        x[:, torch.randint(0, shape[1], (max(1, shape[1] // 256),))] *= 40
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------
# Activation quantization
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(7, 300), (3, 2048), (1, 16), (5, 4100), (2, 20000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rows_match_reference_exactly(shape, dtype):
    x = random_rows(shape, dtype)
    data, scale = kernels_int8.quantize_int8_rows(x.to(DEVICE))
    ref_data, ref_scale = reference_rows(x)
    assert data.dtype == torch.int8 and scale.shape == (shape[0], 1)
    assert torch.equal(data.cpu(), ref_data) and torch.equal(scale.cpu(), ref_scale)


def test_rows_match_comfy_kitchen():
    """fp32 inputs: comfy-kitchen's quantize_int8_rowwise divides by the scale where the kernel
    multiplies by its reciprocal; scales are equal, codes may differ by one on a rare tie."""
    ck = pytest.importorskip("comfy_kitchen.backends.eager.quantization")
    x = random_rows((64, 4096), torch.float32)
    data, scale = kernels_int8.quantize_int8_rows(x.to(DEVICE))
    ck_data, ck_scale = ck.quantize_int8_rowwise(x)
    assert torch.equal(scale.cpu(), ck_scale)
    assert codes_close(data, ck_data, max_mismatch=1e-4)


def test_rows_special_values():
    x = torch.randn(6, 64) * 3
    x[0, 5] = float("nan")  # a NaN row: scale NaN, codes 0, so its GEMM output row is NaN
    x[1] = 0.0  # zero row: comfy-kitchen's floor scale, zero codes
    x[2, :4] = torch.tensor([float("inf"), -1e30, 1e-30, -0.0])
    x[3, :8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -126.5])  # scale 1: ties to even
    x[3, 8:] = x[3, 8:].clamp(-100, 100)
    x[4] = -x[4].abs()  # all negative: the amax is of |x|
    data, scale = kernels_int8.quantize_int8_rows(x.to(DEVICE))
    data, scale = data.cpu(), scale.cpu()
    ref_data, ref_scale = reference_rows(x)
    assert torch.equal(data, ref_data) and torch.allclose(scale, ref_scale, equal_nan=True)
    assert scale[0].isnan().all() and (data[0] == 0).all()
    assert scale[1].item() == torch.tensor(formats.INT8_SCALE_FLOOR).item() and (data[1] == 0).all()
    assert scale[3].item() == 1.0 and data[3, :8].tolist() == [127, 0, 2, 2, 0, -2, 126, -126]
    assert data[4].min().item() == -127


@pytest.mark.parametrize("shape", [(7, 300), (3, 2048), (2, 20000)])
def test_gelu_quant_matches_gelu_then_quant(shape):
    """The kernel's GELU (one exp, quant.kernels._gelu_tanh) differs from torch's tanh by float
    rounding, which moves a few elements across an INT8 rounding boundary, never more than one step."""
    x = random_rows(shape, torch.bfloat16)
    data, scale = kernels_int8.quantize_int8_rows(x.to(DEVICE), gelu=True)
    ref_data, ref_scale = reference_rows(x, gelu=True)
    assert torch.allclose(scale.cpu(), ref_scale, rtol=1e-6, atol=0)
    assert codes_close(data, ref_data)


@pytest.mark.parametrize("group", kernels_int8.ROTATE_GROUPS)
@pytest.mark.parametrize("rows,cols", [(1, 1024), (5, 3072), (2, 16384), (3, 5120), (1, 20480)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotation_matches_reference(group, rows, cols, dtype):
    """The rotation sums in another order than torch's matmul (fp32 either way): the rotated values
    agree to a few fp32 steps (1024-feature groups: up to ~2e-6), so do the scales, and the codes up
    to a rare boundary case. Rows up to 16,384 features are read whole (5,120: in a partly masked
    block), 20,480 in two chunks read twice (amax, then quantize), the last one partial."""
    x = random_rows((rows, cols), dtype)
    data, scale = kernels_int8.quantize_int8_rows(x.to(DEVICE), rotate_groupsize=group)
    ref_data, ref_scale = reference_rows(x, group=group)
    assert torch.allclose(scale.cpu(), ref_scale, rtol=1e-5, atol=0)
    assert codes_close(data, ref_data)


def test_rotation_matches_comfy_kitchen():
    """Against comfy-kitchen's own online rotation and row quantizer (fp32 input, where it computes in
    fp32 too), and the rotation undoes itself: H is symmetric and orthogonal."""
    pytest.importorskip("comfy_kitchen")
    from comfy_kitchen.backends.eager.quantization import quantize_int8_rowwise
    from comfy_kitchen.tensor.int8_utils import _build_hadamard, _rotate_activation
    x = random_rows((16, 4096), torch.float32)
    data, scale = kernels_int8.quantize_int8_rows(x.to(DEVICE), rotate_groupsize=256)
    ck_data, ck_scale = quantize_int8_rowwise(_rotate_activation(x, _build_hadamard(256), 256))
    assert torch.allclose(scale.cpu(), ck_scale, rtol=1e-5, atol=0)
    assert codes_close(data, ck_data)
    back = formats.rotate_groups(data.cpu().float() * scale.cpu(), 256)  # INT8 error ~1%; a wrong rotation ~100%
    assert ((back - x).norm() / x.norm()).item() < 0.05


def test_rotation_one_pass_equals_chunked():
    """A row read whole and the same row read in 4,096-feature chunks (the last one partial) give the
    same bytes."""
    x = random_rows((3, 5120), torch.bfloat16).to(DEVICE)
    chunked = kernels_int8._quantize_int8_launch(x, True, 256, block_k=4096)
    whole = kernels_int8._quantize_int8_launch(x, True, 256)
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])


def test_rotated_gelu():
    x = random_rows((4, 2048), torch.bfloat16)
    data, scale = kernels_int8.quantize_int8_rows(x.to(DEVICE), gelu=True, rotate_groupsize=256)
    ref_data, ref_scale = reference_rows(x, gelu=True, group=256)
    assert torch.allclose(scale.cpu(), ref_scale, rtol=1e-5, atol=0) and codes_close(data, ref_data)


def smoothing_factors(cols):
    """A layer's pre_quant_scale (quant.outliers): bf16, small where the input channel is large."""
    return (torch.rand(cols) * 2 + 0.05).to(torch.bfloat16)


@pytest.mark.parametrize("shape", [(7, 300), (2, 20000)])
def test_smoothing_matches_reference_exactly(shape):
    """x * pre_quant_scale in fp32, then the row quantizer: the bytes of the reference (whole rows and
    rows read in two chunks)."""
    x, p = random_rows(shape, torch.bfloat16), smoothing_factors(shape[1])
    data, scale = kernels_int8.quantize_int8_rows(x.to(DEVICE), pre_quant_scale=p.to(DEVICE))
    ref_data, ref_scale = formats.quantize_int8_rowwise_dynamic(x.float() * p.float())
    assert torch.equal(data.cpu(), ref_data) and torch.equal(scale.cpu(), ref_scale)


@pytest.mark.parametrize("gelu", [False, True])
def test_smoothing_with_gelu_and_rotation(gelu):
    """GELU first (it belongs to the model), then the smoothing, then ConvRot: the order the weight was
    transformed in (x p H)(H W/p)^T... as reference_linear quantizes it."""
    x, p = random_rows((5, 3072), torch.bfloat16), smoothing_factors(3072)
    data, scale = kernels_int8.quantize_int8_rows(x.to(DEVICE), gelu=gelu, rotate_groupsize=256,
                                                  pre_quant_scale=p.to(DEVICE))
    ref_data, ref_scale = formats.quantize_int8_rowwise_dynamic((gelu_tanh(x) if gelu else x.float()) * p.float(), 256)
    assert torch.allclose(scale.cpu(), ref_scale, rtol=1e-5, atol=0) and codes_close(data, ref_data)


def test_smoothing_refuses_a_scale_of_another_width():
    with pytest.raises(ValueError, match="pre_quant_scale has 100 values"):
        kernels_int8.quantize_int8_rows(torch.randn(2, 256, device=DEVICE), pre_quant_scale=torch.ones(100, device=DEVICE))


def test_rotation_rejects_groups_it_cannot_run():
    x = torch.randn(2, 768, device=DEVICE)
    with pytest.raises(ValueError):
        kernels_int8.quantize_int8_rows(x, rotate_groupsize=512)
    with pytest.raises(ValueError):
        kernels_int8.quantize_int8_rows(x, rotate_groupsize=1024)


def test_no_rows():
    x = torch.randn(0, 512, device=DEVICE)
    data, scale = kernels_int8.quantize_int8_rows(x, rotate_groupsize=256)
    assert data.shape == (0, 512) and scale.shape == (0, 1)
    b = torch.randint(-127, 128, (32, 512), dtype=torch.int8, device=DEVICE)
    for mm in (kernels_int8.int8_scaled_mm, kernels_int8.int8_scaled_mm_int_mm):
        y = mm(data, b, scale, torch.ones(32, device=DEVICE))
        assert y.shape == (0, 32) and y.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# GEMM
# ---------------------------------------------------------------------------------------------

def gemm_operands(m, n, k, b_scale_shape, bias_dtype):
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    a_scale = torch.rand(m, 1) * 0.02 + 1e-3
    per_tensor = b_scale_shape in ((), (1,))
    b_scale = (torch.tensor(3e-3) if per_tensor else torch.rand(n) * 0.01 + 1e-4).reshape(b_scale_shape)
    bias = None if bias_dtype is None else (torch.randn(n) * 0.5).to(bias_dtype)
    return a, b, a_scale, b_scale, bias


def on_device(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


GEMMS = {
    "triton": lambda *args, out_dtype: kernels_int8._int8_mm_launch(*args, out_dtype, persistent=False),
    "triton persistent": lambda *args, out_dtype: kernels_int8._int8_mm_launch(*args, out_dtype, persistent=True),
    "torch._int_mm": lambda *args, out_dtype: kernels_int8.int8_scaled_mm_int_mm(*args, out_dtype=out_dtype),
}


@pytest.mark.parametrize("gemm", list(GEMMS))
@pytest.mark.parametrize("m,n,k,b_scale_shape,bias_dtype,out_dtype", [
    (1, 16, 16, (16,), None, torch.bfloat16),
    (45, 48, 64, (1, 48), torch.bfloat16, torch.bfloat16),
    (77, 112, 80, (), torch.float32, torch.float16),  # K = 2.5 tiles of 32
    (130, 64, 48, (1,), torch.float16, torch.float32),
    (33, 96, 512, (96,), torch.bfloat16, torch.bfloat16),
])
def test_gemm_matches_reference_exactly(gemm, m, n, k, b_scale_shape, bias_dtype, out_dtype):
    if DEVICE == "cuda" and gemm == "triton persistent" and kernels_int8.gemm_class(DEVICE) != "hopper":
        pytest.skip("the persistent TMA kernel needs Hopper or datacenter Blackwell")
    operands = gemm_operands(m, n, k, b_scale_shape, bias_dtype)
    y = GEMMS[gemm](*on_device(*operands), out_dtype=out_dtype).cpu()
    ref = formats.int8_scaled_mm(*operands, out_dtype=out_dtype)
    assert y.dtype == out_dtype and y.shape == (m, n)
    if DEVICE == "cpu":
        assert torch.equal(y, ref)
    else:  # the GPU fuses (acc * a_scale) * b_scale + bias into one FMA: one rounding less
        assert torch.allclose(y.float(), ref.float(), rtol=2 ** -7, atol=1e-6)


def test_gemm_extremes_and_other_tiles():
    """Every product at +-127^2 over K = 4096 (|acc| = 66,064,384, above 2^24: the fp32 conversion
    rounds, the same way as the reference's), and tiles other than the interpreter's default."""
    m, n, k = 40, 48, 4096
    a = torch.full((m, k), -127, dtype=torch.int8)
    a[1::2] = 127
    b = torch.full((n, k), 127, dtype=torch.int8)
    a_scale, b_scale = torch.rand(m, 1) + 0.5, torch.rand(n) + 0.5
    ref = formats.int8_scaled_mm(a, b, a_scale, b_scale, out_dtype=torch.float32)
    for tile in ((16, 16, 64, 1), (64, 16, 128, 3)):
        for persistent in (False, True):
            if DEVICE == "cuda" and persistent and kernels_int8.gemm_class(DEVICE) != "hopper":
                continue
            y = kernels_int8._int8_mm_launch(*on_device(a, b, a_scale, b_scale), None, torch.float32,
                                             persistent=persistent, tile=tile)
            assert torch.equal(y.cpu(), ref), (tile, persistent)


def test_public_gemm_checks_its_operands():
    a, b, a_scale, b_scale, _ = gemm_operands(8, 32, 48, (32,), None)
    with pytest.raises(ValueError):
        kernels_int8.int8_scaled_mm(a[:, :40], b[:, :40], a_scale, b_scale)  # K not a multiple of 16
    with pytest.raises(ValueError):
        kernels_int8.int8_scaled_mm(a.float(), b, a_scale, b_scale)
    with pytest.raises(ValueError):
        kernels_int8.int8_scaled_mm(a, b, a_scale[:4], b_scale)
    y = kernels_int8.int8_scaled_mm(*on_device(a, b, a_scale, b_scale))  # no bias: exact on the GPU too
    assert torch.equal(y.cpu(), formats.int8_scaled_mm(a, b, a_scale, b_scale))


def test_quantize_then_gemm_approximates_the_float_linear():
    """End to end, with and without rotation: INT8 W8A8 error on Gaussian data is ~1%."""
    x = random_rows((64, 1024), torch.bfloat16, outliers=False)
    w = torch.randn(256, 1024) * 1024 ** -0.5
    bias = torch.randn(256) * 0.1
    exact = x.float() @ w.t() + bias
    for group in (0, 256):
        w_values = formats.rotate_groups(w, group) if group else w  # H symmetric: W H^T = W H
        w_codes, w_scale = formats.quantize_int8_rows(w_values)
        a, a_scale = kernels_int8.quantize_int8_rows(x.to(DEVICE), rotate_groupsize=group)
        y = kernels_int8.int8_scaled_mm(a, w_codes.to(DEVICE), a_scale, w_scale.reshape(-1).to(DEVICE),
                                        bias.to(DEVICE))
        error = ((y.cpu().float() - exact).norm() / exact.norm()).item()
        assert error < 0.02, (group, error)


# ---------------------------------------------------------------------------------------------
# On a GPU: the LTX-2 shapes, the Ampere tile lists, torch.compile
# ---------------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("m,k", [(6144, 4096), (2048, 16384), (777, 2048)])
def test_gpu_quantizers_at_model_shapes(m, k):
    x = random_rows((m, k), torch.bfloat16).cuda()
    data, scale = kernels_int8.quantize_int8_rows(x)
    ref_data, ref_scale = reference_rows(x)
    assert torch.equal(data, ref_data) and torch.equal(scale, ref_scale)
    for gelu, group in ((True, 0), (False, 256), (True, 256)):
        data, scale = kernels_int8.quantize_int8_rows(x, gelu=gelu, rotate_groupsize=group)
        ref_data, ref_scale = reference_rows(x, gelu, group)
        assert torch.allclose(scale, ref_scale, rtol=1e-5, atol=0), (gelu, group)
        assert codes_close(data, ref_data), (gelu, group)


@gpu
@pytest.mark.parametrize("gemm", list(GEMMS))
@pytest.mark.parametrize("m,n,k", [(6144 + 7, 4096, 4096), (1000, 16384, 4096), (333, 2048, 16384)])
def test_gpu_gemm_at_model_shapes(gemm, m, n, k):
    if gemm == "triton persistent" and kernels_int8.gemm_class("cuda") != "hopper":
        pytest.skip("the persistent TMA kernel needs Hopper or datacenter Blackwell")
    operands = on_device(*gemm_operands(m, n, k, (n,), torch.bfloat16))
    y = GEMMS[gemm](*operands, out_dtype=torch.bfloat16)
    ref = formats.int8_scaled_mm(*operands)
    assert torch.allclose(y.float(), ref.float(), rtol=2 ** -7, atol=1e-6)


def test_gemm_class_per_capability(monkeypatch):
    expected = {(7, 5): "turing", (8, 0): "a100", (8, 6): "small-smem", (8, 9): "small-smem", (9, 0): "hopper",
                (10, 0): "hopper", (12, 0): "small-smem"}
    for capability, gpu_class in expected.items():
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, capability=capability: capability)
        assert kernels_int8.gemm_class("cuda") == gpu_class, capability


@gpu
@pytest.mark.parametrize("capability", [(7, 5), (8, 0), (8, 6)])
def test_gpu_before_hopper(monkeypatch, capability):
    """The Ampere tile lists compile and compute the same product, and Turing's call goes to
    torch._int_mm (on this GPU's architecture: what they cost on those cards is not measured here)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    operands = on_device(*gemm_operands(4096, 2048, 4096, (2048,), torch.bfloat16))
    assert not kernels_int8.default_persistent(operands[0], operands[1], torch.bfloat16)
    y = kernels_int8.int8_scaled_mm(*operands)
    assert torch.allclose(y.float(), formats.int8_scaled_mm(*operands).float(), rtol=2 ** -7, atol=1e-6)


@gpu
def test_gpu_every_tile_config():
    """Each config of every tile list (the autotuner keeps only its fastest), on a product with partial
    tiles in M, N and K, output poisoned first; without bias the GPU's result is exact."""
    import triton
    m, n, k = 1000, 784, 1040
    a, b, a_scale, b_scale, _ = on_device(*gemm_operands(m, n, k, (n,), None))
    ref = formats.int8_scaled_mm(a, b, a_scale, b_scale)
    lists = [(False, gpu_class) for gpu_class in kernels_int8.GEMM_TILES]
    if kernels_int8.gemm_class("cuda") == "hopper":
        lists.append((True, "hopper"))
        triton.set_allocator(kernels_int8._tma_allocator)
    sms = kernels_int8._sm_count(torch.device("cuda"))
    for persistent, gpu_class in lists:
        tuned = kernels_int8._autotuned_gemm(persistent, gpu_class)
        for config in tuned.configs:
            y = torch.full_like(ref, float("nan"))
            meta = {**config.kwargs, "B_SCALE_PER_N": True, "HAS_BIAS": False, "INTERPRET": False}
            tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
            if persistent:
                meta["NUM_SMS"] = sms
            tuned.fn[(min(tiles, sms) if persistent else tiles,)](
                a, b, y, a_scale, b_scale, a_scale, m, n, k, 1024, **meta, num_warps=config.num_warps,
                num_stages=config.num_stages)
            assert torch.equal(y, ref), (gpu_class, persistent, config)


@gpu
@pytest.mark.parametrize("gelu,group", [(True, 256), (False, 0)])
def test_gpu_compiled_linear_matches_eager(gelu, group):
    x = random_rows((4096, 4096), torch.bfloat16).cuda()
    w_codes = torch.randint(-127, 128, (2048, 4096), dtype=torch.int8, device="cuda")
    w_scale = torch.rand(2048, device="cuda") * 1e-3
    bias = torch.randn(2048, device="cuda", dtype=torch.bfloat16)

    def linear(x):
        a, a_scale = kernels_int8.quantize_int8_rows(x, gelu, group)
        return kernels_int8.int8_scaled_mm(a, w_codes, a_scale, w_scale, bias)

    eager = linear(x)
    compiled = torch.compile(linear, fullgraph=True)(x)
    assert torch.allclose(compiled.float(), eager.float(), rtol=2 ** -6, atol=1e-2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a check for machines without a GPU: on a GPU machine the "
                    "gpu tests compile and run the real kernels, and the CPU suite runs this one")
def test_kernels_compile_for_each_gpu_class():
    """Every kernel compiles for sm_75, 80, 86 and 90 (Triton's compiler and ptxas, no GPU needed) within
    the class's shared memory and without register spills: the largest tile of each GEMM tile list, the
    quantizers, the expansions (which must not need the FP8 type before sm_89). The compiler needs
    real JIT functions, so this runs outside the interpreter; `--compile-report` prints every tile.
    The failure message keeps every line that is not "ok" whole: ptxas's stderr included."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    bench = os.path.join(os.path.dirname(__file__), "..", "bench", "bench_int8.py")
    result = subprocess.run([sys.executable, bench, "--compile-report=largest"], env=environment,
                            capture_output=True, text=True)
    not_ok = [line for line in result.stdout.splitlines() if not line.startswith("ok ")]
    assert result.returncode == 0, "\n".join(not_ok) + "\n" + result.stderr[-4000:]
