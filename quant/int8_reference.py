"""INT8 W8A8 in plain torch, computed in fp32: the references quant.kernels_int8 is tested against.

Activations: symmetric per-row (per-token) INT8 with decode scale amax/127, or one calibrated
scale. Same rules as comfy-kitchen's quantize_int8_rowwise (scale floor 1e-30, so a zero row
quantizes to zeros; round half to even), except that the arithmetic is fp32 for every input dtype
(comfy-kitchen divides in the input's dtype) and the element is multiplied by the reciprocal of
the scale, as the FP8 references in quant.formats do. A NaN in a row makes that row's scale NaN
(its codes are 0), so the row's GEMM output is NaN; out-of-range values clamp to +-127.

ConvRot (comfy-kitchen's `convrot`): each group of `group_size` input features is multiplied by
the normalized regular Hadamard matrix kron(H4, ..., H4) / sqrt(group_size), symmetric and
orthogonal; weights are stored rotated (W @ H^T), activations are rotated (x @ H) before their
amax, so the product is unchanged while outliers spread over the group.
"""

from __future__ import annotations

import torch

INT8_MAX = 127
# comfy-kitchen's smallest row scale: an all-zero row gets it and quantizes to zeros.
SCALE_FLOOR = 1e-30
# ComfyUI's regular Hadamard building block; its Kronecker powers are the ConvRot matrices.
H4 = ((1, 1, 1, -1), (1, 1, -1, 1), (1, -1, 1, 1), (-1, 1, 1, 1))


def hadamard(size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """kron(H4, ..., H4) / sqrt(size), fp32, for `size` a power of 4 (comfy-kitchen's _build_hadamard)."""
    if size < 4 or size & (size - 1) or size.bit_length() % 2 == 0:
        raise ValueError(f"a regular Hadamard size is a power of 4, got {size}")
    h4 = torch.tensor(H4, dtype=torch.float32, device=device)
    h = h4
    while h.shape[0] < size:
        h = torch.kron(h, h4)
    return h / size ** 0.5


def rotate(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x @ blockdiag(H, ..., H) over the last dimension, in fp32 (the online activation rotation)."""
    k = x.shape[-1]
    if k % group_size:
        raise ValueError(f"{k} features are not a multiple of the rotation group size {group_size}")
    groups = x.float().reshape(-1, k // group_size, group_size)
    return (groups @ hadamard(group_size, x.device)).reshape(x.shape)


def prepare(x: torch.Tensor, gelu: bool = False, rotate_groupsize: int = 0) -> torch.Tensor:
    """The fp32 values an activation quantizer rounds: tanh GELU first, then the rotation."""
    x = x.float()
    if gelu:
        x = torch.nn.functional.gelu(x, approximate="tanh")
    return rotate(x, rotate_groupsize) if rotate_groupsize else x


def round_to_int8(scaled: torch.Tensor) -> torch.Tensor:
    """Round half to even and clamp to +-127; NaN becomes 0 (only in rows whose scale is NaN)."""
    scaled = torch.where(scaled.isnan(), torch.zeros_like(scaled), scaled)
    return scaled.clamp(-INT8_MAX, INT8_MAX).round().to(torch.int8)


def row_scale(values: torch.Tensor) -> torch.Tensor:
    """fp32 decode scale per row, (rows, 1): amax/127, at least SCALE_FLOOR; NaN stays NaN."""
    return (values.abs().amax(dim=-1, keepdim=True) / INT8_MAX).clamp(min=SCALE_FLOOR)


def quantize_int8_rows(x: torch.Tensor, gelu: bool = False, rotate_groupsize: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> (int8 (M, K), fp32 (M, 1) decode scales) of gelu_tanh(x) (with `gelu`), rotated in
    groups of `rotate_groupsize` features (0: not rotated)."""
    values = prepare(x, gelu, rotate_groupsize)
    scale = row_scale(values)
    return round_to_int8(values * (1.0 / scale)), scale


def quantize_int8_static(x: torch.Tensor, input_scale: torch.Tensor, gelu: bool = False,
                         rotate_groupsize: int = 0) -> torch.Tensor:
    """(M, K) -> int8 with one calibrated fp32 decode scale; values beyond it clamp to +-127."""
    return round_to_int8(prepare(x, gelu, rotate_groupsize) * (1.0 / input_scale.float()))


def int8_scaled_mm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                   bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(a @ b^T as exact integers) * a_scale * b_scale + bias, in fp32 in that order, cast to out_dtype.
    a int8 (M, K), b int8 (N, K), a_scale (M, 1), b_scale (N,), (1, N) or one value, bias (N,).
    The products are summed in float64, exact for any K below 2^53 / 127^2."""
    exact = a.double() @ b.double().t()
    y = exact.float() * a_scale.float().reshape(-1, 1) * b_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
