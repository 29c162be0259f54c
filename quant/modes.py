"""How a quantized layer treats its activations, and the NVFP4 speed/exactness switch.

Both are str enums, so they compare equal to their names ("fp8" == Activation.FP8) in configs,
JSON and node inputs.
"""

from __future__ import annotations

from enum import Enum

from . import weights


class Activation(str, Enum):
    """What a layer's input becomes before its GEMM. A layer asks for one; the runtime gives it the
    closest one its GPU runs (runtime.ACTIVATION_FALLBACK), down to NONE."""

    NONE = "none"    # weight-only: the weight is expanded to 16 bits per call, 16-bit GEMM
    FP8 = "fp8"      # W8A8 FP8: per-token dynamic E4M3 (or the layer's static input_scale)
    INT8 = "int8"    # W8A8 INT8: per-token dynamic symmetric INT8 (or the static input_scale)
    NVFP4 = "nvfp4"  # W4A4 NVFP4: per-16-element blocks (Blackwell's native GEMM)

    def __str__(self) -> str:
        return self.value


class Nvfp4Mode(str, Enum):
    """`fast`: NVFP4 layers run the fastest path (native W4A4 on Blackwell, FP8 W8A8 on Ada/Hopper);
    `exact`: weight-only everywhere (expanded to 16 bits per call, no activation rounding)."""

    FAST = "fast"
    EXACT = "exact"

    def __str__(self) -> str:
        return self.value


NVFP4_MODES = tuple(mode.value for mode in Nvfp4Mode)


def nvfp4_mode(value: str) -> Nvfp4Mode:
    try:
        return Nvfp4Mode(value)
    except ValueError:
        raise ValueError(f"unknown nvfp4 mode {value!r}; choose one of: {', '.join(NVFP4_MODES)}") from None


def layer_activation(conf: dict, mode: str = Nvfp4Mode.FAST) -> Activation:
    """The activations a layer of a ComfyUI per-layer config asks for: weight-only where the file asks
    for full precision matmuls (and NVFP4 in `exact` mode); otherwise its format's own pairing:
    FP8 and MXFP8 layers W8A8 FP8, INT8 layers W8A8 INT8, NVFP4 layers W4A4."""
    fmt = weights.format_from_conf(conf)
    if conf.get("full_precision_matrix_mult"):
        return Activation.NONE
    if fmt == weights.NVFP4:
        return Activation.NVFP4 if nvfp4_mode(mode) == Nvfp4Mode.FAST else Activation.NONE
    if fmt in weights.INT8_FORMATS:
        return Activation.INT8
    return Activation.FP8
