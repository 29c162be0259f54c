"""Running quantized linears as fast as the device allows.

`choose_path()` picks, per format and policy, the fastest correct path the device has, decided up
front from the compute capability (Hopper fails MX/NVFP4 GEMMs only at run time, so we never try).
`prepare()` turns a QuantizedWeight into the tensors that path reads on every call (done once, at
load), and `run()` is the per-call hot path: plain tensor ops, no Python-side dispatch per op.

Paths:
  reference      CPU and GPUs without FP8 tensor cores: dequantize, matmul in the compute dtype.
  bf16-dequant   weight-only FP8 (fp8-cast): E4M3 -> bf16 just in time, cuBLAS bf16 GEMM.
  fp8-rowwise    W8A8: activations quantized per token by a Triton kernel (or with the static
                 input_scale), torch._scaled_mm rowwise with fast accumulation.
  mxfp8-as-fp8   Hopper/Ada MXFP8: at load, each row's 1x32 E8M0 scales are folded into the E4M3
                 elements relative to the row's largest scale (a power-of-two shift, so exact unless
                 an element underflows below E4M3's 2^-9); then fp8-rowwise.
  nvfp4-jit-fp8  Hopper/Ada NVFP4, fast: weights stay 4-bit; per call a Triton kernel expands them to
                 E4M3 with one scale per row (small extra rounding error), then fp8-rowwise.
  nvfp4-jit-bf16 Hopper/Ada NVFP4, exact: per call expanded to bf16, cuBLAS bf16 GEMM.
  mxfp8-native / nvfp4-native  Blackwell block-scaled GEMMs (torch.nn.functional.scaled_mm).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

from . import formats, kernels
from .reference import reference_linear
from .weights import FP8_ROWWISE, FP8_TENSOR, MXFP8, NVFP4, QuantizedWeight, quantize_weight

log = logging.getLogger("ltx2_quant")
T = TypeVar("T")

NVFP4_MODES = ("fast", "exact")
# W8A8 paths through _scaled_mm, and the tensor that holds their per-output-row weight scale.
W8A8_PATHS = {"fp8-rowwise": "weight_scale", "mxfp8-as-fp8": "weight_scale", "nvfp4-jit-fp8": "row_scale"}


@dataclass(frozen=True)
class Capability:
    device_type: str
    compute_capability: tuple[int, int] | None
    triton: bool

    @property
    def fp8_tensor_cores(self) -> bool:  # Ada sm_89, Hopper sm_90, Blackwell
        return self.device_type == "cuda" and self.compute_capability >= (8, 9)

    @property
    def native_block_scaled(self) -> bool:  # Blackwell MXFP8/NVFP4 GEMMs
        return (self.device_type == "cuda" and self.compute_capability >= (10, 0)
                and hasattr(torch.nn.functional, "scaled_mm"))

    def describe(self) -> str:
        if self.device_type != "cuda":
            return self.device_type
        major, minor = self.compute_capability
        return f"cuda sm_{major}{minor}"


def capability(device: torch.device | str) -> Capability:
    device = torch.device(device)
    if device.type != "cuda":
        return Capability(device.type, None, False)
    return Capability("cuda", torch.cuda.get_device_capability(device), kernels.AVAILABLE)


def choose_path(fmt: str, activation: str, cap: Capability, shape: tuple[int, int],
                nvfp4_mode: str = "fast") -> tuple[str, str]:
    """(path, reason) for a layer of `fmt` under a policy's activation mode on `cap`."""
    if nvfp4_mode not in NVFP4_MODES:
        raise ValueError(f"unknown nvfp4 mode {nvfp4_mode!r}; choose one of {NVFP4_MODES}")
    n, k = shape
    if cap.device_type != "cuda":
        return "reference", f"{cap.describe()}: no GPU kernels, dequantize + matmul (correct, slow)"
    if not cap.fp8_tensor_cores:
        return "reference", f"{cap.describe()} has no FP8 tensor cores (needs sm_89+): dequantize every call"
    gemm_ok = n % 16 == 0 and k % 16 == 0
    if fmt in (FP8_TENSOR, FP8_ROWWISE):
        if activation == "none":
            return "bf16-dequant", "weight-only FP8: dequantize to bf16 per call, bf16 GEMM"
        if not gemm_ok:
            return "bf16-dequant", f"shape {n}x{k} not a multiple of 16 for _scaled_mm"
        return "fp8-rowwise", _act_quant_reason(cap, "W8A8 _scaled_mm rowwise")
    if fmt == MXFP8:
        if activation == "none":
            return "bf16-dequant", "weight-only MXFP8: re-blocked to per-row FP8 at load, dequantized to bf16 per call"
        if cap.native_block_scaled and gemm_ok and k % 32 == 0:
            return "mxfp8-native", f"{cap.describe()}: native MXFP8 block-scaled GEMM"
        if not gemm_ok:
            return "reference", f"shape {n}x{k} not a multiple of 16 for _scaled_mm"
        return "mxfp8-as-fp8", _act_quant_reason(cap, "MXFP8 re-blocked to per-row power-of-two FP8 at load, "
                                                      "W8A8 _scaled_mm")
    if fmt == NVFP4:
        if cap.native_block_scaled and gemm_ok and k % 32 == 0 and activation == "nvfp4":
            return "nvfp4-native", f"{cap.describe()}: native NVFP4 block-scaled GEMM"
        if not cap.triton:
            return "reference", "Triton missing: NVFP4 dequantized in PyTorch every call (slow)"
        if nvfp4_mode == "exact" or not gemm_ok:
            return "nvfp4-jit-bf16", "NVFP4 kept 4-bit, expanded to bf16 per call (exact)"
        return "nvfp4-jit-fp8", _act_quant_reason(cap, "NVFP4 kept 4-bit, expanded to per-row FP8 per call, "
                                                       "W8A8 _scaled_mm")
    raise ValueError(f"no execution path for format {fmt!r}")


def _act_quant_reason(cap: Capability, what: str) -> str:
    how = "Triton per-token activation quant" if cap.triton else "eager activation quant (Triton missing: slow)"
    return f"{cap.describe()}: {what}, {how}"


def prepare(qw: QuantizedWeight, path: str, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The tensors `run()` reads for `path`, on `device`. Computed once per layer at load."""
    qw = qw.to(device)
    n, k = qw.shape
    if path == "reference":
        return dict(qw.tensors)
    if path == "bf16-dequant" and qw.format == MXFP8:
        tensors = _reblock_mxfp8(qw)
    elif path in ("bf16-dequant", "fp8-rowwise"):
        scale = qw.scale.float()
        tensors = {"weight": qw.data[:n, :k].contiguous(),
                   "weight_scale": (scale.reshape(1, 1).expand(1, n) if scale.numel() == 1
                                    else scale.reshape(1, n)).contiguous()}
    elif path == "mxfp8-as-fp8":
        tensors = _reblock_mxfp8(qw)
    elif path in ("nvfp4-jit-fp8", "nvfp4-jit-bf16", "nvfp4-native"):
        ratio = kernels.nvfp4_row_ratio(qw.scale, qw.shape)
        tensors = {"weight": qw.data, "weight_scale": qw.scale, "weight_scale_2": qw.tensors["weight_scale_2"],
                   "row_ratio": ratio.contiguous(),
                   "row_scale": (qw.tensors["weight_scale_2"].float() / ratio).reshape(1, n).contiguous()}
    elif path == "mxfp8-native":
        tensors = {"weight": qw.data, "weight_scale": qw.scale}
    else:
        raise ValueError(f"unknown path {path!r}")
    if qw.input_scale is not None:
        tensors.update(static_scale_tensors(path, qw.format, tensors, qw.input_scale))
    return tensors


def static_scale_tensors(path: str, fmt: str, tensors: dict[str, torch.Tensor], input_scale: torch.Tensor
                         ) -> dict[str, torch.Tensor]:
    """The tensors a prepared layer adds for a static input_scale: the scale itself and, on the W8A8
    paths, the weight scale with it folded in. An NVFP4 layer's input_scale is the global scale of
    NVFP4 activations (amax/2688: the native GEMM, ComfyUI's files), not an FP8 scale: the Hopper
    FP8 path keeps per-token activations there."""
    scale = input_scale.float().reshape(()).to(tensors["weight"].device)
    out = {"input_scale": scale}
    if path in W8A8_PATHS and fmt != NVFP4:
        out["static_weight_scale"] = tensors[W8A8_PATHS[path]] * scale
    return out


def stored_form(path: str, tensors: dict[str, torch.Tensor], fmt: str, shape: tuple[int, int]) -> QuantizedWeight:
    """The QuantizedWeight a prepared layer holds, without the path's derived helper tensors: the
    inverse of prepare(). For mxfp8-as-fp8 that is the exact per-row FP8 form (an MXFP8 file can be
    re-derived from it, see to_file_format)."""
    n, _ = shape
    keep = {key: tensors[key] for key in ("weight", "weight_scale", "weight_scale_2", "input_scale") if key in tensors}
    if path in ("bf16-dequant", "fp8-rowwise", "mxfp8-as-fp8"):
        scale = keep["weight_scale"]
        if fmt == FP8_TENSOR:
            keep["weight_scale"] = scale.reshape(-1)[0].reshape(())
            return QuantizedWeight(FP8_TENSOR, shape, keep)
        keep["weight_scale"] = scale.reshape(n, 1)
        return QuantizedWeight(FP8_ROWWISE, shape, keep)
    return QuantizedWeight(fmt, shape, keep)


def to_file_format(qw: QuantizedWeight, fmt: str) -> QuantizedWeight:
    """qw in `fmt` for writing: unchanged when it already is; otherwise re-quantized from its exact
    values (MXFP8 from its per-row FP8 form gives back the original bytes except for elements that
    underflowed; per-channel FP8 -> per-tensor for files stock ComfyUI reads)."""
    if qw.format == fmt:
        return qw
    out = quantize_weight(qw.dequantize(torch.float32), fmt)
    if qw.input_scale is not None:
        out.tensors["input_scale"] = qw.input_scale
    return out


def layer_activation(conf: dict) -> str:
    """A ComfyUI per-layer config's activation handling: weight-only where the file asks for full
    precision matmuls and for NVFP4 (its policy reference); W8A8 FP8 otherwise."""
    if conf.get("format") == NVFP4 or conf.get("full_precision_matrix_mult"):
        return "none"
    return "fp8"


def layer_nvfp4_mode(conf: dict, nvfp4_mode: str) -> str:
    """A weight-only NVFP4 layer (full precision matmuls asked) runs exact, whatever the model's mode."""
    return "exact" if conf.get("full_precision_matrix_mult") else nvfp4_mode


# Preference order per device class: fastest first, then smaller.
AUTO_ORDER = {"fp8": ("fp8-scaled-mm", "nvfp4"), "cuda": ("bf16", "fp8-cast", "nvfp4"), "cpu": ("bf16",)}


def choose_auto_policy(cap: Capability, free_bytes: int | None, weight_bytes: dict[str, int],
                       headroom_bytes: int) -> tuple[str, str]:
    """The first policy in the device's preference order whose weights plus `headroom_bytes` (for
    activations) fit `free_bytes`, and why; the smallest one (relying on offload) if none fits."""
    kind = "fp8" if cap.fp8_tensor_cores else cap.device_type if cap.device_type in AUTO_ORDER else "cpu"
    order = AUTO_ORDER[kind]
    if free_bytes is None:
        return order[0], f"{cap.describe()}: {order[0]} is the fastest correct path here"
    gib = 2 ** 30
    for name in order:
        need = weight_bytes[name] + headroom_bytes
        if need <= free_bytes:
            return name, (f"{cap.describe()}: {name} is the fastest path that fits ({need / gib:.1f} GiB incl. "
                          f"{headroom_bytes / gib:.1f} GiB activations <= {free_bytes / gib:.1f} GiB free)")
    smallest = min(order, key=lambda name: weight_bytes[name])
    return smallest, (f"{cap.describe()}: nothing fits {free_bytes / gib:.1f} GiB free; {smallest} is the smallest "
                      f"({weight_bytes[smallest] / gib:.1f} GiB), ComfyUI will offload part of it")


def out_of_memory_advice(stage: str, policy: str, need_bytes: dict[str, int], total_bytes: int | None,
                         basis: str) -> str:
    """What to do after running out of GPU memory while `stage` with `policy`: the smaller policies
    whose need (`need_bytes`, per policy, computed as `basis` says) fits a GPU of `total_bytes`,
    best quality first, else the smallest one with offloading; and a smaller video."""
    gib = 2 ** 30
    current = need_bytes[policy]
    smaller = sorted((name for name in need_bytes if need_bytes[name] < current), key=need_bytes.get, reverse=True)
    fits = [name for name in smaller if total_bytes is None or need_bytes[name] <= total_bytes]
    gpu = f" on this {total_bytes / gib:.1f} GiB GPU" if total_bytes else ""
    lines = [f"LTX-2 Quant: out of GPU memory while {stage} with policy {policy}: it needs about "
             f"{current / gib:.1f} GiB ({basis}){gpu}."]
    if fits:
        lines.append("Policies that fit: " + ", ".join(f"{name} (about {need_bytes[name] / gib:.1f} GiB)"
                                                       for name in fits) + ".")
    elif smaller:
        lines.append(f"{smaller[-1]} needs the least (about {need_bytes[smaller[-1]] / gib:.1f} GiB); with it "
                     "ComfyUI keeps part of the model in system memory (slower, but it runs).")
    lines.append("A smaller video (fewer frames, lower resolution) needs less memory at any policy. "
                 "The memory of the failed run was released; the next prompt can run.")
    return " ".join(lines)


def call_or_advise_on_oom(call: Callable[[], T], advice: Callable[[], str], release: Callable[[], None]) -> T:
    """call(); if it runs out of GPU memory: release(), then torch.OutOfMemoryError(advice()). The
    original error is dropped first: its traceback holds the failed call's frames and with them
    every tensor it allocated, which release() could not free while it lives."""
    try:
        return call()
    except torch.OutOfMemoryError:
        pass
    release()
    raise torch.OutOfMemoryError(advice())


def _reblock_mxfp8(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """MXFP8 -> E4M3 with one power-of-two scale per row: element * 2^(e_block - e_rowmax)."""
    n, k = qw.shape
    rows, cols = qw.data.shape
    exponents = formats.unswizzle_scales(qw.scale, rows, cols // formats.MXFP8_BLOCK).to(torch.int32)
    row_max = exponents.amax(dim=1, keepdim=True)
    shift = torch.exp2((exponents - row_max).float())  # <= 1, exact powers of two
    blocks = qw.data.float().reshape(rows, -1, formats.MXFP8_BLOCK) * shift.unsqueeze(-1)
    data = formats.cast_to_fp8(blocks.reshape(rows, cols))[:n, :k].contiguous()
    row_scale = formats.e8m0_to_float(row_max.to(torch.uint8))[:n].reshape(1, n)
    return {"weight": data, "weight_scale": row_scale.contiguous()}


_UNIT_ROW_SCALES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _unit_row_scales(rows: int, device: torch.device) -> torch.Tensor:
    """A cached (rows, 1) tensor of ones: rowwise _scaled_mm wants a per-row activation scale even
    when a static scale is already folded into the weight's (saves a launch per call). Under
    torch.compile the ones are made in the graph: looking them up in this dict would be a Dynamo guard
    that fails once the dict has changed (a second compile per new token count)."""
    if torch.compiler.is_compiling():
        return torch.ones((rows, 1), dtype=torch.float32, device=device)
    key = (rows, device)
    if key not in _UNIT_ROW_SCALES:
        _UNIT_ROW_SCALES[key] = torch.ones((rows, 1), dtype=torch.float32, device=device)
    return _UNIT_ROW_SCALES[key]


def _scaled_mm_rowwise(x2d: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                       input_scale: torch.Tensor | None, out_dtype: torch.dtype, gelu: bool = False) -> torch.Tensor:
    """W8A8 with per-token activation scales, or with a static input_scale (then `w_scale` must
    already include it: prepare() folds it in as `static_weight_scale`). `gelu`: the kernel applies
    the tanh GELU to x2d as it quantizes (only on the GPU kernels; run() applies it before otherwise)."""
    fast = kernels.AVAILABLE and x2d.is_cuda
    if input_scale is not None:
        a = kernels.quantize_fp8_static(x2d, input_scale, gelu) if fast else formats.quantize_fp8_static(x2d, input_scale)
        a_scale = _unit_row_scales(x2d.shape[0], x2d.device)
    else:
        a, a_scale = kernels.quantize_fp8_rows(x2d, gelu) if fast else formats.quantize_fp8_rowwise_dynamic(x2d)
    return torch._scaled_mm(a, w_fp8.t(), scale_a=a_scale, scale_b=w_scale,
                            bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype,
                            # Hopper's fast FP8 accumulation: measured on the 48-block model it moved the final-latent
                            # error by 0.5% (0.0382 vs 0.0380) and saved ~2% of the step (docs/BENCHMARKS.md).
                            use_fast_accum=True)


def ffn_gelu(x: torch.Tensor) -> torch.Tensor:
    """The LTX FeedForward's activation (ComfyUI's GELU_approx): GELU, tanh approximation."""
    return torch.nn.functional.gelu(x, approximate="tanh")


def gelu_fuses(path: str, device: torch.device) -> bool:
    """Whether run(..., input_gelu=True) applies the GELU inside the activation quantization kernel."""
    return path in W8A8_PATHS and kernels.AVAILABLE and device.type == "cuda"


def run(x: torch.Tensor, path: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int],
        bias: torch.Tensor | None, fmt: str, activation: str, input_gelu: bool = False) -> torch.Tensor:
    """y = x @ W^T + b for a prepared layer (`input_gelu`: y = gelu_tanh(x) @ W^T + b, the GELU fused
    into the activation quantization where gelu_fuses(), else applied first as the model would).
    Output dtype follows x (bf16 on the fast paths)."""
    fused_gelu = input_gelu and gelu_fuses(path, x.device)
    if input_gelu and not fused_gelu:
        x = ffn_gelu(x)
    n, k = shape
    lead = x.shape[:-1]
    x2d = x.reshape(-1, k)
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    input_scale = tensors.get("input_scale")
    if path == "reference":
        qw = QuantizedWeight(fmt, shape, dict(tensors))
        y = reference_linear(x2d, qw, bias, activation).to(x.dtype)
    elif path == "bf16-dequant":
        if kernels.AVAILABLE and x2d.is_cuda:
            w = kernels.fp8_rows_to_bf16(tensors["weight"], tensors["weight_scale"]).to(out_dtype)
        else:
            w = formats.dequantize_fp8(tensors["weight"], tensors["weight_scale"].reshape(n, 1), out_dtype)
        y = torch.nn.functional.linear(x2d.to(out_dtype), w, None if bias is None else bias.to(out_dtype))
    elif path in W8A8_PATHS:
        if path == "nvfp4-jit-fp8":
            w = kernels.nvfp4_to_fp8(tensors["weight"], tensors["weight_scale"], tensors["weight_scale_2"],
                                     tensors["row_ratio"], n, k)
        else:
            w = tensors["weight"]
        static = "static_weight_scale" in tensors
        w_scale = tensors["static_weight_scale"] if static else tensors[W8A8_PATHS[path]]
        y = _scaled_mm_rowwise(x2d, w, w_scale, bias, input_scale if static else None, out_dtype, fused_gelu)
    elif path == "nvfp4-jit-bf16":
        w = kernels.nvfp4_to_bf16(tensors["weight"], tensors["weight_scale"], tensors["weight_scale_2"], n, k)
        y = torch.nn.functional.linear(x2d.to(torch.bfloat16), w, None if bias is None else bias.to(torch.bfloat16))
    elif path == "mxfp8-native":
        y = _mxfp8_native(x2d, tensors, out_dtype)[: x2d.shape[0], :n]
        y = y if bias is None else y + bias.to(out_dtype)
    elif path == "nvfp4-native":
        y = _nvfp4_native(x2d, tensors, out_dtype)[: x2d.shape[0], :n]
        y = y if bias is None else y + bias.to(out_dtype)
    else:
        raise ValueError(f"unknown path {path!r}")
    return y.reshape(*lead, n)


def _mxfp8_native(x2d, tensors, out_dtype):
    """Blackwell: activations to MXFP8 (1x32 E8M0, swizzled), native block-scaled GEMM."""
    from torch.nn.functional import ScalingType, SwizzleType
    a, a_scales = formats.quantize_mxfp8(x2d)
    return torch.nn.functional.scaled_mm(
        a, tensors["weight"].t(), a_scales.view(torch.float8_e8m0fnu).reshape(-1), ScalingType.BlockWise1x32,
        tensors["weight_scale"].view(torch.float8_e8m0fnu).reshape(-1), ScalingType.BlockWise1x32,
        swizzle_a=SwizzleType.SWIZZLE_32_4_4, swizzle_b=SwizzleType.SWIZZLE_32_4_4,
        output_dtype=out_dtype)


def _nvfp4_native(x2d, tensors, out_dtype):
    """Blackwell: activations to NVFP4 (global scale from input_scale or the live amax), native GEMM."""
    from torch.nn.functional import ScalingType, SwizzleType
    global_a = tensors.get("input_scale")
    a, a_scales, global_a = formats.quantize_nvfp4(x2d, global_a)
    return torch.nn.functional.scaled_mm(
        a.view(torch.float4_e2m1fn_x2), tensors["weight"].view(torch.float4_e2m1fn_x2).t(),
        [a_scales.reshape(-1), global_a.reshape(())], [ScalingType.BlockWise1x16, ScalingType.TensorWise],
        [tensors["weight_scale"].reshape(-1), tensors["weight_scale_2"].reshape(())],
        [ScalingType.BlockWise1x16, ScalingType.TensorWise],
        swizzle_a=[SwizzleType.SWIZZLE_32_4_4, SwizzleType.NO_SWIZZLE],
        swizzle_b=[SwizzleType.SWIZZLE_32_4_4, SwizzleType.NO_SWIZZLE], output_dtype=out_dtype)


class PreparedLinear:
    """One quantized linear bound to a device path: `y = layer(x)`. Logs its path once."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, activation: str,
                 device: torch.device | str, nvfp4_mode: str = "fast", name: str = ""):
        cap = capability(device)
        self.shape, self.format, self.activation = qw.shape, qw.format, activation
        self.path, self.reason = choose_path(qw.format, activation, cap, qw.shape, nvfp4_mode)
        self.tensors = prepare(qw, self.path, device)
        self.bias = None if bias is None else bias.to(device)
        log.debug("%s %s -> %s (%s)", name, qw.format, self.path, self.reason)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return run(x, self.path, self.tensors, self.shape, self.bias, self.format, self.activation)
