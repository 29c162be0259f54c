"""GPTQ rounding (quant.rounding) and the calibration's input Hessians (quant.calibration)."""

import pytest
import torch

from quant import formats, rounding
from quant.calibration import AmaxRecorder, CalibrationError
from quant.outliers import Outliers
from quant.weights import FP8_ROWWISE, FP8_TENSOR, INT8, INT8_CONVROT, MXFP8, NVFP4, quantize_weight

FORMATS = (FP8_ROWWISE, FP8_TENSOR, MXFP8, NVFP4, INT8, INT8_CONVROT)


def correlated_case(n=128, k=512, tokens=2048, seed=0):
    """A weight and inputs whose features are mixed (so H has large off-diagonal terms) and a few of
    them large, as real layer inputs are."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    mix = torch.eye(k) + torch.randn(k, k, generator=g) / k ** 0.5
    x = torch.randn(tokens, k, generator=g) @ mix
    x[:, torch.randperm(k, generator=g)[:4]] *= 20
    return w, x, x.t() @ x / tokens


def blocks_of(h, b):
    k = h.shape[0]
    return h.reshape(k // b, b, k // b, b).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


def output_error(x, w, qw):
    return float((x @ (w - qw.dequantize()).t()).norm() / (x @ w.t()).norm())


def same_bytes(a, b):
    assert a.tensors.keys() == b.tensors.keys()
    for name in a.tensors:
        assert torch.equal(a.tensors[name].reshape(-1).view(torch.uint8), b.tensors[name].reshape(-1).view(torch.uint8)), name


@pytest.mark.parametrize("fmt", FORMATS)
def test_gptq_lowers_the_output_error_on_correlated_inputs(fmt):
    w, x, h = correlated_case(seed=1)
    nearest = output_error(x, w, quantize_weight(w, fmt))
    full = output_error(x, w, rounding.gptq_quantize(w, fmt, h))
    block = output_error(x, w, rounding.gptq_quantize(w, fmt, blocks_of(h, 128)))
    # Measured on seeds 1 and 2: full H 0.37-0.74x round-to-nearest's error (8-bit grids gain least),
    # 128-blocks 0.46-0.93x.
    assert full < 0.8 * nearest
    assert full < block < nearest


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != INT8_CONVROT])  # ConvRot's rotated H is not diagonal
def test_gptq_with_a_diagonal_hessian_is_round_to_nearest(fmt):
    w, _, _ = correlated_case(seed=2)
    d = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(3)) + 0.1
    gptq = rounding.gptq_quantize(w, fmt, torch.diag(d))
    same_bytes(gptq, quantize_weight(w, fmt, hessian=d))  # NVFP4: the same weighted block-scale search
    if fmt != NVFP4:
        same_bytes(gptq, quantize_weight(w, fmt))  # the diagonal changes nothing else
    same_bytes(rounding.gptq_quantize(w, fmt, blocks_of(torch.diag(d), 64)), gptq)


@pytest.mark.parametrize("fmt", (FP8_ROWWISE, NVFP4))
def test_gptq_is_deterministic_and_one_block_is_the_full_matrix(fmt):
    w, _, h = correlated_case(n=64, k=256, seed=4)
    first = rounding.gptq_quantize(w, fmt, h)
    same_bytes(first, rounding.gptq_quantize(w.clone(), fmt, h.clone()))
    same_bytes(first, rounding.gptq_quantize(w, fmt, h.unsqueeze(0)))


def test_features_calibration_never_saw_take_no_error():
    w, x, _ = correlated_case(n=64, k=256, seed=5)
    x[:, :32] = 0  # never active: their weights may round anyhow, nothing is pushed onto them either
    h = x.t() @ x
    q = rounding.gptq_quantize(w, FP8_ROWWISE, h).dequantize()
    assert torch.equal(q[:, :32], quantize_weight(w, FP8_ROWWISE).dequantize()[:, :32])
    assert torch.isfinite(q).all()


def test_smoothing_rounds_under_the_smoothed_hessian():
    w, x, h = correlated_case(n=64, k=256, seed=6)
    amax = x.abs().amax(0)
    handling = Outliers(smooth_alpha=0.5)
    smoothed = quantize_weight(w, FP8_ROWWISE, handling, amax)
    p = smoothed.pre_quant_scale.float()
    expected = rounding.gptq_quantize(w / p, FP8_ROWWISE, p[:, None] * h * p[None, :])
    got = quantize_weight(w, FP8_ROWWISE, handling, amax, hessian=h)
    assert torch.equal(got.data.view(torch.uint8), expected.data.view(torch.uint8))
    assert output_error(x, w, got) < output_error(x, w, smoothed)
    # every form of H scales the same way
    assert torch.allclose(rounding.smoothed_hessian(blocks_of(h, 64), p), blocks_of(p[:, None] * h * p[None, :], 64))
    assert torch.allclose(rounding.smoothed_hessian(h.diagonal(), p), (p[:, None] * h * p[None, :]).diagonal())


def test_weighted_block_scale_search_minimizes_the_weighted_error():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 256, generator=g)
    importance = torch.rand(256, generator=g) ** 4  # a few columns matter, most barely
    plain = quantize_weight(w, NVFP4).dequantize()
    weighted = quantize_weight(w, NVFP4, hessian=importance).dequantize()
    per_block = lambda q: ((q - w).square() * importance).reshape(64, -1, formats.NVFP4_BLOCK).sum(-1)  # noqa: E731
    # both pick among the same candidate scales; the weighted search picks each block's best
    assert (per_block(weighted) <= per_block(plain) + 1e-12).all()
    assert per_block(weighted).sum() < 0.95 * per_block(plain).sum()


def test_recorder_sums_the_input_hessian_in_blocks_or_diagonal():
    g = torch.Generator().manual_seed(8)
    calls = [torch.randn(2, 7, 256, generator=g), torch.randn(5, 256, generator=g)]
    rows = torch.cat([c.reshape(-1, 256) for c in calls])
    full = rows.t() @ rows / len(rows)
    for block, expected in ((0, full.diagonal()), (64, blocks_of(full, 64)), (1024, full.unsqueeze(0))):
        recorder = AmaxRecorder(hessian_block=block)
        for c in calls:
            recorder.observe("layer", c)
        assert torch.allclose(recorder.hessians()["layer"], expected, atol=1e-5)
        assert torch.equal(recorder.per_channel()["layer"], rows.abs().amax(0))
    assert AmaxRecorder().hessians() == {}
    with pytest.raises(CalibrationError, match="not a whole number of Hessian blocks"):
        AmaxRecorder(hessian_block=96).observe("layer", calls[1])


def test_hessian_file_round_trip_and_refusals(tmp_path):
    from quant.calibration import load_hessians, save_hessians
    hessians = {"transformer_blocks.0.attn1.to_q": torch.rand(2, 4, 4), "transformer_blocks.0.ff.net.2": torch.rand(8)}
    path = str(tmp_path / "calibration.hessian.safetensors")
    save_hessians(path, hessians, overwrite=False)
    loaded = load_hessians(path)
    assert loaded.keys() == hessians.keys() and all(torch.equal(loaded[k], hessians[k]) for k in hessians)
    from quant.safetensors_io import save_tensors
    for bad in (torch.full((4,), float("nan")), torch.rand(2, 4, 3), -torch.ones(4)):
        save_tensors(path, {"transformer_blocks.0.attn1.to_q.input_quantizer.hessian": bad}, overwrite=True)
        with pytest.raises(CalibrationError, match="is not an input Hessian"):
            load_hessians(path)
    (tmp_path / "junk").write_bytes(b"not safetensors")
    with pytest.raises(CalibrationError, match="not a readable Hessian file"):
        load_hessians(str(tmp_path / "junk"))
