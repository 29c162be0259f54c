"""cuDNN FP8 flash attention (the cudnn-fp8 implementation of quant/attention.py) through NVIDIA's
cudnn-frontend package, which ComfyUI does not bring: `pip install nvidia-cudnn-frontend`."""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from .attention_8bit import FP32_TINY, centred_range, empty_output
from .formats import FP8_MAX, cast_to_fp8

# Hopper and newer. cuDNN 9.19's FP8 forward runs ~1,050 TFLOP/s on an H200 where its bf16 one (torch SDPA's
# choice there) runs ~700 (cudnn-frontend's published benchmark, head size 128, no mask); it takes one scale
# per tensor for Q, K and V.

P_SCALE = 256.0  # softmax probabilities (<= 1) times this are E4M3; a power of two, so undone exactly
# The output is E4M3 in V's scale times this. Exact softmax weights keep each output row inside V's range,
# but cuDNN rounds P to E4M3 before P V and divides by the fp32 row sum, so a row can exceed it by several
# percent. A power of two: only the output's subnormal range moves.
O_HEADROOM = 2.0


def fp8_attention_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q, k, v (B, H, S, D) -> (q8, k8, v8, descales, v_mean): E4M3 in the inputs' layout with one fp32
    decode scale each (descales, shape (3,)), K and V first centred on their per-channel means over tokens.
    Softmax ignores K's mean (a constant per row of scores); V's, (B, H, 1, D) fp32, is added back to the
    output exactly, since each row of probabilities sums to 1. E4M3 then carries only the deviations."""
    k_mean, k_amax = centred_range(k)
    v_mean, v_amax = centred_range(v)
    operands, descales = [], []
    centred = ((q.float(), q.abs().amax().float()), (k - k_mean, k_amax.amax()), (v - v_mean, v_amax.amax()))
    for x, amax in centred:
        descale = (amax / FP8_MAX).clamp_min(FP32_TINY)  # zero or denormal: a finite inverse; NaN stays NaN
        operands.append(cast_to_fp8(x * (1.0 / descale)))
        descales.append(descale)
    return *operands, torch.stack(descales), v_mean


_CUDNN_HANDLES: dict[int, object] = {}
_CUDNN_GRAPHS: dict[tuple, tuple] = {}


def _cudnn_fp8_graph(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, out: torch.Tensor, scale: float):
    """The built cuDNN graph for these shapes, strides and scale (built once, kept for the process)."""
    key = (q8.device.index, q8.shape, q8.stride(), k8.shape, k8.stride(), v8.shape, v8.stride(), out.stride(), scale)
    if key in _CUDNN_GRAPHS:
        return _CUDNN_GRAPHS[key]
    cudnn = importlib.import_module("cudnn")
    device = q8.device.index
    if device not in _CUDNN_HANDLES:
        _CUDNN_HANDLES[device] = cudnn.create_handle()
    handle = _CUDNN_HANDLES[device]
    fp32, e4m3 = cudnn.data_type.FLOAT, cudnn.data_type.FP8_E4M3
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)
    operands = [graph.tensor(name=name, dim=list(t.shape), stride=list(t.stride()), data_type=e4m3)
                for name, t in (("q", q8), ("k", k8), ("v", v8))]
    scalars = [graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
               for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")]
    o, _, amax_s, amax_o = graph.sdpa_fp8(*operands, *scalars, generate_stats=False, attn_scale=scale,
                                          use_causal_mask=False)
    o.set_output(True).set_dim(list(out.shape)).set_stride(list(out.stride())).set_data_type(e4m3)
    for amax in (amax_s, amax_o):  # the ranges of P and O, for callers that scale by history; unused here
        amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    _CUDNN_GRAPHS[key] = (handle, graph, [*operands, o, amax_s, amax_o], scalars, graph.get_workspace_size())
    return _CUDNN_GRAPHS[key]


def _cudnn_fp8_launch(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descales: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """E4M3 output (B, H, Sq, D) in V's scale times O_HEADROOM: on Hopper cuDNN's FP8 attention writes only FP8."""
    cudnn = importlib.import_module("cudnn")
    with torch.cuda.device(q8.device):  # a cuDNN handle belongs to the device current when it is made
        out = empty_output(q8)
        handle, graph, tensors, scalars, workspace_size = _cudnn_fp8_graph(q8, k8, v8, out, scale)
        # One scalar per 16 bytes: descale q, k, v, then P's descale and scale, and the output's scale.
        p_scale = torch.full((1,), P_SCALE, device=q8.device)  # made on the GPU: a host copy breaks CUDA graphs
        values = torch.cat([descales.float(), 1 / p_scale, p_scale, 1 / (descales[2:] * O_HEADROOM)])
        values = F.pad(values[:, None], (0, 3))
        amaxes = torch.empty((2, 4), dtype=torch.float32, device=q8.device)
        bindings = dict(zip(tensors, [q8, k8, v8, out, amaxes[0, :1], amaxes[1, :1]]))
        bindings.update((t, values[i, :1]) for i, t in enumerate(scalars))
        workspace = torch.empty(workspace_size, dtype=torch.uint8, device=q8.device)
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(q8.device).cuda_stream)
        graph.execute(bindings, workspace, handle=handle)
    return out


# A torch custom op, so torch.compile keeps the cuDNN call as one node and fuses the operands' preparation
# and the output's decoding around it.
@torch.library.custom_op("ltx2_quant::attention_fp8_cudnn", mutates_args=())
def _cudnn_fp8_op(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descales: torch.Tensor,
                  scale: float) -> torch.Tensor:
    return _cudnn_fp8_launch(q8, k8, v8, descales, scale)


@_cudnn_fp8_op.register_fake
def _(q8, k8, v8, descales, scale):
    return empty_output(q8)


def attention_fp8_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """cuDNN FP8 attention: q (B, H, Sq, D), k/v (B, H, Skv, D), bf16 or fp16 on a CUDA device ->
    (B, H, Sq, D) in q's dtype. Q, K, V, P and the output are E4M3 with one scale per tensor (K and V
    centred, see fp8_attention_operands); softmax and accumulation in fp32."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q8, k8, v8, descales, v_mean = fp8_attention_operands(q, k, v)
    launch = _cudnn_fp8_op if torch.compiler.is_compiling() else _cudnn_fp8_launch
    out8 = launch(q8, k8, v8, descales, scale)
    return (out8.float() * (descales[2] * O_HEADROOM) + v_mean).to(q.dtype)
