"""Error-compensating weight rounding (GPTQ): the columns of a weight are rounded in order, and each
column's rounding error is pushed onto the columns not yet rounded through the inverse of the input
Hessian H = X^T X, so that the layer's output error ||X (W - Q)^T|| is what gets minimized, not the
weight error ||W - Q||. Any grid works: the scale of a block (NVFP4: 16 columns, MXFP8: 32, FP8 and
INT8: a whole row) is chosen when its first column is reached, from the weights as updated so far.

H comes from calibration (quant.calibration.HessianRecorder), in one of three forms:
- (K,): its diagonal (per-channel mean square). GPTQ with a diagonal H is round-to-nearest, so
  weights.quantize_weight uses it only to weight the NVFP4 block-scale search (gptq_quantize takes
  the other two forms).
- (K/b, b, b): its diagonal blocks of b columns; errors propagate within a block only.
- (K, K): the full matrix.
"""

from __future__ import annotations

import torch

from . import formats, weights

# Dampening added to H's diagonal, as a fraction of its mean (GPTQ's `percdamp`, 0.01 there): keeps H
# invertible where calibration saw fewer tokens than input features and limits how far errors are
# pushed along directions the calibration barely saw. 0.1: on the real-weights proxy the evaluation
# text's layer-output error was 2-10% lower than with 0.01 (bench/rounding_study.py, docs/quality/log/16).
DAMP = 0.1
# Columns rounded between two updates of the columns after them (GPTQ's lazy batch); a multiple of
# every block size.
BATCH = 128


def dense_hessian(hessian: torch.Tensor, k: int) -> torch.Tensor:
    """The (K, K) matrix a hessian of either GPTQ form stands for (zero off its blocks)."""
    out = torch.block_diag(*hessian.unbind(0)) if hessian.dim() == 3 else hessian
    if tuple(out.shape) != (k, k):
        raise ValueError(f"a hessian of shape {tuple(hessian.shape)} does not fit a weight with {k} input features")
    return out.float()


def smoothed_hessian(hessian: torch.Tensor, pre_quant_scale: torch.Tensor) -> torch.Tensor:
    """The hessian of the smoothed input x * p, diag(p) H diag(p), in H's form."""
    p = pre_quant_scale.float().to(hessian.device)
    if hessian.dim() == 1:
        return hessian * p.square()
    if hessian.dim() == 3:
        blocks = p.reshape(hessian.shape[0], -1)
        return hessian * blocks.unsqueeze(2) * blocks.unsqueeze(1)
    return hessian * p.unsqueeze(1) * p.unsqueeze(0)


class _Grid:
    """One format's rounding: `group` columns share a scale per row; scale() picks it from those
    columns (as updated so far), round() puts a column on it."""

    def __init__(self, fmt: str, w: torch.Tensor, importance: torch.Tensor) -> None:
        self.fmt, self.importance, self.scales = fmt, importance, []
        self.group = {weights.NVFP4: formats.NVFP4_BLOCK, weights.MXFP8: formats.MXFP8_BLOCK}.get(fmt, w.shape[1])
        if w.shape[1] % self.group:
            raise weights.FormatError(f"{fmt} rounding by blocks needs whole blocks of {self.group} input features, "
                              f"this weight has {w.shape[1]}")
        # NVFP4's global scale spans the tensor: from the weight before any error is pushed onto it.
        self.global_scale = formats.nvfp4_global_scale(w) if fmt == weights.NVFP4 else None

    def scale(self, cols: torch.Tensor, start: int) -> torch.Tensor:
        """(rows,) decode scale of the columns `cols` (rows, group) starting at column `start`."""
        if self.fmt == weights.NVFP4:
            code = formats.nvfp4_block_scales(cols.unsqueeze(1), self.global_scale, search_scales=True,
                                              importance=self.importance[start:start + self.group])[:, 0]
            self.scales.append(code)
            return code.float() * self.global_scale
        if self.fmt == weights.MXFP8:
            code = formats.mxfp8_scale_bytes(cols.abs().amax(dim=1))
            self.scales.append(code)
            return formats.e8m0_to_float(code) * (code != 0)
        if self.fmt in (weights.FP8_ROWWISE, weights.FP8_TENSOR):
            scale = formats.fp8_scale(cols, per_channel=self.fmt == weights.FP8_ROWWISE)
        else:  # INT8: per row, as formats.quantize_int8_rows
            scale = (cols.abs().amax(dim=1, keepdim=True) / formats.INT8_MAX).clamp(min=formats.INT8_SCALE_FLOOR)
        self.scales.append(scale)
        return scale.reshape(-1).expand(cols.shape[0])

    def round(self, col: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        divisor = torch.where(scale == 0, torch.ones_like(scale), scale)
        if self.fmt == weights.NVFP4:
            return formats._e2m1_round(col / divisor) * scale
        if self.fmt in (weights.INT8, weights.INT8_CONVROT):
            return (col / divisor).round().clamp(-128.0, formats.INT8_MAX) * scale
        return formats.cast_to_fp8(col * (1.0 / divisor)).float() * scale

    def skeleton(self, shape: tuple[int, int]) -> weights.QuantizedWeight:
        """A QuantizedWeight with the chosen scales and no data yet (requantize_like fills it)."""
        n, k = shape
        if self.fmt in (weights.NVFP4, weights.MXFP8):
            block = self.group
            rows = formats.round_up(n, block)
            codes = torch.zeros((rows, k // block), dtype=self.scales[0].dtype, device=self.scales[0].device)
            codes[:n] = torch.stack(self.scales, dim=1)
            tensors = {"weight_scale": formats.swizzle_scales(codes)}
            if self.fmt == weights.NVFP4:
                tensors["weight_scale_2"] = self.global_scale
                tensors["weight"] = torch.zeros((rows, k // 2), dtype=torch.uint8, device=codes.device)
            else:
                tensors["weight"] = torch.zeros((rows, k), dtype=formats.FP8_DTYPE, device=codes.device)
            return weights.QuantizedWeight(self.fmt, shape, tensors)
        return weights.QuantizedWeight(self.fmt, shape, {"weight_scale": self.scales[0]})


def _inverse_cholesky(h: torch.Tensor, added: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of (H + diag(added))^-1 (GPTQ's), in fp64 for K up to 16k."""
    h = h.double() + torch.diag(added.double())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()


def gptq_quantize(w: torch.Tensor, fmt: str, hessian: torch.Tensor, damp: float | None = None
                  ) -> weights.QuantizedWeight:
    """`w` (N, K) rounded to `fmt` by GPTQ under `hessian` ((K, K) or (K/b, b, b), in the basis of `w`:
    for a smoothed weight, diag(p) H diag(p)); `damp` defaults to DAMP. Deterministic. Input features
    that calibration never saw non-zero (diagonal 0) are rounded to nearest and take no error."""
    weights.check_format(fmt)
    if hessian.dim() not in (2, 3):
        raise ValueError(f"GPTQ needs a (K, K) hessian or its diagonal blocks, got shape {tuple(hessian.shape)}")
    damp = DAMP if damp is None else damp
    n, k = int(w.shape[0]), int(w.shape[1])
    w = w.float().clone()
    group = weights.rotation(fmt)
    if group:  # ConvRot: round in the rotated basis, where x @ R meets W @ R
        w = formats.rotate_groups(w, group)
        r = torch.block_diag(*[formats.hadamard(group, device=w.device)] * (k // group))
        hessian = r @ dense_hessian(hessian, k).to(w.device) @ r
    hessian = hessian.to(w.device).float()
    diagonal = torch.diagonal(hessian, dim1=-2, dim2=-1).reshape(-1).clamp(min=0)
    grid = _Grid(fmt, w, diagonal)
    seen = diagonal > 0
    mean = float(diagonal.mean()) or 1.0
    added = damp * mean + (~seen).float() * mean  # an unseen feature: invertible, and it takes no error
    # Block-diagonal: factor each block alone, and no update crosses a block boundary.
    span = hessian.shape[-1] if hessian.dim() == 3 else k
    if hessian.dim() == 3:
        u = torch.stack([_inverse_cholesky(b, a) for b, a in zip(hessian.unbind(0), added.reshape(-1, span).unbind(0))])
    else:
        u = _inverse_cholesky(hessian, added)
    if hessian.dim() == 3 and span % BATCH and span > BATCH:
        raise ValueError(f"hessian blocks of {span} columns: use a multiple of {BATCH}")
    batch = min(BATCH, span)
    if batch % grid.group and grid.group < k:
        raise ValueError(f"hessian blocks of {span} columns split {fmt}'s blocks of {grid.group}")
    q = torch.empty_like(w)
    scale, seen = None, seen.tolist()  # one transfer, not one sync per column
    for i1 in range(0, k, batch):
        i2 = min(i1 + batch, k)
        if u.dim() == 3:
            u1 = u[i1 // span][i1 % span:i1 % span + (i2 - i1), i1 % span:i1 % span + (i2 - i1)]
        else:
            u1 = u[i1:i2, i1:i2]
        w1 = w[:, i1:i2]
        err = torch.zeros((n, i2 - i1), device=w.device)
        for i in range(i2 - i1):
            j = i1 + i
            if j % grid.group == 0:
                scale = grid.scale(w[:, j:j + grid.group], j)
            q[:, j] = grid.round(w1[:, i], scale)
            if seen[j]:
                e = (w1[:, i] - q[:, j]) / u1[i, i]
                w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
                err[:, i] = e
        end = (i1 // span + 1) * span
        if end > i2:
            ub = u[i1 // span] if u.dim() == 3 else u
            base = (i1 // span) * span if u.dim() == 3 else 0
            w[:, i2:end] -= err @ ub[i1 - base:i2 - base, i2 - base:end - base]
    if group:
        q = formats.rotate_groups(q, group)  # back to the original basis; requantize_like rotates it again
    return weights.requantize_like(grid.skeleton((n, k)), q)
