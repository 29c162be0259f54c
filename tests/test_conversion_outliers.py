"""Outlier handling through conversion (quant.conversion): a file written or loaded with smoothing and
the low-rank branch carries pre_quant_scale / low_rank_* where the policy asks, reloads through the
pack, and computes what the quantizer made; what is refused, and before any compute.

Per-channel amax follow bench/quality_outliers.py's recipe (outlier channels at the real-weights
proxy's ratios), so smoothed weights have the dominant directions the low-rank branch keeps."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import replace

import pytest
import torch

from quant import comfy_quant, conversion, ltx2, quality, runtime, weights
from quant.calibration import CalibrationError
from quant.checkpoint import inspect_checkpoint
from quant.modes import Nvfp4Mode, layer_activation
from quant.outliers import Outliers
from quant.policies import get_policy
from quant.reference import reference_linear, relative_error
from quant.safetensors_io import CheckpointError, SafetensorsFile, save_tensors

_spec = importlib.util.spec_from_file_location(
    "quality_outliers", os.path.join(os.path.dirname(__file__), "..", "bench", "quality_outliers.py"))
recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe)

CONFIG = ltx2.tiny_config(num_layers=1, heads=4, head_dim=64, audio_heads=2, audio_head_dim=64)
HANDLING = Outliers(smooth_alpha=0.5, low_rank_bytes=0.2)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(bf16 file path, its state dict, per-channel amax of every 2-D weight's input)."""
    state = ltx2.synthetic_state_dict(CONFIG, seed=5)
    path = tmp_path_factory.mktemp("outliers") / "model.safetensors"
    save_tensors(str(path), state, ltx2.header_metadata(CONFIG))
    g = torch.Generator().manual_seed(6)
    channels = {key[: -len(".weight")]: recipe.outlier_gains(t.shape[1], 42.0, g) * 3.0
                for key, t in state.items() if key.endswith(".weight") and t.dim() == 2}
    return str(path), state, channels


def smoothed_policy(name: str, handling: Outliers = HANDLING):
    return replace(get_policy(name), outliers=handling)


@pytest.mark.parametrize("policy_name", ["int8-convrot", "nvfp4", "fp8-scaled-mm"])
def test_written_file_reloads_and_computes_what_the_quantizer_made(model, tmp_path, policy_name):
    path, state, channels = model
    out = tmp_path / "q.safetensors"
    policy = smoothed_policy(policy_name)
    result = conversion.quantize_file(path, str(out), policy, channel_amax=channels, calibration="cal.json")
    smoothed = [d for d in result.decisions if d.outliers.smooth_alpha]
    assert smoothed and all(d.target_format == weights.fitting_format(policy.weight_format, d.shape) for d in smoothed)
    with SafetensorsFile(str(out)) as f:
        info = inspect_checkpoint(f)
        keys = set(f.keys())
        branched = [d for d in smoothed if f"{d.layer}.low_rank_down" in keys]
        assert all(f"{d.layer}.pre_quant_scale" in keys for d in smoothed)
        assert branched, "no layer kept a low-rank branch: the case has no dominant directions"
        assert not any(k.endswith(".pre_quant_scale") for k in keys if k[: -len(".pre_quant_scale")] not in
                       {d.layer for d in smoothed})  # only where the policy asks
        reloaded = conversion.load_converted(f, policy)  # same policy: the layers are kept as written
    g = torch.Generator().manual_seed(11)
    for d in (smoothed[0], branched[0]):
        source = info.layers[d.layer]
        assert set(weights.OUTLIER_SUFFIXES) & set(source.keys)
        rank = reloaded.state_dict[f"{d.layer}.low_rank_down"].shape[0] if d in branched else 0
        tensors = {s: reloaded.state_dict[f"{d.layer}.{s}"] for s in source.keys}
        from_file = weights.QuantizedWeight.from_tensors(d.target_format, d.shape, tensors)
        made = weights.quantize_weight(state[d.layer + ".weight"].float(), d.target_format, HANDLING,
                                       channels[d.layer], rank)
        assert set(made.tensors) == set(from_file.tensors)
        assert all(torch.equal(from_file.tensors[k], made.tensors[k].reshape(from_file.tensors[k].shape))
                   for k in made.tensors)
        # The pack's CPU path against the fp32 reference: the same math, summed in another order.
        layer = runtime.PreparedLinear(from_file, None, "none", "cpu")
        x = torch.randn(16, d.shape[1], generator=g) * channels[d.layer] / 4
        expected = reference_linear(x, made, None)
        error = relative_error(layer(x), expected)
        assert error < 1e-5
        bare = weights.QuantizedWeight(d.target_format, d.shape, {k: v for k, v in from_file.tensors.items()
                                                                  if k not in weights.OUTLIER_SUFFIXES})
        assert relative_error(reference_linear(x, bare, None), expected) > 0.1  # the transforms are in use


def test_loading_applies_the_transforms_where_the_policy_asks(model):
    path, state, channels = model
    loaded = conversion.load_converted(path, smoothed_policy("int8-scaled-mm"), channel_amax=channels,
                                       calibration="cal.json")
    for d in loaded.decisions:
        has_scale = f"{d.layer}.pre_quant_scale" in loaded.state_dict
        assert has_scale == bool(d.outliers.smooth_alpha), d.layer
        if has_scale:
            made = weights.quantize_weight(state[d.layer + ".weight"].float(), d.target_format, HANDLING,
                                           channels[d.layer])
            for suffix in ("weight", *weights.OUTLIER_SUFFIXES):
                if suffix in made.tensors:
                    assert torch.equal(loaded.state_dict[f"{d.layer}.{suffix}"], made.tensors[suffix])


@pytest.mark.parametrize("channels, calibration, message", [
    ({}, "cal.json", "cal.json: has no per-channel amax"),
    (None, None, "no calibration file was given")])
def test_smoothing_without_per_channel_amax_names_the_file(model, tmp_path, channels, calibration, message):
    path, _, _ = model
    out = tmp_path / "q.safetensors"
    with pytest.raises(CalibrationError, match=message):
        conversion.quantize_file(path, str(out), smoothed_policy("int8-convrot"), channel_amax=channels,
                                 calibration=calibration)
    assert not out.exists() and os.listdir(tmp_path) == []


def test_a_layer_amax_of_another_width_names_the_layer(model):
    path, _, channels = model
    layer = "transformer_blocks.0.attn1.to_q"
    bad = {**channels, layer: torch.ones(7)}
    with pytest.raises(CalibrationError, match=f"cal.json: the per-channel amax of layer '{layer}' has 7 values"):
        conversion.load_converted(path, smoothed_policy("int8-convrot"), channel_amax=bad, calibration="cal.json")


def test_layers_the_calibration_lacks_are_left_unsmoothed_and_counted(model, caplog):
    path, _, channels = model
    layer = "transformer_blocks.0.ff.net.2"
    partial = {k: v for k, v in channels.items() if k != layer}
    with caplog.at_level(logging.WARNING, logger="ltx2_quant"):
        loaded = conversion.load_converted(path, smoothed_policy("int8-convrot", Outliers(smooth_alpha=0.5)),
                                           channel_amax=partial, calibration="cal.json")
    assert f"{layer}.pre_quant_scale" not in loaded.state_dict
    assert "transformer_blocks.0.ff.net.0.proj.pre_quant_scale" in loaded.state_dict
    assert next(d for d in loaded.decisions if d.layer == layer).outliers.smooth_alpha == 0.0
    assert f"1 of {sum(bool(d.outliers.smooth_alpha) for d in loaded.decisions) + 1} layers to smooth" in caplog.text
    assert layer in caplog.text


@pytest.mark.parametrize("policy_name, handling, refused", [
    ("int8-convrot", Outliers(smooth_alpha=0.5), "is smoothed; stock ComfyUI applies pre_quant_scale to nvfp4"),
    ("nvfp4", Outliers(low_rank_bytes=0.2), "carries a low-rank branch"),
    ("nvfp4", Outliers(smooth_alpha=0.5), None)])
def test_stock_loadable_files_refuse_what_stock_comfyui_drops(model, tmp_path, policy_name, handling, refused):
    path, _, channels = model
    out = tmp_path / "q.safetensors"
    policy = smoothed_policy(policy_name, handling).with_fp8_per_tensor()
    if refused is None:
        conversion.quantize_file(path, str(out), policy, channel_amax=channels, calibration="c", stock_loadable=True)
        with SafetensorsFile(str(out)) as f:
            assert any(k.endswith(".pre_quant_scale") for k in f.keys())
        return
    with pytest.raises(ValueError, match=f"layer 'transformer_blocks.0.[a-z_0-9.]+' .*{refused}"):
        conversion.quantize_file(path, str(out), policy, channel_amax=channels, calibration="c", stock_loadable=True)
    assert os.listdir(tmp_path) == []


def test_a_pre_quant_scale_of_the_wrong_shape_is_refused_by_name(model, tmp_path):
    path, _, channels = model
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    conversion.quantize_file(path, str(good), smoothed_policy("int8-convrot", Outliers(smooth_alpha=0.5)),
                             channel_amax=channels, calibration="c")
    with SafetensorsFile(str(good)) as f:
        tensors = {k: f.read(k) for k in f.keys()}
        metadata = dict(f.metadata)
    key = "transformer_blocks.0.attn1.to_q.pre_quant_scale"
    tensors[key] = tensors[key][:-1].clone()
    save_tensors(str(bad), tensors, metadata)
    with SafetensorsFile(str(bad)) as f, pytest.raises(CheckpointError, match=f"{key}.*needs a float tensor of shape"):
        inspect_checkpoint(f)


def test_per_tensor_fp8_for_a_file_keeps_the_transforms():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 128, generator=g) / 128 ** 0.5
    amax = recipe.outlier_gains(128, 42.0, g)
    rowwise = weights.quantize_weight(w, weights.FP8_ROWWISE, HANDLING, amax)
    per_tensor = runtime.to_file_format(rowwise, weights.FP8_TENSOR)
    for suffix in weights.OUTLIER_SUFFIXES:
        if suffix in rowwise.tensors:
            assert torch.equal(per_tensor.tensors[suffix], rowwise.tensors[suffix])
    assert "pre_quant_scale" in per_tensor.tensors
    # Only the quantized part is re-rounded (the transforms are not folded into it).
    assert torch.equal(per_tensor.data, weights.quantize_weight(rowwise.quantized_part(), weights.FP8_TENSOR).data)


def test_quality_layers_measure_the_layers_the_load_makes(model):
    """quality.file_layer_quality applies the outlier handling where the loader does (a layer the
    calibration lacks unsmoothed in both): each row is the measure of the layer load_converted makes."""
    path, state, channels = model
    skipped = "transformer_blocks.0.ff.net.2"
    partial = {k: v for k, v in channels.items() if k != skipped}
    policy = smoothed_policy("int8-convrot")
    rows = {r.layer: r for r in quality.file_layer_quality(path, policy, None, partial, tokens=32,
                                                           calibration="cal.json")}
    loaded = conversion.load_converted(path, policy, channel_amax=partial, calibration="cal.json")
    sd = loaded.state_dict
    changed = [d for d in loaded.decisions if d.changed]
    assert set(rows) == {d.layer for d in changed}
    assert f"{skipped}.pre_quant_scale" not in sd and any(k.endswith(".low_rank_down") for k in sd)
    for d in changed:
        suffixes = (*weights.storage_specs(d.target_format, d.shape), *weights.OUTLIER_SUFFIXES)
        made = weights.QuantizedWeight.from_tensors(d.target_format, d.shape, {
            s: sd[f"{d.layer}.{s}"] for s in suffixes if f"{d.layer}.{s}" in sd})
        bias = state.get(d.layer + ".bias")
        x = quality.evaluation_inputs(d.shape[1], 32, 0, partial.get(d.layer))
        activation = layer_activation(comfy_quant.layer_conf(d), Nvfp4Mode.EXACT)
        assert rows[d.layer] == quality.layer_quality(d.layer, state[d.layer + ".weight"], made,
                                                      None if bias is None else bias.float(), x, activation), d.layer
    with pytest.raises(CalibrationError, match="cal.json: has no per-channel amax"):
        quality.file_layer_quality(path, policy, None, {}, calibration="cal.json")
