"""Calibration JSON (Lightricks' documented layout) and the official-file fetcher."""

import json
import os
import sys
import types

import pytest
import torch

from quant import calibration, formats, hub, weights
from quant.load_options import LoadOptions, calibration_options
from quant.outliers import NONE, Outliers


def test_amax_file_round_trip_and_both_namings(tmp_path):
    path = tmp_path / "amax.json"
    path.write_text(json.dumps({"amax_values": {
        "transformer_blocks.0.attn1.to_q.input_quantizer": 12.5,   # ours + their suffix
        "transformer_blocks.1.attn.to_k.input_quantizer": 3.0,     # their `attn` for attn1
        "model.diffusion_model.transformer_blocks.2.ff.net.2": 7,  # prefixed, no suffix
    }}))
    amax = calibration.load_amax(str(path))
    assert amax == {"transformer_blocks.0.attn1.to_q": 12.5, "transformer_blocks.1.attn1.to_k": 3.0,
                    "transformer_blocks.2.ff.net.2": 7.0}
    out = tmp_path / "out.json"
    calibration.save_amax(str(out), amax, overwrite=False)
    assert calibration.load_amax(str(out)) == amax
    assert "transformer_blocks.0.attn1.to_q.input_quantizer" in json.loads(out.read_text())["amax_values"]
    assert float(calibration.input_scale(448.0)) == 1.0
    assert float(calibration.input_scale(12.5)) == pytest.approx(12.5 / formats.FP8_MAX)


@pytest.mark.parametrize("content,needle", [
    ("not json", "not a readable calibration JSON"),
    (json.dumps({"values": {}}), "amax_values"),
    (json.dumps({"amax_values": {"transformer_blocks.0.attn1.to_q": -1}}), "transformer_blocks.0.attn1.to_q"),
    (json.dumps({"amax_values": {"transformer_blocks.0.attn1.to_q": "big"}}), "positive finite"),
])
def test_bad_amax_files_name_file_and_entry(tmp_path, content, needle):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(calibration.CalibrationError) as exc:
        calibration.load_amax(str(path))
    assert str(path) in str(exc.value) and needle in str(exc.value)


def test_load_options_take_a_calibration_file_and_smoothing_needs_its_per_channel_amax(tmp_path):
    layer = "transformer_blocks.0.attn1.to_q"
    lightricks = tmp_path / "theirs.json"
    lightricks.write_text(json.dumps({"amax_values": {layer + ".input_quantizer": 12.5}}))
    ours = tmp_path / "ours.json"
    calibration.save_amax(str(ours), {layer: 12.5}, {layer: torch.tensor([1.0, 12.5, 0.5])}, overwrite=False)

    fields = calibration_options(str(lightricks))  # static scales only: no per-channel amax needed
    assert fields == {"amax": {layer: 12.5}, "channel_amax": {}, "calibration": str(lightricks), "outliers": NONE}
    fields = calibration_options(str(ours), Outliers(smooth_alpha=0.5, low_rank_bytes=0.1))
    assert torch.equal(fields["channel_amax"][layer], torch.tensor([1.0, 12.5, 0.5]))
    assert fields["outliers"] == Outliers(0.5, 0.1) and LoadOptions(**fields).channel_amax is fields["channel_amax"]
    assert calibration_options(None, Outliers(low_rank_bytes=0.1))["amax"] is None  # the branch needs no file
    with pytest.raises(calibration.CalibrationError, match=f"^{lightricks}: has no per-channel amax"):
        calibration_options(str(lightricks), Outliers(smooth_alpha=0.5))
    with pytest.raises(calibration.CalibrationError, match="^no calibration file was given; smoothing needs"):
        calibration_options(None, Outliers(smooth_alpha=0.5))


def test_a_smoothed_layer_gets_the_static_scale_of_its_smoothed_input():
    conf = weights.conf_for_format(weights.FP8_ROWWISE)
    channels, scale = torch.tensor([40.0, 2.0]), torch.tensor([0.125, 1.0], dtype=torch.bfloat16)
    assert float(calibration.layer_input_scale(conf, 40.0)) == pytest.approx(40.0 / formats.FP8_MAX)
    # x * pre_quant_scale has amax max(40 * 0.125, 2 * 1) = 5
    assert float(calibration.layer_input_scale(conf, 40.0, channels, scale)) == pytest.approx(5.0 / formats.FP8_MAX)
    with pytest.raises(ValueError, match="needs its per-channel amax"):
        calibration.layer_input_scale(conf, 40.0, None, scale)
    int8 = weights.conf_for_format(weights.INT8)  # per-token scales, smoothed or not
    assert calibration.layer_input_scale(int8, 40.0, channels, scale) is None


def test_missing_official_file_says_where_to_get_it(tmp_path):
    official = hub.BY_NAME["ltx-2.3-22b-distilled-1.1.safetensors"]
    with pytest.raises(hub.MissingModelFile) as exc:
        hub.fetch(official, str(tmp_path), allow_download=False)
    message = str(exc.value)
    assert official.url in message and str(tmp_path) in message and "download missing files" in message


def test_present_file_is_used_without_download(tmp_path):
    official = hub.BY_NAME["ltx-2.3-spatial-upscaler-x2-1.1.safetensors"]
    (tmp_path / official.filename).write_bytes(b"x")
    assert hub.fetch(official, str(tmp_path), allow_download=True) == str(tmp_path / official.filename)


def test_download_goes_through_huggingface_hub_into_the_folder(tmp_path, monkeypatch):
    calls = []

    def fake_download(repo_id, filename, local_dir):
        calls.append((repo_id, filename, local_dir))
        target = f"{local_dir}/{filename}"
        open(target, "wb").close()
        return target
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=fake_download))
    official = hub.BY_NAME["ltx-2.3-22b-dev-nvfp4.safetensors"]
    progress = []
    path = hub.fetch(official, str(tmp_path), allow_download=True, progress=lambda d, t: progress.append((d, t)))
    assert calls == [("Lightricks/LTX-2.3-nvfp4", official.filename, str(tmp_path))]
    assert path.endswith(official.filename) and progress[-1] == (1, 1)


def test_ltx25_download_lands_in_the_folder_itself(tmp_path, monkeypatch):
    """LTX-2.5's repository keeps each file under a folder named like ComfyUI's (diffusion_models/...),
    which huggingface_hub recreates under local_dir: the file is moved up into the model folder."""
    def fake_download(repo_id, filename, local_dir):
        target = os.path.join(local_dir, filename)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "wb").close()
        return target
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=fake_download))
    official = hub.BY_NAME["ltx-2.5-22b-distilled-transformer-comfy-int8-convrot.safetensors"]
    assert official.url == ("https://huggingface.co/Lightricks/LTX-2.5/resolve/main/diffusion_models/"
                            "ltx-2.5-22b-distilled-transformer-comfy-int8-convrot.safetensors")
    path = hub.fetch(official, str(tmp_path), allow_download=True)
    assert path == str(tmp_path / official.filename) and os.listdir(tmp_path) == [official.filename]


def test_offline_download_failure_is_actionable(tmp_path, monkeypatch):
    def offline(**kwargs):
        raise ConnectionError("no network")
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=offline))
    official = hub.BY_NAME["ltx-2.3-22b-dev.safetensors"]
    with pytest.raises(hub.MissingModelFile) as exc:
        hub.fetch(official, str(tmp_path), allow_download=True)
    assert "no network" in str(exc.value) and official.url in str(exc.value)
