"""Calibration recording, per-channel calibration files, static scales in every path (clamped, never
Inf/NaN), and the per-layer quality report (`python -m quant quality-layers`)."""

import json

import pytest
import torch

from quant import calibration, cli, formats, ltx2, quality, runtime
from quant.calibration import AmaxRecorder, CalibrationError
from quant.policies import get_policy
from quant.reference import reference_linear
from quant.safetensors_io import save_tensors
from quant.weights import FP8_ROWWISE, MXFP8, NVFP4, quantize_weight


def test_recorder_keeps_running_maxima_per_tensor_and_channel():
    recorder = AmaxRecorder()
    recorder.observe("a", torch.tensor([[1.0, -3.0], [0.5, 2.0]]))
    recorder.observe("a", torch.tensor([[[-4.0, 1.0]]]))  # any leading shape: rows of the last dim
    recorder.observe("b", torch.zeros(3, 2))
    assert torch.equal(recorder.per_channel()["a"], torch.tensor([4.0, 3.0]))
    assert recorder.calls == {"a": 2, "b": 1}
    assert recorder.per_tensor() == {"a": 4.0}  # an all-zero input gives no scale
    recorder.observe("c", torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(CalibrationError, match="^c: .*NaN"):
        recorder.per_tensor()


def test_per_channel_file_round_trip_and_lightricks_readers_see_their_layout(tmp_path):
    path = str(tmp_path / "amax.json")
    channels = {"transformer_blocks.0.attn1.to_q": torch.tensor([1.0, 0.0, 12.5])}
    calibration.save_amax(path, {"transformer_blocks.0.attn1.to_q": 12.5}, channels, overwrite=False)
    raw = json.loads(open(path).read())
    assert raw["amax_values"] == {"transformer_blocks.0.attn1.to_q.input_quantizer": 12.5}
    assert calibration.load_amax(path) == {"transformer_blocks.0.attn1.to_q": 12.5}
    assert torch.equal(calibration.load_channel_amax(path)["transformer_blocks.0.attn1.to_q"], channels[
        "transformer_blocks.0.attn1.to_q"])
    assert not list(tmp_path.glob(".tmp-*"))  # written through a temp file, renamed
    raw["amax_per_channel"]["transformer_blocks.0.attn1.to_q.input_quantizer"] = [1.0, -2.0]
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(CalibrationError, match="bad.json.*transformer_blocks.0.attn1.to_q"):
        calibration.load_channel_amax(str(tmp_path / "bad.json"))
    assert calibration.outlier_ratio(torch.tensor([1.0, 1.0, 1.0, 30.0])) == 30.0


def test_nvfp4_input_scale_is_the_activation_global_scale_and_not_an_fp8_scale():
    assert float(calibration.input_scale(2688.0, NVFP4)) == 1.0
    assert float(calibration.input_scale(448.0, FP8_ROWWISE)) == 1.0
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    qw = quantize_weight(w, NVFP4)
    qw.tensors["input_scale"] = calibration.input_scale(3.0, NVFP4)
    tensors = runtime.prepare(qw, "nvfp4-jit-fp8", "cpu")
    assert "static_weight_scale" not in tensors  # the FP8 path keeps per-token activations
    assert float(tensors["input_scale"]) == pytest.approx(3.0 / 2688)
    fp8 = quantize_weight(w, FP8_ROWWISE)
    fp8.tensors["input_scale"] = calibration.input_scale(3.0)
    tensors = runtime.prepare(fp8, "fp8-rowwise", "cpu")
    assert torch.allclose(tensors["static_weight_scale"], tensors["weight_scale"] * (3.0 / 448))


@pytest.mark.parametrize("fmt", [FP8_ROWWISE, MXFP8])
def test_out_of_range_activation_with_a_static_scale_is_clamped_through_the_runtime(fmt):
    """Activations far beyond the calibrated amax (and Inf) saturate at +-448 * scale before the cast:
    finite outputs, equal to running the clamped input. Unclamped, CUDA casts them to NaN."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=g) * 0.1
    qw = quantize_weight(w, fmt)
    qw.tensors["input_scale"] = calibration.input_scale(2.0)
    x = torch.randn(8, 64, generator=g).clamp(-2, 2)
    x[0, 0], x[1, 1], x[2, 2] = 1e6, -1e30, float("inf")
    layer = runtime.PreparedLinear(qw, None, "fp8", "cpu")
    y = layer(x)
    assert torch.isfinite(y).all()
    clamped = x.clamp(-2.0, 2.0)
    assert torch.allclose(y, reference_linear(clamped, qw, None, "fp8"), rtol=1e-5, atol=1e-5)
    quantized = formats.quantize_fp8_static(x, qw.input_scale).float()
    assert quantized[0, 0] == 448 and quantized[1, 1] == -448 and quantized[2, 2] == 448


def test_nvfp4_activation_quant_with_a_static_global_scale_saturates():
    """The native NVFP4 path quantizes activations with the calibrated global scale: values beyond
    the calibrated amax saturate (E2M1 at 6, block scales at 448), never Inf/NaN."""
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    x[0, :16] = 1e6
    x[1, 20] = float("inf")
    packed, block_scales, global_scale = formats.quantize_nvfp4(x, calibration.input_scale(4.0, NVFP4))
    back = formats.dequantize_nvfp4(packed, block_scales, global_scale, tuple(x.shape))
    assert torch.isfinite(back).all()
    assert back.abs().max() == pytest.approx(4.0, rel=1e-6)  # 6 * 448 * (4 / 2688)


def test_layer_quality_orders_formats_and_reads_snr():
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(64, 128, generator=g) / 11, torch.randn(32, 128, generator=g)
    rows = {fmt: quality.layer_quality("l", w, quantize_weight(w, fmt), None, x, "none")
            for fmt in (FP8_ROWWISE, MXFP8, NVFP4)}
    assert rows[NVFP4].weight_error > 2.5 * rows[FP8_ROWWISE].weight_error  # measured 0.081 vs 0.026
    assert rows[FP8_ROWWISE].output_snr_db > rows[NVFP4].output_snr_db + 8  # measured 31.9 vs 22.0 dB
    assert quality.layer_quality("l", w, w, None, x, "none").output_snr_db == float("inf")
    assert quality.snr_db(torch.tensor([1.1]), torch.tensor([1.0])) == pytest.approx(20.0)
    assert quality.cosine_similarity(x, 2 * x) == pytest.approx(1.0)
    assert quality.branch("transformer_blocks.3.audio_to_video_attn.to_q") == "audio->video attn"
    assert quality.branch("transformer_blocks.3.ff.net.2") == "video ff"


def test_calibrated_inputs_with_outlier_channels_hurt_static_scales_more(tmp_path):
    """Per-channel amax shapes the evaluation inputs; one outlier channel eats the per-tensor static
    scale's resolution, while per-token dynamic scales (no calibration) lose less."""
    config = ltx2.tiny_config(num_layers=2)
    path = str(tmp_path / "model.safetensors")
    save_tensors(path, ltx2.synthetic_state_dict(config), ltx2.header_metadata(config))
    layer = "transformer_blocks.0.attn1.to_q"
    channels = torch.ones(64)
    channels[5] = 200.0
    policy = get_policy("fp8-scaled-mm", include=[], exclude=["*"], keep_first_blocks=0)
    assert quality.file_layer_quality(path, policy) == []  # nothing in scope, nothing measured
    policy = get_policy("fp8-scaled-mm", keep_last_blocks=1, keep_audio=True)
    static = {r.layer: r for r in quality.file_layer_quality(path, policy, {layer: 200.0}, {layer: channels})}
    dynamic = {r.layer: r for r in quality.file_layer_quality(path, policy, None, {layer: channels})}
    assert all(name.startswith("transformer_blocks.0.") for name in static)
    assert static[layer].output_snr_db < dynamic[layer].output_snr_db


def test_quality_layers_command(tmp_path, capsys):
    path = str(tmp_path / "model.safetensors")
    config = ltx2.tiny_config(num_layers=2)
    save_tensors(path, ltx2.synthetic_state_dict(config), ltx2.header_metadata(config))
    out = str(tmp_path / "report.json")
    assert cli.main(["quality-layers", path, "--policy", "nvfp4", "--policy", "fp8-cast", "--worst", "3",
                     "--keep-audio", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "== nvfp4: 28 quantized layers, worst 3" in printed and "branch video ff" in printed
    report = json.loads(open(out).read())
    nvfp4, fp8 = report["policies"]["nvfp4"], report["policies"]["fp8-cast"]
    assert len(nvfp4["layers"]) == 28 and {r["format"] for r in nvfp4["layers"]} == {NVFP4}
    assert nvfp4["groups"]["block 00"]["mean_snr_db"] < fp8["groups"]["block 00"]["mean_snr_db"]
    assert cli.main(["quality-layers", path, "--calibration", str(tmp_path / "missing.json")]) == 1
    assert "missing.json" in capsys.readouterr().err
