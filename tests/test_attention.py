"""Attention implementations vs the fp32 math reference, the choice and its fallbacks. Without a GPU
the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py) at small
shapes; CUDA-only backends skip with the reason."""

import math

import pytest
import torch

from quant import attention, attention_8bit, attention_cudnn, kernels
from quant.attention import IMPLEMENTATIONS, choose_attention, probe, reference_attention, relative_error
from quant.formats import cast_to_fp8
from quant.capability import Capability, capability

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HERE = capability(DEVICE)
HOPPER = Capability("cuda", (9, 0), True)
CPU = Capability("cpu", None, False)
# Relative error vs fp32 on unit-normal inputs; the 8-bit ones measured at these seeds with some margin
# (INT8 Q/K with E4M3 P and V ~0.035, E4M3 Q/K/P/V ~0.05).
LOSSY_BOUNDS = {"cudnn-fp8": 0.06, "triton-int8": 0.045, "triton-fp8": 0.06, "kitchen-int8": 0.06}
SHAPES = [(1, 2, 40, 64, 64), (2, 3, 37, 50, 128)]  # (B, H, Sq, Skv, D): one on the block grid, one off it


def runs_here(name: str) -> str | None:
    """Why `name` cannot run in this test environment, or None."""
    why = IMPLEMENTATIONS[name].requires(HERE)
    if why is not None and name.startswith("triton") and kernels.AVAILABLE and kernels.INTERPRET:
        return None  # Triton's CPU interpreter runs the kernels
    return why


def bound(name: str, dtype: torch.dtype) -> float:
    if name in LOSSY_BOUNDS:
        return LOSSY_BOUNDS[name]
    return 1e-5 if dtype == torch.float32 else 1e-2


def inputs(shape, dtype, seed=0):
    b, h, sq, skv, d = shape
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(device=DEVICE, dtype=dtype) for n in (sq, skv, skv)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", attention.ORDER)
def test_implementation_matches_fp32_reference(name, dtype, shape):
    impl = IMPLEMENTATIONS[name]
    if (why := runs_here(name)) is not None:
        pytest.skip(why)
    if dtype not in impl.dtypes:
        pytest.skip(f"{name} takes {impl.dtypes}")
    q, k, v = inputs(shape, dtype)
    out = impl.run(q, k, v, None, None)
    assert out.shape == q.shape and out.dtype == dtype
    err = relative_error(out.cpu(), reference_attention(q, k, v).cpu())
    assert err < bound(name, dtype), err
    if not impl.exact:
        assert err > 1e-4  # 8-bit operands really were used


@pytest.mark.skipif(runs_here("triton-int8") is not None, reason=runs_here("triton-int8") or "")
@pytest.mark.parametrize("block_n", [32, 128])
def test_triton_kernel_takes_every_key_length(block_n, monkeypatch):
    """The main loop issues the next block's scores before this block's softmax and finishes the last
    block after the loop: one key, exactly one block, one past it, and several blocks with a K scale each
    (128 is the GPU's block)."""
    monkeypatch.setattr(attention_8bit, "_TILE", {**attention_8bit._TILE, "BLOCK_N": block_n})
    for skv in (1, block_n, block_n + 1, 300):
        q, k, v = inputs((1, 1, 16, skv, 64), torch.bfloat16, seed=skv)
        k[..., 129:, :] *= 2  # keys past the first K scale block get another scale
        err = relative_error(attention_8bit.attention_8bit(q, k, v).cpu(), reference_attention(q, k, v).cpu())
        assert err < LOSSY_BOUNDS["triton-int8"], (skv, err)
        assert skv == 1 or err > 1e-4  # one key: the output is V's mean, which comes back exactly
    with pytest.raises(ValueError, match="at least one key"):
        attention_8bit.attention_8bit(q, k[..., :0, :], v[..., :0, :])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees the NaN
@pytest.mark.parametrize("name", attention.ORDER)
def test_nan_input_never_passes(name):
    if (why := runs_here(name)) is not None:
        pytest.skip(why)
    for which in range(3):  # a NaN in q, k or v
        tensors = inputs(SHAPES[1], torch.bfloat16)
        tensors[which][0, 1, 5, 7] = float("nan")
        out = IMPLEMENTATIONS[name].run(*tensors, None, None)
        assert out[0, 1].isnan().any(), f"NaN in input {which} vanished"
        assert math.isnan(relative_error(out.cpu(), reference_attention(*tensors).cpu()))


@pytest.mark.skipif(runs_here("triton-int8") is not None, reason=runs_here("triton-int8") or "")
def test_triton_kernel_takes_strided_inputs_and_a_scale():
    b, s, h, d = 1, 45, 2, 64
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(b, s, 3, h, d, generator=g).to(DEVICE, torch.bfloat16)  # ComfyUI-like (B, S, H*D) views
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    out = attention_8bit.attention_8bit(q, k, v, scale=0.05, qk_int8=True)
    assert relative_error(out.cpu(), reference_attention(q, k, v, scale=0.05).cpu()) < LOSSY_BOUNDS["triton-int8"]


@pytest.mark.skipif(runs_here("triton-int8") is not None, reason=runs_here("triton-int8") or "")
def test_v_centring_keeps_the_output_accurate_under_a_large_mean_of_v():
    """V with a large common offset (the mean that diffuse attention returns): E4M3 carries only the
    deviations, so the part of the output that varies keeps its accuracy (0.61 without the centring)."""
    q, k, v = inputs(SHAPES[1], torch.float32, seed=3)
    offset = 20.0
    out = attention_8bit.attention_8bit(q, k, v + offset, qk_int8=True)
    ref = reference_attention(q, k, v)
    assert relative_error((out - offset).cpu(), ref.cpu()) < LOSSY_BOUNDS["triton-int8"]


@pytest.mark.skipif(runs_here("triton-int8") is not None, reason=runs_here("triton-int8") or "")
def test_8bit_kernel_edge_inputs_stay_finite():
    q, k, v = inputs((1, 2, 20, 40, 64), torch.float32, seed=5)  # 40 keys: a masked tail in every tile
    v_tiny = torch.zeros_like(v)
    v_tiny[:, :, 3] = 1e-44  # V's scale would underflow to 0, and zeros times its inverse be NaN (on the GPU)
    tiny = attention_8bit.attention_8bit(q, k, v_tiny)
    assert torch.isfinite(tiny).all() and tiny.abs().max() < 1e-40
    uniform = attention_8bit.attention_8bit(q, k, v, scale=0.0)  # a zero factor times the masked -inf
    assert relative_error(uniform, v.mean(dim=2, keepdim=True).expand_as(q)) < LOSSY_BOUNDS["triton-int8"]
    with pytest.raises(ValueError, match="softmax scale >= 0, not -0.1"):
        attention_8bit.attention_8bit(q, k, v, scale=-0.1)
    with pytest.raises(ValueError, match="head size 64 or 128, not 96"):
        attention_8bit.attention_8bit(*inputs((1, 2, 20, 40, 96), torch.float32))


def emulated_cudnn_fp8(q, k, v, scale=None):
    """cuDNN's FP8 attention in plain fp32 torch on this pack's operands: P = exp(S - row max) times P_SCALE
    in E4M3, the output divided by P's row sums in fp32 and written in E4M3 in V's scale times O_HEADROOM,
    V's mean added."""
    q8, k8, v8, descales, v_mean = attention_cudnn.fp8_attention_operands(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q8.float() @ k8.float().transpose(-1, -2)) * (descales[0] * descales[1] * scale)
    p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    p8 = cast_to_fp8(p * attention_cudnn.P_SCALE).float()
    out = (p8 @ v8.float()) * (descales[2] / attention_cudnn.P_SCALE) / p.sum(dim=-1, keepdim=True)
    out_scale = descales[2] * attention_cudnn.O_HEADROOM
    return (cast_to_fp8(out / out_scale).float() * out_scale + v_mean).to(q.dtype)


@pytest.mark.parametrize("k_offset, v_offset", [(0.0, 0.0), (3.0, 20.0)])
def test_cudnn_fp8_operands_and_their_emulation_match_fp32(k_offset, v_offset):
    """The operands cudnn-fp8 hands cuDNN, run through its arithmetic in plain torch, on any device: the
    error stays that of unit-normal inputs when K and V carry large offsets (the centring takes them out;
    the output's error is measured on its varying part)."""
    q, k, v = inputs((1, 2, 70, 150, 128), torch.float32, seed=11)
    k, v = k + k_offset * torch.randn(1, 2, 1, 128, device=DEVICE), v + v_offset
    q8, k8, v8, descales, v_mean = attention_cudnn.fp8_attention_operands(q, k, v)
    assert q8.dtype == k8.dtype == v8.dtype == torch.float8_e4m3fn and q8.stride() == q.stride()
    for x8, x, descale in ((q8, q, descales[0]), (k8, k - k.mean(2, keepdim=True), descales[1]),
                           (v8, v - v.mean(2, keepdim=True), descales[2])):
        assert x8.float().abs().max() == 448 and torch.allclose(descale, x.abs().max() / 448, rtol=1e-5)
    ref = reference_attention(q, k, v)
    err = relative_error(emulated_cudnn_fp8(q, k, v) - v_offset, ref - v_offset)
    assert 1e-4 < err < LOSSY_BOUNDS["cudnn-fp8"], err


def test_cudnn_fp8_operands_of_zeros_and_nan():
    zeros = torch.zeros(1, 2, 10, 64, device=DEVICE)
    *codes, descales, v_mean = attention_cudnn.fp8_attention_operands(zeros, zeros, zeros)
    assert all(torch.isfinite(descales)) and all(c.float().abs().max() == 0 for c in codes)
    q, k, v = inputs(SHAPES[0], torch.float32)
    for which in range(3):
        tensors = [q.clone(), k.clone(), v.clone()]
        tensors[which][0, 1, 3, 5] = float("nan")
        assert emulated_cudnn_fp8(*tensors).isnan().any(), f"NaN in input {which} vanished"


@pytest.mark.skipif(runs_here("cudnn-fp8") is not None, reason=runs_here("cudnn-fp8") or "")
def test_cudnn_fp8_matches_its_emulation_eager_compiled_and_in_a_cuda_graph():
    """On the GPU: cuDNN against the plain-torch emulation of its arithmetic (they differ by where the online
    softmax takes its running maximum before rounding P), and the same result compiled (the custom op) and
    replayed from a CUDA graph on new inputs (no host copies in the call)."""
    g = torch.Generator().manual_seed(12)  # (B, S, H, D) underneath, as ComfyUI hands them over
    q, k, v = (torch.randn(1, n, 4, 128, generator=g).to(DEVICE, torch.bfloat16).transpose(1, 2) for n in (300, 700, 700))
    out = attention_cudnn.attention_fp8_cudnn(q, k, v, scale=0.07)
    ref = reference_attention(q, k, v, scale=0.07)
    assert relative_error(out, emulated_cudnn_fp8(q, k, v, scale=0.07)) < 0.04
    assert 1e-4 < relative_error(out, ref) < LOSSY_BOUNDS["cudnn-fp8"]
    compiled = torch.compile(attention_cudnn.attention_fp8_cudnn, fullgraph=True)(q, k, v, 0.07)
    assert relative_error(compiled, out) < 0.01
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # builds the cuDNN plan outside the capture
        attention_cudnn.attention_fp8_cudnn(q, k, v, 0.07)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = attention_cudnn.attention_fp8_cudnn(q, k, v, 0.07)
    q.copy_(torch.randn(q.shape, generator=g).to(DEVICE, torch.bfloat16))
    graph.replay()
    assert torch.equal(captured, attention_cudnn.attention_fp8_cudnn(q, k, v, 0.07))


def test_auto_on_cpu_is_torch_sdpa_and_says_why():
    name, reason = choose_attention(CPU, "auto", "cpu", torch.float32)
    assert name == "sdpa"
    assert "cpu" in reason and "sdpa-cudnn (cuDNN attention needs CUDA sm_80+ (cpu))" in reason


def test_requested_kernel_that_cannot_run_falls_back_with_reason():
    name, reason = choose_attention(CPU, "triton-int8")
    assert name == "sdpa"
    assert "triton-int8 (" in reason and "needs CUDA sm_90+" in reason


def test_failing_probe_falls_back_to_the_next():
    # A Hopper-like capability with a CPU device: cuDNN passes the declared check but fails when run.
    name, reason = choose_attention(HOPPER, "sdpa-cudnn", "cpu", torch.bfloat16)
    assert name == "sdpa-flash"  # torch's CPU build has a flash kernel
    assert "sdpa-cudnn (failed on a 128-dim probe: RuntimeError" in reason


@pytest.mark.skipif(not (kernels.AVAILABLE and kernels.INTERPRET), reason="needs Triton's interpreter (CPU tensors)")
@pytest.mark.skipif(IMPLEMENTATIONS["cudnn-fp8"].requires(HOPPER) is None, reason="cudnn-frontend is installed")
def test_auto_8bit_picks_the_triton_kernel_on_hopper_without_cudnn_fp8():
    name, reason = choose_attention(HOPPER, "auto-8bit", "cpu", torch.bfloat16)
    assert name == "triton-int8"
    assert reason.endswith(f"passed over: cudnn-fp8 ({IMPLEMENTATIONS['cudnn-fp8'].requires(HOPPER)})")


@pytest.mark.skipif(not kernels.AVAILABLE, reason="the reasons name Triton's requirement; without Triton they differ")
def test_auto_8bit_passes_over_what_fails():
    # An Ada capability with CPU tensors: the Triton kernels need Hopper, comfy-kitchen's CUDA kernel refuses
    # CPU tensors, so the first exact one is chosen and both are named.
    name, reason = choose_attention(Capability("cuda", (8, 9), True), "auto-8bit", "cpu", torch.bfloat16)
    assert name == "sdpa-flash"
    assert "triton-int8 (Triton 8-bit attention (TMA and FP8 tensor cores) needs CUDA sm_90+" in reason
    assert reason.count("kitchen-int8 (") == 1


def test_8bit_kernels_take_only_long_calls():
    """Short calls (LTX-2.3's text, audio and audio-video attention) go back to ComfyUI's attention."""
    for name, min_tokens in (("triton-int8", attention.MIN_8BIT_TOKENS), ("cudnn-fp8", attention.MIN_CUDNN_FP8_TOKENS)):
        impl = IMPLEMENTATIONS[name]
        long_q, short = (torch.empty(1, 2, n, 128, dtype=torch.bfloat16) for n in (min_tokens, min_tokens - 1))
        assert impl.takes(long_q, long_q, None, True)
        assert not impl.takes(long_q, short, None, True) and not impl.takes(short, long_q, None, True)


def test_wrong_dtype_is_refused_at_choice():
    name, reason = choose_attention(HOPPER, "sdpa-flash", "cpu", torch.float32)
    assert name != "sdpa-flash" and "sdpa-flash (takes bfloat16, float16, the model computes in float32)" in reason


def test_unknown_name_is_refused():
    with pytest.raises(ValueError, match="unknown attention 'flash3'.*auto, auto-8bit, cudnn-fp8, triton-int8"):
        choose_attention(CPU, "flash3")


@pytest.mark.parametrize("result, dtype, expected", [
    (lambda q: torch.zeros_like(q), torch.bfloat16, "exceeds 0.02"),
    (lambda q: torch.full_like(q, float("nan")), torch.float32, "probe error nan"),
    (lambda q: 1 / 0, torch.float32, "failed on a 128-dim probe: ZeroDivisionError")])
def test_probe_rejects_wrong_nan_and_raising(result, dtype, expected):
    broken = attention.Attention("broken", "test", exact=True, masks=False, dtypes=(dtype,), head_dims=None,
                                 requires=lambda cap: None, run=lambda q, k, v, scale, mask: result(q))
    assert expected in probe(broken, "cpu", dtype)
    assert probe(IMPLEMENTATIONS["sdpa"], "cpu", dtype) is None
