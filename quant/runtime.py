"""Running quantized linears as fast as the device allows: a registry of execution paths.

Each ExecutionPath declares the (format, activation) pairs it serves, what it requires of the
device and the layer's shape, how it prepares a QuantizedWeight once at load (`prepare`), how it
runs per call (`run`: plain tensor ops and kernels, no per-op dispatch) and what a call costs in
temporary memory (read by quant.memory). `choose_path()` is a lookup over those declarations,
decided up front from the compute capability (Hopper fails MX/NVFP4 GEMMs only at run time, so we
never try): the first path, in PATHS order, that serves the layer's format and activation and can
run; when none can, the activation falls back (ACTIVATION_FALLBACK: NVFP4 -> FP8 -> weight-only,
INT8 -> weight-only) and the reason says why. A CUDA GPU always finds a GPU path; the fp32 reference
is the path of devices without CUDA, and the tests' oracle.

  nvfp4-native    Blackwell: activations to NVFP4 per 16 elements, native W4A4 block-scaled GEMM.
  mxfp8-native    Blackwell: activations to MXFP8 per 32 elements, native block-scaled GEMM.
  int8-rowwise    Turing and newer: per-token INT8 activations (ConvRot-rotated for ConvRot layers,
                  the FFN GELU fused) by a Triton kernel, Triton INT8 GEMM with the per-token and
                  per-row scales, bias and output cast in its epilogue.
  fp8-rowwise     Ada/Hopper/Blackwell W8A8: per-token E4M3 activations (Triton, or the static
                  input_scale), torch._scaled_mm rowwise with fast accumulation.
  mxfp8-as-fp8    Ada/Hopper MXFP8: at load, each row's 1x32 E8M0 scales are folded into the E4M3
                  elements relative to the row's largest scale (a power-of-two shift, so exact unless
                  an element underflows below E4M3's 2^-9); then fp8-rowwise.
  nvfp4-jit-fp8   Ada/Hopper NVFP4: weights stay 4-bit; per call a Triton kernel expands them to E4M3
                  with one scale per row (small extra rounding error), then fp8-rowwise.
  nvfp4-jit-bf16  any CUDA GPU, NVFP4 weight-only: expanded to 16 bits per call (exact), 16-bit GEMM.
  bf16-dequant    any CUDA GPU, 8-bit weight-only: expanded to 16 bits per call, 16-bit GEMM (fp16 on
                  Turing, which has no bf16).
  reference       devices without CUDA: dequantize, matmul in fp32 (correct, slow).

Layers with outlier transforms (quant.outliers) run on every path: run() multiplies the input by
smoothing's pre_quant_scale before the path quantizes it (one elementwise pass), except on paths whose
activation quantizer applies it itself (`fuses_pre_quant_scale`: the INT8 and FP8 kernels), and adds the
low-rank branch as two thin 16-bit GEMMs on the unquantized input. The reference applies both itself
(reference_linear).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import torch

from . import formats, kernels, kernels_int8
from .capability import Capability, capability
from .modes import Activation
from .reference import reference_linear
from .weights import (FP8_FORMATS, FP8_ROWWISE, FP8_TENSOR, FORMATS, INT8_FORMATS, MXFP8, NVFP4, OUTLIER_SUFFIXES,
                      QuantizedWeight, quantize_weight, rotation)

log = logging.getLogger("ltx2_quant")

# What a layer gets when no path runs its activation mode on this device.
ACTIVATION_FALLBACK = {Activation.NVFP4: Activation.FP8, Activation.FP8: Activation.NONE,
                       Activation.INT8: Activation.NONE, Activation.NONE: None}

Requirement = Callable[[Capability, tuple[int, int]], "str | None"]
# run(x2d, tensors, shape, bias, format, activation, gelu_fused, out_dtype) -> y2d
PathRun = Callable[[torch.Tensor, dict, tuple[int, int], "torch.Tensor | None", str, Activation, bool, torch.dtype],
                   torch.Tensor]


@dataclass(frozen=True)
class ExecutionPath:
    name: str
    summary: str  # what it does, for the load report
    serves: frozenset  # (format, Activation) pairs
    requires: Requirement  # why it cannot run a layer of this shape on this device, None if it can
    prepare: Callable[[QuantizedWeight], dict[str, torch.Tensor]]
    run: PathRun
    expanded_bytes_per_weight: int = 0  # per call, the weight expanded into a temporary of this many bytes/element
    quantizes_input: bool = False  # per call, the input quantized to 8 or 4 bits (W8A8, W4A4)
    row_scale: str | None = None  # W8A8 paths: the prepared tensor holding the (1, N) weight scale
    fuses_gelu: bool = False  # its activation-quantization kernel applies the FFN GELU (run's gelu_fused)
    reblocks_mxfp8: bool = False  # holds an MXFP8 layer as per-row FP8 (3% smaller than MXFP8 storage)
    applies_outliers: bool = False  # its run() applies pre_quant_scale and the low-rank branch itself
    fuses_pre_quant_scale: bool = False  # its activation quantizer multiplies by pre_quant_scale (one pass)


class PathChoice(NamedTuple):
    path: str
    reason: str
    activation: Activation  # what the path makes of the layer's input (the request, or its fallback)


def _every(*checks: Requirement) -> Requirement:
    def requires(cap: Capability, shape: tuple[int, int]) -> str | None:
        for check in checks:
            why = check(cap, shape)
            if why is not None:
                return why
        return None
    return requires


def _gpu(at_least: tuple[int, int] | None, what: str) -> Requirement:
    def requires(cap: Capability, shape: tuple[int, int]) -> str | None:
        if cap.device_type != "cuda":
            return f"{what} needs a CUDA GPU"
        if at_least is not None and not cap.at_least(at_least):
            return f"{what} needs sm_{at_least[0]}{at_least[1]}+ ({cap.describe()})"
        return None
    return requires


def _triton(what: str) -> Requirement:
    return lambda cap, shape: None if cap.triton else f"{what} needs Triton (not installed)"


def _multiples(n_multiple: int, k_multiple: int, what: str) -> Requirement:
    def requires(cap: Capability, shape: tuple[int, int]) -> str | None:
        n, k = shape
        if n % n_multiple or k % k_multiple:
            return f"shape {n}x{k}: {what} needs multiples of {n_multiple}x{k_multiple}"
        return None
    return requires


def _native_block_scaled(cap: Capability, shape: tuple[int, int]) -> str | None:
    if not cap.native_block_scaled:
        return f"native block-scaled GEMMs need Blackwell (sm_100+) and torch.nn.functional.scaled_mm ({cap.describe()})"
    return None


# ---------------------------------------------------------------------------------------------
# prepare: the tensors a path reads per call, computed once per layer at load
# ---------------------------------------------------------------------------------------------

def _row_scale(scale: torch.Tensor, n: int) -> torch.Tensor:
    """A per-tensor or per-row fp32 scale as the (1, N) row that rowwise GEMM epilogues take."""
    scale = scale.float()
    return (scale.reshape(1, 1).expand(1, n) if scale.numel() == 1 else scale.reshape(1, n)).contiguous()


def _prepare_rows(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """FP8 or INT8 data as stored, with its scale as a (1, N) row; MXFP8 re-blocked to per-row FP8."""
    if qw.format == MXFP8:
        return _reblock_mxfp8(qw)
    n, k = qw.shape
    return {"weight": qw.data[:n, :k].contiguous(), "weight_scale": _row_scale(qw.scale, n)}


def _prepare_nvfp4(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    n, _ = qw.shape
    ratio = kernels.nvfp4_row_ratio(qw.scale, qw.shape)
    return {"weight": qw.data, "weight_scale": qw.scale, "weight_scale_2": qw.tensors["weight_scale_2"],
            "row_ratio": ratio.contiguous(),
            "row_scale": (qw.tensors["weight_scale_2"].float() / ratio).reshape(1, n).contiguous()}


def _prepare_as_stored(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in qw.tensors.items() if name != "input_scale"}


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


# ---------------------------------------------------------------------------------------------
# run: one call of a prepared layer on a 2-D input
# ---------------------------------------------------------------------------------------------

_UNIT_ROW_SCALES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _unit_row_scales(rows: int, device: torch.device) -> torch.Tensor:
    """A cached (rows, 1) tensor of ones: rowwise GEMMs want a per-row activation scale even when a
    static scale is already folded into the weight's (saves a launch per call). Under torch.compile
    the ones are made in the graph: looking them up in this dict would be a Dynamo guard that fails
    once the dict has changed (a second compile per new token count)."""
    if torch.compiler.is_compiling():
        return torch.ones((rows, 1), dtype=torch.float32, device=device)
    key = (rows, device)
    if key not in _UNIT_ROW_SCALES:
        _UNIT_ROW_SCALES[key] = torch.ones((rows, 1), dtype=torch.float32, device=device)
    return _UNIT_ROW_SCALES[key]


def _w8a8_weight_scale(path: ExecutionPath, tensors: dict) -> torch.Tensor:
    """The (1, N) weight scale a W8A8 GEMM applies: with a static input_scale folded in, if any."""
    return tensors["static_weight_scale"] if "static_weight_scale" in tensors else tensors[path.row_scale]


def _scaled_mm_rowwise(x2d: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                       input_scale: torch.Tensor | None, out_dtype: torch.dtype, gelu: bool = False,
                       pre_quant_scale: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 FP8 with per-token activation scales, or with a static input_scale (then `w_scale` must
    already include it: prepare() folds it in as `static_weight_scale`). `gelu`: the kernel applies
    the tanh GELU to x2d as it quantizes; `pre_quant_scale`: then multiplies by a smoothed layer's
    factors (quant.outliers)."""
    fast = kernels.AVAILABLE and x2d.is_cuda
    if not fast and pre_quant_scale is not None:  # the plain formulas take gelu=False (gelu_fuses)
        x2d = x2d.float() * pre_quant_scale.float()
    if input_scale is not None:
        a = (kernels.quantize_fp8_static(x2d, input_scale, gelu, pre_quant_scale) if fast
             else formats.quantize_fp8_static(x2d, input_scale))
        a_scale = _unit_row_scales(x2d.shape[0], x2d.device)
    else:
        a, a_scale = (kernels.quantize_fp8_rows(x2d, gelu, pre_quant_scale) if fast
                      else formats.quantize_fp8_rowwise_dynamic(x2d))
    return torch._scaled_mm(a, w_fp8.t(), scale_a=a_scale, scale_b=w_scale,
                            bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype,
                            # Hopper's fast FP8 accumulation: measured on the 48-block model it moved the final-latent
                            # error by 0.5% (0.0382 vs 0.0380) and saved ~2% of the step (docs/BENCHMARKS.md,
                            # "Whole step on Hopper"; bench/bench_model.py --blocks 48).
                            use_fast_accum=True)


def _run_fp8(path: ExecutionPath) -> PathRun:
    def run(x2d, tensors, shape, bias, fmt, activation, gelu, out_dtype):
        if path.name == "nvfp4-jit-fp8":
            n, k = shape
            w = kernels.nvfp4_to_fp8(tensors["weight"], tensors["weight_scale"], tensors["weight_scale_2"],
                                     tensors["row_ratio"], n, k)
        else:
            w = tensors["weight"]
        # An NVFP4 layer's input_scale is the global scale of NVFP4 activations, not an FP8 one.
        static = "static_weight_scale" in tensors
        return _scaled_mm_rowwise(x2d, w, _w8a8_weight_scale(path, tensors), bias,
                                  tensors["input_scale"] if static else None, out_dtype, gelu,
                                  tensors.get("pre_quant_scale"))
    return run


def _run_int8(x2d, tensors, shape, bias, fmt, activation, gelu, out_dtype):
    a, a_scale = kernels_int8.quantize_int8_rows(x2d, gelu, rotation(fmt), tensors.get("pre_quant_scale"))
    return kernels_int8.int8_scaled_mm(a, tensors["weight"], a_scale, tensors["weight_scale"], bias, out_dtype)


def _run_dequant16(x2d, tensors, shape, bias, fmt, activation, gelu, out_dtype):
    n, _ = shape
    data, row_scale = tensors["weight"], tensors["weight_scale"]
    fast = kernels.AVAILABLE and x2d.is_cuda
    if fmt in INT8_FORMATS:
        w = formats.dequantize_int8(data, row_scale.reshape(n, 1), dtype=out_dtype)
        group = rotation(fmt)
        if group:  # the weight stays rotated: rotate the (few-token) input instead, (x H)(W H)^T = x W^T
            x2d = formats.rotate_groups(x2d.to(out_dtype), group)
    else:
        w = (kernels.fp8_rows_to_bf16(data, row_scale, out_dtype) if fast
             else formats.dequantize_fp8(data, row_scale.reshape(n, 1), out_dtype))
    return torch.nn.functional.linear(x2d.to(out_dtype), w, None if bias is None else bias.to(out_dtype))


def _run_nvfp4_16bit(x2d, tensors, shape, bias, fmt, activation, gelu, out_dtype):
    n, k = shape
    if kernels.AVAILABLE and x2d.is_cuda:
        w = kernels.nvfp4_to_bf16(tensors["weight"], tensors["weight_scale"], tensors["weight_scale_2"], n, k,
                                  out_dtype)
    else:
        w = formats.dequantize_nvfp4(tensors["weight"], tensors["weight_scale"], tensors["weight_scale_2"], shape,
                                     out_dtype)
    return torch.nn.functional.linear(x2d.to(out_dtype), w, None if bias is None else bias.to(out_dtype))


def _run_mxfp8_native(x2d, tensors, shape, bias, fmt, activation, gelu, out_dtype):
    """Blackwell: activations to MXFP8 (1x32 E8M0, swizzled), native block-scaled GEMM."""
    from torch.nn.functional import ScalingType, SwizzleType
    a, a_scales = formats.quantize_mxfp8(x2d)
    y = torch.nn.functional.scaled_mm(
        a, tensors["weight"].t(), a_scales.view(torch.float8_e8m0fnu).reshape(-1), ScalingType.BlockWise1x32,
        tensors["weight_scale"].view(torch.float8_e8m0fnu).reshape(-1), ScalingType.BlockWise1x32,
        swizzle_a=SwizzleType.SWIZZLE_32_4_4, swizzle_b=SwizzleType.SWIZZLE_32_4_4, output_dtype=out_dtype)
    y = y[: x2d.shape[0], : shape[0]]
    return y if bias is None else y + bias.to(out_dtype)


def _run_nvfp4_native(x2d, tensors, shape, bias, fmt, activation, gelu, out_dtype):
    """Blackwell: activations to NVFP4 (global scale from input_scale or the live amax), native GEMM."""
    from torch.nn.functional import ScalingType, SwizzleType
    quantize = kernels.quantize_nvfp4_activation if kernels.AVAILABLE and x2d.is_cuda else formats.quantize_nvfp4
    a, a_scales, global_a = quantize(x2d, tensors.get("input_scale"))
    y = torch.nn.functional.scaled_mm(
        a.view(torch.float4_e2m1fn_x2), tensors["weight"].view(torch.float4_e2m1fn_x2).t(),
        [a_scales.reshape(-1), global_a.reshape(())], [ScalingType.BlockWise1x16, ScalingType.TensorWise],
        [tensors["weight_scale"].reshape(-1), tensors["weight_scale_2"].reshape(())],
        [ScalingType.BlockWise1x16, ScalingType.TensorWise],
        swizzle_a=[SwizzleType.SWIZZLE_32_4_4, SwizzleType.NO_SWIZZLE],
        swizzle_b=[SwizzleType.SWIZZLE_32_4_4, SwizzleType.NO_SWIZZLE], output_dtype=out_dtype)
    y = y[: x2d.shape[0], : shape[0]]
    return y if bias is None else y + bias.to(out_dtype)


def _run_reference(x2d, tensors, shape, bias, fmt, activation, gelu, out_dtype):
    return reference_linear(x2d, QuantizedWeight(fmt, shape, dict(tensors)), bias, activation).to(x2d.dtype)


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------

def _pairs(formats_: tuple[str, ...], activation: Activation) -> frozenset:
    return frozenset((fmt, activation) for fmt in formats_)


_SCALED_MM = "_scaled_mm"
_fp8_gemm_shape = _multiples(16, 16, _SCALED_MM)
_block_gemm_shape = _multiples(16, 32, "block-scaled GEMMs")


def _fp8_path(name: str, summary: str, formats_: tuple[str, ...], activation: Activation, extra: Requirement,
              row_scale: str, expanded: int = 0, reblocks: bool = False) -> ExecutionPath:
    base = ExecutionPath(name, summary, _pairs(formats_, activation),
                         _every(_gpu((8, 9), "FP8 tensor cores"), _fp8_gemm_shape, extra),
                         _prepare_nvfp4 if name == "nvfp4-jit-fp8" else _prepare_rows, _run_reference,
                         expanded_bytes_per_weight=expanded, quantizes_input=True, row_scale=row_scale,
                         fuses_gelu=True, reblocks_mxfp8=reblocks, fuses_pre_quant_scale=True)
    return replace(base, run=_run_fp8(base))


# The reference emulates each 8-bit format's own W8A8 (the semantics the GPU paths are tested against)
# and runs NVFP4 weight-only: W4A4 is Blackwell hardware's mode, and ComfyUI's CPU path quantizes no
# activations either, so a CPU model matches a file loaded by stock ComfyUI.
REFERENCE = ExecutionPath(
    "reference", "no GPU kernels: dequantize + fp32 matmul (correct, slow)",
    frozenset({(fmt, Activation.NONE) for fmt in FORMATS} | _pairs((*FP8_FORMATS, MXFP8), Activation.FP8)
              | _pairs(INT8_FORMATS, Activation.INT8)),
    lambda cap, shape: "the fp32 reference is the path of devices without CUDA" if cap.device_type == "cuda" else None,
    _prepare_as_stored, _run_reference, expanded_bytes_per_weight=4, applies_outliers=True)

PATHS: tuple[ExecutionPath, ...] = (
    ExecutionPath("nvfp4-native", "native NVFP4 W4A4 block-scaled GEMM, activations to NVFP4 per 16 elements",
                  _pairs((NVFP4,), Activation.NVFP4), _every(_native_block_scaled, _block_gemm_shape),
                  _prepare_as_stored, _run_nvfp4_native, quantizes_input=True),
    ExecutionPath("mxfp8-native", "native MXFP8 block-scaled GEMM, activations to MXFP8 per 32 elements",
                  _pairs((MXFP8,), Activation.FP8), _every(_native_block_scaled, _block_gemm_shape),
                  _prepare_as_stored, _run_mxfp8_native, quantizes_input=True),
    ExecutionPath("int8-rowwise", "W8A8 INT8: per-token INT8 activations (Triton, ConvRot layers rotated in the same "
                  "pass), Triton INT8 GEMM with the scales and bias in its epilogue",
                  _pairs(INT8_FORMATS, Activation.INT8),
                  _every(_gpu((7, 5), "INT8 tensor cores"), _triton("the INT8 kernels"),
                         _multiples(16, 16, "the INT8 GEMM")),
                  _prepare_rows, _run_int8, quantizes_input=True, fuses_gelu=True, fuses_pre_quant_scale=True),
    _fp8_path("fp8-rowwise", "W8A8 _scaled_mm rowwise, per-token FP8 activations (Triton)", FP8_FORMATS,
              Activation.FP8, lambda cap, shape: None, "weight_scale"),
    _fp8_path("mxfp8-as-fp8", "MXFP8 re-blocked to per-row power-of-two FP8 at load, W8A8 _scaled_mm",
              (MXFP8,), Activation.FP8, lambda cap, shape: None, "weight_scale", reblocks=True),
    _fp8_path("nvfp4-jit-fp8", "NVFP4 kept 4-bit, expanded to per-row FP8 per call, W8A8 _scaled_mm",
              (NVFP4,), Activation.FP8, _triton("NVFP4 expansion"), "row_scale", expanded=1),
    ExecutionPath("nvfp4-jit-bf16", "NVFP4 kept 4-bit, expanded to 16 bits per call (exact), 16-bit GEMM",
                  _pairs((NVFP4,), Activation.NONE), _gpu(None, "NVFP4 expansion"), _prepare_nvfp4,
                  _run_nvfp4_16bit, expanded_bytes_per_weight=2),
    ExecutionPath("bf16-dequant", "weight-only: expanded to 16 bits per call, 16-bit GEMM",
                  _pairs((*FP8_FORMATS, MXFP8, *INT8_FORMATS), Activation.NONE), _gpu(None, "16-bit expansion"),
                  _prepare_rows, _run_dequant16, expanded_bytes_per_weight=2, reblocks_mxfp8=True),
)
BY_NAME = {path.name: path for path in (*PATHS, REFERENCE)}


def choose_path(fmt: str, activation: str, cap: Capability, shape: tuple[int, int]) -> PathChoice:
    """The path for a layer of `fmt` whose activations are asked to be `activation`, why, and the
    activation it runs."""
    if fmt not in FORMATS:
        raise ValueError(f"no execution path for format {fmt!r}")
    candidates = (REFERENCE,) if REFERENCE.requires(cap, shape) is None else PATHS
    asked = wanted = Activation(activation)
    skipped = []
    while wanted is not None:
        for path in candidates:
            if (fmt, wanted) not in path.serves:
                continue
            why = path.requires(cap, shape)
            if why is None:
                reason = f"{cap.describe()}: {path.summary}"
                if wanted != asked:
                    reason += f" ({asked} activations not run here: {'; '.join(skipped) or 'no GPU'})"
                return PathChoice(path.name, reason, wanted)
            skipped.append(f"{path.name}: {why}")
        wanted = ACTIVATION_FALLBACK[wanted]
    raise ValueError(f"no execution path for format {fmt!r} on {cap.describe()}: {'; '.join(skipped)}")


def prepare(qw: QuantizedWeight, path: str, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The tensors `run()` reads for `path`, on `device`. Computed once per layer at load."""
    qw = qw.to(device)
    tensors = BY_NAME[path].prepare(qw)
    tensors.update({key: qw.tensors[key] for key in OUTLIER_SUFFIXES if key in qw.tensors})
    if qw.input_scale is not None:
        tensors.update(static_scale_tensors(path, qw.format, tensors, qw.input_scale))
    return tensors


def takes_static_scale(path: str, fmt: str) -> bool:
    """Whether a layer on `path` quantizes its input with a static input_scale (folded into its
    weight scale): the FP8 W8A8 paths, except for NVFP4 layers (their input_scale is the global scale
    of NVFP4 activations, for the native W4A4 GEMM). The INT8 path takes none: its layers stay
    per-token, as ComfyUI's do (calibration.gets_input_scale says why)."""
    return BY_NAME[path].row_scale is not None and fmt != NVFP4


def static_scale_tensors(path: str, fmt: str, tensors: dict[str, torch.Tensor], input_scale: torch.Tensor
                         ) -> dict[str, torch.Tensor]:
    """The tensors a prepared layer adds for a static input_scale: the scale itself and, where
    takes_static_scale, the weight scale with it folded in."""
    scale = input_scale.float().reshape(()).to(tensors["weight"].device)
    out = {"input_scale": scale}
    if takes_static_scale(path, fmt):
        out["static_weight_scale"] = tensors[BY_NAME[path].row_scale] * scale
    return out


def resident_format(path: str, fmt: str) -> str:
    """The format a layer on `path` holds on the GPU (MXFP8 re-blocked to per-row FP8 on some paths)."""
    return FP8_ROWWISE if fmt == MXFP8 and BY_NAME[path].reblocks_mxfp8 else fmt


def stored_form(path: str, tensors: dict[str, torch.Tensor], fmt: str, shape: tuple[int, int]) -> QuantizedWeight:
    """The QuantizedWeight a prepared layer holds, without the path's derived helper tensors: the
    inverse of prepare(). For a re-blocked MXFP8 layer that is the exact per-row FP8 form (an MXFP8
    file can be re-derived from it, see to_file_format)."""
    n, _ = shape
    keep = {key: tensors[key] for key in ("weight", "weight_scale", "weight_scale_2", "input_scale", *OUTLIER_SUFFIXES)
            if key in tensors}
    if BY_NAME[path].prepare is _prepare_rows:
        scale = keep["weight_scale"]
        if fmt == FP8_TENSOR:
            keep["weight_scale"] = scale.reshape(-1)[0].reshape(())
            return QuantizedWeight(FP8_TENSOR, shape, keep)
        keep["weight_scale"] = scale.reshape(n, 1)
        return QuantizedWeight(resident_format(path, fmt), shape, keep)
    return QuantizedWeight(fmt, shape, keep)


def to_file_format(qw: QuantizedWeight, fmt: str) -> QuantizedWeight:
    """qw in `fmt` for writing: unchanged when it already is; otherwise re-quantized from its exact
    values (MXFP8 from its per-row FP8 form gives back the original bytes except for elements that
    underflowed; per-channel FP8 -> per-tensor for files stock ComfyUI reads)."""
    if qw.format == fmt:
        return qw
    # The quantized part alone is re-quantized: the outlier transforms carry over as they are.
    out = quantize_weight(qw.quantized_part(torch.float32), fmt)
    out.tensors.update({key: qw.tensors[key] for key in ("input_scale", *OUTLIER_SUFFIXES) if key in qw.tensors})
    return out


def ffn_gelu(x: torch.Tensor) -> torch.Tensor:
    """The LTX FeedForward's activation (ComfyUI's GELU_approx): GELU, tanh approximation."""
    return torch.nn.functional.gelu(x, approximate="tanh")


def gelu_fuses(path: str, device: torch.device) -> bool:
    """Whether run(..., input_gelu=True) applies the GELU inside the activation quantization kernel."""
    return BY_NAME[path].fuses_gelu and kernels.AVAILABLE and device.type == "cuda"


def scales_input_outside(path: str) -> bool:
    """Whether run() multiplies a smoothed layer's input by pre_quant_scale itself on `path` (a copy of
    the input): the paths that neither apply it in their own run nor fuse it into their quantizer."""
    spec = BY_NAME[path]
    return not (spec.applies_outliers or spec.fuses_pre_quant_scale)


def outlier_call_bytes(path: str, shape: tuple[int, int], smoothed: bool, rank: int, rows: int) -> int:
    """The temporary bytes run() adds per call for a layer's outlier transforms on `rows` 16-bit input
    rows: x * pre_quant_scale where scales_input_outside (rows x K), and the low-rank branch's rows x rank
    intermediate, its rows x N output and the sum with the path's output (rows x N each). The
    reference applies both in its own fp32 math (its cost is its expansion)."""
    if BY_NAME[path].applies_outliers:
        return 0
    n, k = shape
    per_row = (k if smoothed and scales_input_outside(path) else 0) + (rank + 2 * n if rank else 0)
    return rows * per_row * 2


def run(x: torch.Tensor, path: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int],
        bias: torch.Tensor | None, fmt: str, activation: str, input_gelu: bool = False) -> torch.Tensor:
    """y = x @ W^T + b for a prepared layer (`input_gelu`: y = gelu_tanh(x) @ W^T + b, the GELU fused
    into the activation quantization where gelu_fuses(), else applied first as the model would).
    Output dtype: x's on the reference path, x's 16-bit dtype (bf16 for fp32 x) on the GPU paths."""
    spec = BY_NAME[path]
    branch = None if spec.applies_outliers or "low_rank_down" not in tensors else (
        tensors["low_rank_down"], tensors["low_rank_up"])
    scale_outside = "pre_quant_scale" in tensors and scales_input_outside(path)
    # The GELU comes first: the branch reads gelu(x), and a scale applied here multiplies gelu(x).
    fused_gelu = input_gelu and gelu_fuses(path, x.device) and branch is None and not scale_outside
    if input_gelu and not fused_gelu:
        x = ffn_gelu(x)
    n, k = shape
    lead = x.shape[:-1]
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    x2d = x.reshape(-1, k)
    quantized_input = x2d * tensors["pre_quant_scale"].to(x2d.dtype) if scale_outside else x2d
    y = spec.run(quantized_input, tensors, shape, bias, fmt, activation, fused_gelu, out_dtype)
    if branch is not None:  # the unquantized input through the bf16 low-rank branch: two thin GEMMs
        down, up = branch
        y = y + (x2d.to(out_dtype) @ down.to(out_dtype).t()) @ up.to(out_dtype).t()
    return y.reshape(*lead, n)


class PreparedLinear:
    """One quantized linear bound to a device path: `y = layer(x)`. Logs its path once. `activation`
    is what the layer asks for; after construction it is what the path runs (the closest the device
    has, see ACTIVATION_FALLBACK)."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, activation: str,
                 device: torch.device | str, name: str = ""):
        self.shape, self.format = qw.shape, qw.format
        self.path, self.reason, self.activation = choose_path(qw.format, activation, capability(device), qw.shape)
        self.tensors = prepare(qw, self.path, device)
        self.bias = None if bias is None else bias.to(device)
        log.debug("%s %s -> %s (%s)", name, qw.format, self.path, self.reason)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return run(x, self.path, self.tensors, self.shape, self.bias, self.format, self.activation)
