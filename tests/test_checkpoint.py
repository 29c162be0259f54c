"""Checkpoints: quantize_file round trips, foreign layouts, damaged checkpoints, atomic writes, streaming
memory. The safetensors parser and writer themselves: test_safetensors_io.py.

Foreign files (Lightricks fp8/NVFP4, ComfyUI `.comfy_quant`, MXFP8 with E8M0 scales) are produced
here with plain torch or comfy-kitchen (ComfyUI's own quantizer), never with quant.formats, so the
reader is checked against an independent producer. The official `safetensors` library checks
that what we write is a valid file.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from quant import ltx2, weights
from quant.comfy_quant import QUANT_METADATA_KEY
from quant.checkpoint import inspect_checkpoint
from quant.conversion import PACK_METADATA_KEY, HostStaging, convert_layer, quantize_file, read_layer
from quant.policies import get_policy, plan
from quant.safetensors_io import CheckpointError, SafetensorsFile, TensorSpec, save_tensors, write_streaming
from quant.weights import FormatError

ck = pytest.importorskip("comfy_kitchen")
from official_layouts import ck_nvfp4, comfy_quant_tensor  # noqa: E402  (needs comfy_kitchen)
from test_safetensors_io import raw_bytes, read_all, same_tensor, tmp_leftovers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PREFIX = ltx2.CHECKPOINT_PREFIX
ATTENTIONS = ("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
# ltx2.md: the 12 video-side Linears per block that Lightricks' NVFP4 release quantizes.
LIGHTRICKS_NVFP4_LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0",
                           "audio_to_video_attn.to_q", "audio_to_video_attn.to_out.0", "video_to_audio_attn.to_k",
                           "video_to_audio_attn.to_v", "ff.net.0.proj", "ff.net.2")
# Relative L2 error of a dequantized synthetic weight (std 1/sqrt(in)), per stored format.
DEQUANT_BOUND = {weights.FP8_ROWWISE: 0.035, weights.FP8_TENSOR: 0.045, weights.MXFP8: 0.045, weights.NVFP4: 0.13}
ROUND_TRIP_CASES = [("fp8-cast", False), ("fp8-cast", True), ("fp8-scaled-mm", False), ("fp8-scaled-mm", True),
                    ("mxfp8", False), ("nvfp4", False)]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def block_linears(num_blocks: int) -> list[str]:
    names = []
    for b in range(num_blocks):
        names += [f"transformer_blocks.{b}.{a}.{p}" for a in ATTENTIONS for p in PROJECTIONS]
        names += [f"transformer_blocks.{b}.{f}.{p}" for f in ("ff", "audio_ff") for p in ("net.0.proj", "net.2")]
    return names


def rel_err(a: torch.Tensor, e: torch.Tensor) -> float:
    a, e = a.double(), e.double()
    return float((a - e).norm() / e.norm())


def synthetic(num_layers: int = 2, prefix: bool = False, dtype=torch.bfloat16, seed: int = 0, extra_outer: bool = True):
    config = ltx2.tiny_config(num_layers=num_layers)
    state = ltx2.synthetic_state_dict(config, seed=seed, dtype=dtype)
    if prefix:
        state = {PREFIX + k: v for k, v in state.items()}
        if extra_outer:  # what else a single-file release holds, outside the diffusion model
            g = torch.Generator().manual_seed(99)
            state["vae.decoder.conv_in.conv.weight"] = torch.randn(8, 4, 3, 3, 3, generator=g).to(dtype)
            state["text_embedding_projection.video_aggregate_embed.weight"] = torch.randn(64, 96, generator=g).to(dtype)
            state["vocoder.conv_post.bias"] = torch.randn(1, generator=g).to(dtype)
    return config, state


def write_synthetic(path, **kwargs):
    metadata = kwargs.pop("metadata", True)
    config, state = synthetic(**kwargs)
    save_tensors(path, state, ltx2.header_metadata(config) if metadata else None)
    return config, state


def lightricks_fp8(w: torch.Tensor, input_scale: float):
    """Lightricks' fp8 layout, made with plain torch: e4m3 weight, fp32 scalar weight_scale and input_scale."""
    scale = (w.float().abs().amax() / 448.0).reshape(())
    data = (w.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    return data, scale, torch.tensor(input_scale, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Round trip: synthetic LTX-2.3 -> quantize_file -> inspect / official reader / dequantize
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", [False, True], ids=["bare", "prefixed"])
@pytest.mark.parametrize("policy_name,per_tensor", ROUND_TRIP_CASES)
def test_round_trip(tmp_path, policy_name, per_tensor, prefix):
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    config, state = write_synthetic(src, num_layers=2, prefix=prefix)
    policy = get_policy(policy_name, fp8_per_tensor=per_tensor, policy_scope=False)  # every block Linear
    fmt = policy.weight_format
    p = PREFIX if prefix else ""
    expected_layers = {p + n for n in block_linears(2)}

    result = quantize_file(str(src), str(dst), policy)
    assert result.bytes_written == dst.stat().st_size
    assert sum(d.changed for d in result.decisions) == 28 * 2
    assert not tmp_leftovers(tmp_path)

    with SafetensorsFile(src) as f_in, SafetensorsFile(dst) as f:
        info = inspect_checkpoint(f)
        assert info.kind == "comfyui-native"
        assert info.family == "ltx2.3"
        assert info.prefix == p
        assert info.num_blocks == 2
        assert info.config == config
        assert f.metadata["config"] == f_in.metadata["config"]
        qmeta = json.loads(f.metadata[QUANT_METADATA_KEY])
        assert qmeta["format_version"] == "1.0"
        assert set(qmeta["layers"]) == expected_layers
        assert all(conf["format"] == fmt for conf in qmeta["layers"].values())
        assert json.loads(f.metadata[PACK_METADATA_KEY])["policy"] == policy_name
        if fmt in (weights.FP8_TENSOR, weights.FP8_ROWWISE):
            flag = policy.activation == "none"  # fp8-cast: weight-only, ComfyUI's dequantize path
            for name, conf in qmeta["layers"].items():  # few-token layers are weight-only in any policy
                expected = flag or ltx2.reads_few_tokens(ltx2.strip_prefix(name, p))
                assert conf.get("full_precision_matrix_mult", False) is expected, name

        # Every quantized layer dequantizes close to the original weight, with the planned tensors.
        for name in expected_layers:
            layer = ltx2.strip_prefix(name, p)
            source = info.layers[layer]
            assert source.format == fmt and source.shape == tuple(state[name + ".weight"].shape)
            qw = read_layer(f, source)
            assert isinstance(qw, weights.QuantizedWeight) and qw.format == fmt
            specs = weights.storage_specs(fmt, source.shape)
            assert set(source.keys) == set(specs)
            for suffix, (dtype, shape) in specs.items():
                t = f.tensors[f"{name}.{suffix}"]
                assert t.dtype == dtype and t.shape == tuple(shape), (name, suffix)
            original = state[name + ".weight"].float()
            err = rel_err(qw.dequantize(), original)
            assert 0 < err < DEQUANT_BOUND[fmt], f"{name}: {fmt} dequantize error {err:.4f}"
            decision = next(d for d in result.decisions if d.layer == layer)
            assert decision.bytes_after == qw.nbytes == source.nbytes

        # Everything else is byte-identical to the input, and nothing unexpected was added.
        expected_keys = set(state)
        for name in expected_layers:
            expected_keys |= {f"{name}.{s}" for s in weights.storage_specs(fmt, (1, 1))}
        assert set(f.keys()) == expected_keys
        for key in state:
            if key[: -len(".weight")] in expected_layers and key.endswith(".weight"):
                continue
            assert same_tensor(f.read(key), f_in.read(key)), key

    # The official library reads the file, with the same tensors and metadata.
    official = safetensors.torch.load_file(str(dst))
    ours, metadata = read_all(dst)
    assert set(official) == set(ours)
    for key, t in ours.items():
        assert same_tensor(official[key], t), key
    with safetensors.safe_open(str(dst), "pt") as so:
        assert so.metadata() == metadata


@pytest.mark.parametrize("policy_name", ["fp8-cast", "nvfp4", "mxfp8"])
def test_requantizing_with_the_same_policy_keeps_the_bytes(tmp_path, policy_name):
    src, mid, dst = (tmp_path / n for n in ("in.safetensors", "mid.safetensors", "out.safetensors"))
    write_synthetic(src, num_layers=2)
    policy = get_policy(policy_name)
    quantize_file(str(src), str(mid), policy)
    result = quantize_file(str(mid), str(dst), policy)
    assert not any(d.changed for d in result.decisions)
    a, meta_a = read_all(mid)
    b, meta_b = read_all(dst)
    assert set(a) == set(b) and all(same_tensor(a[k], b[k]) for k in a)
    assert json.loads(meta_a[QUANT_METADATA_KEY]) == json.loads(meta_b[QUANT_METADATA_KEY])


def test_rowwise_fp8_file_requantized_per_tensor(tmp_path):
    src, mid, dst = (tmp_path / n for n in ("in.safetensors", "mid.safetensors", "out.safetensors"))
    _, state = write_synthetic(src, num_layers=1)
    quantize_file(str(src), str(mid), get_policy("fp8-cast"))
    quantize_file(str(mid), str(dst), get_policy("fp8-cast", fp8_per_tensor=True))
    with SafetensorsFile(dst) as f:
        info = inspect_checkpoint(f)
        assert {s.format for s in info.layers.values() if s.quantized} == {weights.FP8_TENSOR}
        name = "transformer_blocks.0.attn1.to_q"
        assert f.tensors[name + ".weight_scale"].shape == ()
        assert rel_err(read_layer(f, info.layers[name]).dequantize(), state[name + ".weight"].float()) < 0.05


def test_bf16_policy_copies_everything(tmp_path):
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    write_synthetic(src, num_layers=2)
    result = quantize_file(str(src), str(dst), get_policy("bf16"))
    assert not any(d.changed for d in result.decisions)
    a, meta_a = read_all(src)
    b, meta_b = read_all(dst)
    assert set(a) == set(b) and all(same_tensor(a[k], b[k]) for k in a)
    assert QUANT_METADATA_KEY not in meta_b
    assert meta_b["config"] == meta_a["config"]
    with SafetensorsFile(dst) as f:
        assert inspect_checkpoint(f).kind == "plain"


@pytest.mark.parametrize("dtype,name", [(torch.float16, "F16"), (torch.float32, "F32")])
@pytest.mark.parametrize("policy_name", ["fp8-scaled-mm", "nvfp4"])
def test_fp16_and_fp32_inputs(tmp_path, dtype, name, policy_name):
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    _, state = write_synthetic(src, num_layers=2, dtype=dtype)
    with SafetensorsFile(src) as f:
        info = inspect_checkpoint(f)
        assert info.kind == "plain" and {s.format for s in info.layers.values()} == {name}
    policy = get_policy(policy_name, policy_scope=False)
    quantize_file(str(src), str(dst), policy)
    layers = set(block_linears(2))
    with SafetensorsFile(dst) as f:
        info = inspect_checkpoint(f)
        assert {s.layer for s in info.layers.values() if s.quantized} == layers
        for layer in layers:
            err = rel_err(read_layer(f, info.layers[layer]).dequantize(), state[layer + ".weight"].float())
            assert err < DEQUANT_BOUND[policy.weight_format], (layer, err)
        for key, t in state.items():
            if key[: -len(".weight")] not in layers:
                assert same_tensor(f.read(key), t), key
        assert f.tensors["patchify_proj.weight"].dtype == dtype
    safetensors.torch.load_file(str(dst))


def test_ltx2_without_config_quantizes(tmp_path):
    # LTX-2 (no gated attention) does not need the header config; only LTX-2.3 does.
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    _, state = synthetic(num_layers=2)
    state = {k: v for k, v in state.items() if "to_gate_logits" not in k}
    save_tensors(src, state)
    with SafetensorsFile(src) as f:
        assert inspect_checkpoint(f).family == "ltx2"
    quantize_file(str(src), str(dst), get_policy("nvfp4"))
    with SafetensorsFile(dst) as f:
        assert len(json.loads(f.metadata[QUANT_METADATA_KEY])["layers"]) == 56
        assert "config" not in f.metadata


# ---------------------------------------------------------------------------------------------
# Foreign layouts
# ---------------------------------------------------------------------------------------------

def make_lightricks_fp8(path, num_layers=3, blocks=(1,)):
    """Lightricks' official fp8 layout: F8_E4M3 weight + F32 scalar weight_scale + F32 scalar input_scale
    on the block Linears (and to_gate_logits) of the middle blocks; no _quantization_metadata."""
    config, state = synthetic(num_layers=num_layers)
    originals, input_scales = {}, {}
    i = 0
    for key in list(state):
        layer = key[: -len(".weight")]
        in_block = any(layer.startswith(f"transformer_blocks.{b}.") for b in blocks)
        if not (key.endswith(".weight") and in_block and state[key].dim() == 2 and "scale_shift" not in key):
            continue
        if not (layer in block_linears(num_layers) or layer.endswith("to_gate_logits")):
            continue
        i += 1
        data, scale, input_scale = lightricks_fp8(state[key], 0.01 * i)
        originals[layer] = state[key]
        input_scales[layer] = input_scale
        state[key] = data
        state[layer + ".weight_scale"] = scale
        state[layer + ".input_scale"] = input_scale
    save_tensors(path, state, ltx2.header_metadata(config))
    return state, originals, input_scales


def test_read_lightricks_fp8(tmp_path):
    src = tmp_path / "ltx-2.3-22b-dev-fp8.safetensors"
    state, originals, input_scales = make_lightricks_fp8(src)
    assert len(originals) == 28 + 6
    with SafetensorsFile(src) as f:
        info = inspect_checkpoint(f)
        assert info.kind == "lightricks-fp8" and info.family == "ltx2.3"
        for layer in originals:
            source = info.layers[layer]
            assert source.format == weights.FP8_TENSOR and source.quantized
            assert set(source.keys) == {"weight", "weight_scale", "input_scale"}
            qw = read_layer(f, source)
            expected = state[layer + ".weight"].float() * state[layer + ".weight_scale"]
            assert torch.equal(qw.dequantize(), expected)
            assert torch.equal(qw.input_scale, input_scales[layer])
            assert rel_err(qw.dequantize(), originals[layer].float()) < DEQUANT_BOUND[weights.FP8_TENSOR]
        assert info.layers["transformer_blocks.0.attn1.to_q"].format == "BF16"


def test_lightricks_fp8_requantized_to_nvfp4_keeps_input_scale(tmp_path):
    src, dst = tmp_path / "fp8.safetensors", tmp_path / "nvfp4.safetensors"
    state, originals, input_scales = make_lightricks_fp8(src)
    quantize_file(str(src), str(dst), get_policy("nvfp4"))
    with SafetensorsFile(dst) as f:
        info = inspect_checkpoint(f)
        qmeta = json.loads(f.metadata[QUANT_METADATA_KEY])["layers"]
        assert info.kind == "comfyui-native"
        for layer in block_linears(3):
            assert qmeta[layer]["format"] == weights.NVFP4
            source = info.layers[layer]
            assert source.format == weights.NVFP4
            if layer in originals:  # came from fp8: input_scale kept, value close to the fp8 weight
                assert same_tensor(f.read(layer + ".input_scale"), input_scales[layer])
                qw = read_layer(f, source)
                assert torch.equal(qw.input_scale, input_scales[layer])
                fp8 = state[layer + ".weight"].float() * state[layer + ".weight_scale"]
                assert rel_err(qw.dequantize(), fp8) < DEQUANT_BOUND[weights.NVFP4]
            else:
                assert "input_scale" not in source.keys
        # Gate logits are out of the nvfp4 scope: they stay Lightricks fp8, listed for ComfyUI, scales kept.
        gate = "transformer_blocks.1.attn1.to_gate_logits"
        assert qmeta[gate]["format"] == weights.FP8_TENSOR
        for suffix in ("weight", "weight_scale", "input_scale"):
            assert same_tensor(f.read(f"{gate}.{suffix}"), state[f"{gate}.{suffix}"].reshape(())
                               if suffix != "weight" else state[f"{gate}.{suffix}"])
    safetensors.torch.load_file(str(dst))


def test_lightricks_fp8_kept_by_fp8_per_tensor_policy(tmp_path):
    src, dst = tmp_path / "fp8.safetensors", tmp_path / "out.safetensors"
    state, originals, _ = make_lightricks_fp8(src)
    quantize_file(str(src), str(dst), get_policy("fp8-scaled-mm", fp8_per_tensor=True))
    with SafetensorsFile(dst) as f:
        for layer in originals:
            for suffix in ("weight", "weight_scale", "input_scale"):
                assert same_tensor(f.read(f"{layer}.{suffix}"), state[f"{layer}.{suffix}"]), (layer, suffix)
        assert "transformer_blocks.0.attn1.to_q.input_scale" not in f
        assert f.tensors["transformer_blocks.0.attn1.to_q.weight"].dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("policy_name", ["nvfp4", "fp8-scaled-mm"])
@pytest.mark.parametrize("buffer_bytes", [1 << 24, 4096])  # every layer fits / none does (plain reads)
def test_staged_conversion_gives_the_same_bytes(tmp_path, policy_name, buffer_bytes):
    """Layers read through reused staging buffers come out as without them, also when kept as
    stored (fp8-scaled-mm per-tensor keeps the Lightricks layers): no result may alias a buffer
    that the next layer overwrites."""
    src = tmp_path / "fp8.safetensors"
    make_lightricks_fp8(src)
    fp8 = policy_name == "fp8-scaled-mm"
    policy = get_policy(policy_name, fp8_per_tensor=fp8, policy_scope=False)  # every layer converted or kept
    staging = HostStaging(buffer_bytes, buffer_bytes)
    with SafetensorsFile(src) as f:
        info = inspect_checkpoint(f)
        layers = [name for name in block_linears(3) if name in info.layers]
        target = {d.layer: d.target_format for d in plan(policy, info.layer_table(), info.num_blocks)}
        staged = {name: convert_layer(f, info.layers[name], target[name], "cpu", staging) for name in layers}
        plain = {name: convert_layer(f, info.layers[name], target[name], "cpu") for name in layers}
    kept = [name for name in layers if info.layers[name].format == target[name]]
    assert kept if policy_name == "fp8-scaled-mm" else not kept
    for name in layers:
        assert staged[name].tensors.keys() == plain[name].tensors.keys()
        for suffix, tensor in plain[name].tensors.items():
            assert same_tensor(staged[name].tensors[suffix], tensor), (name, suffix)


def test_staging_download_copies_out_of_the_buffer():
    staging = HostStaging(0, 1 << 16)
    qw = weights.quantize_weight(torch.randn(64, 96), weights.NVFP4)
    first = staging.download(qw)
    staging.download(weights.quantize_weight(torch.randn(64, 96), weights.NVFP4))  # reuses the buffer
    for suffix, tensor in qw.tensors.items():
        assert same_tensor(first.tensors[suffix], tensor), suffix
    assert same_tensor(HostStaging(0, 16).download(qw).tensors["weight"], qw.tensors["weight"])  # too small: plain copy


def test_unscaled_fp8_cast_reads_with_scale_one(tmp_path):
    # The reference's fp8-cast: a plain `.to(float8_e4m3fn)`, no scale tensor.
    src, dst = tmp_path / "cast.safetensors", tmp_path / "out.safetensors"
    config, state = synthetic(num_layers=1)
    layer = "transformer_blocks.0.attn1.to_v"
    state[layer + ".weight"] = state[layer + ".weight"].to(torch.float8_e4m3fn)
    save_tensors(src, state, ltx2.header_metadata(config))
    with SafetensorsFile(src) as f:
        info = inspect_checkpoint(f)
        assert info.layers[layer].format == weights.FP8_TENSOR
        assert torch.equal(read_layer(f, info.layers[layer]).dequantize(), state[layer + ".weight"].float())
    quantize_file(str(src), str(dst), get_policy("bf16"))
    with SafetensorsFile(dst) as f:
        assert json.loads(f.metadata[QUANT_METADATA_KEY])["layers"][layer]["format"] == weights.FP8_TENSOR
        assert f.read(layer + ".weight_scale").item() == 1.0
        assert same_tensor(f.read(layer + ".weight"), state[layer + ".weight"])
    safetensors.torch.load_file(str(dst))


def make_lightricks_nvfp4(path, num_layers=2, prefix=False):
    config, state = synthetic(num_layers=num_layers, prefix=prefix, extra_outer=False)
    p = PREFIX if prefix else ""
    produced = {}
    for b in range(num_layers):
        for name in LIGHTRICKS_NVFP4_LAYERS:
            layer = f"{p}transformer_blocks.{b}.{name}"
            packed, block_scales, global_scale = ck_nvfp4(state[layer + ".weight"])
            produced[layer] = (state[layer + ".weight"], packed, block_scales, global_scale)
            state[layer + ".weight"] = packed
            state[layer + ".weight_scale"] = block_scales
            state[layer + ".weight_scale_2"] = global_scale
    save_tensors(path, state, ltx2.header_metadata(config))
    return state, produced


@pytest.mark.parametrize("prefix", [False, True], ids=["bare", "prefixed"])
def test_read_lightricks_nvfp4_made_by_comfy_kitchen(tmp_path, prefix):
    src = tmp_path / "ltx-2.3-22b-dev-nvfp4.safetensors"
    state, produced = make_lightricks_nvfp4(src, prefix=prefix)
    p = PREFIX if prefix else ""
    with SafetensorsFile(src) as f:
        assert f.tensors[next(iter(produced)) + ".weight"].dtype_name == "U8"
        assert f.tensors[next(iter(produced)) + ".weight_scale"].dtype_name == "F8_E4M3"
        assert f.tensors[next(iter(produced)) + ".weight_scale_2"].dtype_name == "F32"
        info = inspect_checkpoint(f)
        assert info.kind == "lightricks-nvfp4" and info.family == "ltx2.3" and info.prefix == p
        assert sum(s.quantized for s in info.layers.values()) == 24
        for layer, (original, packed, block_scales, global_scale) in produced.items():
            source = info.layers[ltx2.strip_prefix(layer, p)]
            assert source.format == weights.NVFP4
            assert source.shape == tuple(original.shape)
            qw = read_layer(f, source)
            ours = qw.dequantize(torch.float32)
            theirs = ck.dequantize_nvfp4(packed, global_scale, block_scales, output_type=torch.float32)
            assert torch.equal(ours, theirs[: original.shape[0], : original.shape[1]]), layer
            assert rel_err(ours, original.float()) < DEQUANT_BOUND[weights.NVFP4]


def test_lightricks_nvfp4_quantize_file(tmp_path):
    src, dst, dst8 = (tmp_path / n for n in ("nv.safetensors", "out.safetensors", "out8.safetensors"))
    state, produced = make_lightricks_nvfp4(src)
    quantize_file(str(src), str(dst), get_policy("nvfp4"))
    with SafetensorsFile(dst) as f:
        info = inspect_checkpoint(f)
        assert info.kind == "comfyui-native"
        qmeta = json.loads(f.metadata[QUANT_METADATA_KEY])["layers"]
        assert set(qmeta) == set(block_linears(2))
        for layer in produced:  # already NVFP4: kept bit for bit
            for suffix in ("weight", "weight_scale", "weight_scale_2"):
                assert same_tensor(f.read(f"{layer}.{suffix}"), state[f"{layer}.{suffix}"]), (layer, suffix)
    # Re-quantized to MXFP8 from the NVFP4 values.
    quantize_file(str(src), str(dst8), get_policy("mxfp8"))
    with SafetensorsFile(dst8) as f, SafetensorsFile(src) as f_src:
        info, info_src = inspect_checkpoint(f), inspect_checkpoint(f_src)
        for layer in produced:
            assert info.layers[layer].format == weights.MXFP8
            nv = read_layer(f_src, info_src.layers[layer]).dequantize()
            assert rel_err(read_layer(f, info.layers[layer]).dequantize(), nv) < 0.045
    safetensors.torch.load_file(str(dst8))


def make_comfy_quant_file(path):
    """ComfyUI layout with per-layer `.comfy_quant` uint8 JSON tensors and no header metadata,
    quantized by comfy-kitchen (per-tensor fp8, nvfp4, mxfp8)."""
    config, state = synthetic(num_layers=2)
    made = {}
    for layer, fmt in (("transformer_blocks.0.attn1.to_q", weights.FP8_TENSOR),
                       ("transformer_blocks.0.ff.net.0.proj", weights.FP8_TENSOR),
                       ("transformer_blocks.1.attn1.to_k", weights.NVFP4),
                       ("transformer_blocks.1.audio_ff.net.2", weights.NVFP4),
                       ("transformer_blocks.1.attn2.to_v", weights.MXFP8)):
        w = state[layer + ".weight"]
        if fmt == weights.FP8_TENSOR:
            scale = (w.float().abs().amax() / 448.0).reshape(())
            tensors = {"weight": ck.quantize_per_tensor_fp8(w, scale), "weight_scale": scale}
            ref = ck.dequantize_per_tensor_fp8(tensors["weight"], scale, output_type=torch.float32)
        elif fmt == weights.NVFP4:
            packed, block_scales, global_scale = ck_nvfp4(w)
            tensors = {"weight": packed, "weight_scale": block_scales, "weight_scale_2": global_scale}
            ref = ck.dequantize_nvfp4(packed, global_scale, block_scales, output_type=torch.float32)
        else:
            data, block_scales = ck.quantize_mxfp8(w, pad_32x=True)
            tensors = {"weight": data, "weight_scale": block_scales}
            ref = ck.dequantize_mxfp8(data, block_scales, output_type=torch.float32)
        for suffix, t in tensors.items():
            state[f"{layer}.{suffix}"] = t
        state[layer + ".comfy_quant"] = comfy_quant_tensor({"format": fmt})
        made[layer] = (fmt, w, ref[: w.shape[0], : w.shape[1]])
    save_tensors(path, state, ltx2.header_metadata(config))
    return state, made


def test_read_comfy_quant_tensors(tmp_path):
    src, dst = tmp_path / "comfy.safetensors", tmp_path / "out.safetensors"
    state, made = make_comfy_quant_file(src)
    with SafetensorsFile(src) as f:
        assert QUANT_METADATA_KEY not in f.metadata
        info = inspect_checkpoint(f)
        assert info.kind == "comfyui-native"
        assert {s.layer for s in info.layers.values() if s.quantized} == set(made)
        for layer, (fmt, original, ref) in made.items():
            source = info.layers[layer]
            assert source.format == fmt and source.shape == tuple(original.shape)
            ours = read_layer(f, source).dequantize()
            assert torch.equal(ours, ref), layer
    result = quantize_file(str(src), str(dst), get_policy("bf16"))
    assert not any(d.changed for d in result.decisions)
    with SafetensorsFile(dst) as f:
        assert not any(k.endswith(".comfy_quant") for k in f.keys())
        qmeta = json.loads(f.metadata[QUANT_METADATA_KEY])
        assert qmeta["format_version"] == "1.0"
        assert {k: v["format"] for k, v in qmeta["layers"].items()} == {k: v[0] for k, v in made.items()}
        for key, t in state.items():
            if key.endswith(".comfy_quant"):
                continue
            if t.dtype == torch.float8_e8m0fnu:  # MXFP8 scales are written as ComfyUI stores them: U8
                assert f.tensors[key].dtype == torch.uint8 and raw_bytes(f.read(key)) == raw_bytes(t), key
            else:
                assert same_tensor(f.read(key), t), key
        info = inspect_checkpoint(f)
        for layer, (_fmt, _original, ref) in made.items():
            assert torch.equal(read_layer(f, info.layers[layer]).dequantize(), ref)
    safetensors.torch.load_file(str(dst))


def test_comfy_quant_file_requantized_to_nvfp4(tmp_path):
    src, dst = tmp_path / "comfy.safetensors", tmp_path / "out.safetensors"
    state, made = make_comfy_quant_file(src)
    quantize_file(str(src), str(dst), get_policy("nvfp4"))
    with SafetensorsFile(dst) as f:
        info = inspect_checkpoint(f)
        qmeta = json.loads(f.metadata[QUANT_METADATA_KEY])["layers"]
        assert set(qmeta) == set(block_linears(2)) and {v["format"] for v in qmeta.values()} == {weights.NVFP4}
        for layer, (fmt, original, ref) in made.items():
            if fmt == weights.NVFP4:
                assert same_tensor(f.read(layer + ".weight"), state[layer + ".weight"])
            assert rel_err(read_layer(f, info.layers[layer]).dequantize(), ref) < DEQUANT_BOUND[weights.NVFP4]


def test_read_mxfp8_with_e8m0_scales(tmp_path):
    src, dst = tmp_path / "mx.safetensors", tmp_path / "out.safetensors"
    config, state = synthetic(num_layers=1)
    layers = {}
    qconf = {}
    for layer in block_linears(1)[:6]:
        w = state[layer + ".weight"]
        data, scales = ck.quantize_mxfp8(w, pad_32x=True)
        assert scales.dtype == torch.float8_e8m0fnu
        state[layer + ".weight"], state[layer + ".weight_scale"] = data, scales
        layers[layer] = (w, ck.dequantize_mxfp8(data, scales, output_type=torch.float32)[: w.shape[0], : w.shape[1]])
        qconf[layer] = {"format": "mxfp8"}
    metadata = ltx2.header_metadata(config)
    metadata[QUANT_METADATA_KEY] = json.dumps({"format_version": "1.0", "layers": qconf})
    save_tensors(src, state, metadata)
    with SafetensorsFile(src) as f:
        info = inspect_checkpoint(f)
        for layer, (w, ref) in layers.items():
            assert f.tensors[layer + ".weight_scale"].dtype_name == "F8_E8M0"
            source = info.layers[layer]
            assert source.format == weights.MXFP8 and source.shape == tuple(w.shape)
            qw = read_layer(f, source)
            assert torch.equal(qw.dequantize(), ref)
            assert rel_err(qw.dequantize(), w.float()) < DEQUANT_BOUND[weights.MXFP8]
    quantize_file(str(src), str(dst), get_policy("mxfp8"))
    with SafetensorsFile(dst) as f:
        info = inspect_checkpoint(f)
        for layer, (_w, ref) in layers.items():
            assert raw_bytes(f.read(layer + ".weight_scale")) == raw_bytes(state[layer + ".weight_scale"])
            assert torch.equal(read_layer(f, info.layers[layer]).dequantize(), ref)
    safetensors.torch.load_file(str(dst))


# ---------------------------------------------------------------------------------------------
# Corrupt and foreign files: clear errors naming the file and the tensor
# ---------------------------------------------------------------------------------------------


def test_truncated_real_checkpoint_refused_by_quantize_file(tmp_path):
    src, dst = tmp_path / "cut.safetensors", tmp_path / "out.safetensors"
    write_synthetic(src, num_layers=1)
    with SafetensorsFile(src) as f:
        last = max(f.tensors.values(), key=lambda t: t.start)
    src.write_bytes(src.read_bytes()[:-3])
    with pytest.raises(CheckpointError) as exc:
        quantize_file(str(src), str(dst), get_policy("nvfp4"))
    assert str(src) in str(exc.value) and repr(last.name) in str(exc.value)
    assert not dst.exists() and not tmp_leftovers(tmp_path)


def test_non_ltx_file(tmp_path):
    path, dst = tmp_path / "llama.safetensors", tmp_path / "out.safetensors"
    save_tensors(path, {"model.layers.0.mlp.up_proj.weight": torch.randn(64, 32).bfloat16(),
                        "model.norm.weight": torch.ones(32).bfloat16()})
    with SafetensorsFile(path) as f:
        with pytest.raises(CheckpointError) as exc:
            inspect_checkpoint(f)
        assert str(path) in str(exc.value) and ltx2.FAMILY_KEY in str(exc.value)
        info = inspect_checkpoint(f, require_ltx=False)
        assert info.family is None and info.kind == "plain" and "model.layers.0.mlp.up_proj" in info.layers
    with pytest.raises(CheckpointError, match="not an LTX-2 checkpoint"):
        quantize_file(str(path), str(dst), get_policy("nvfp4"))
    assert not dst.exists()


def test_ltx23_without_config_is_refused(tmp_path):
    src, dst = tmp_path / "noconfig.safetensors", tmp_path / "out.safetensors"
    write_synthetic(src, num_layers=1, metadata=False)
    with SafetensorsFile(src) as f:
        info = inspect_checkpoint(f)
        assert info.family == "ltx2.3" and info.config is None
    with pytest.raises(CheckpointError) as exc:
        quantize_file(str(src), str(dst), get_policy("nvfp4"))
    assert "config" in str(exc.value) and str(src) in str(exc.value)
    assert not dst.exists() and not tmp_leftovers(tmp_path)


def _with_layer_conf(tmp_path, conf_value, layer="transformer_blocks.0.attn1.to_q"):
    path = tmp_path / "meta.safetensors"
    config, state = synthetic(num_layers=1)
    metadata = ltx2.header_metadata(config)
    metadata[QUANT_METADATA_KEY] = json.dumps({"format_version": "1.0", "layers": {layer: conf_value}})
    save_tensors(path, state, metadata)
    return path


@pytest.mark.parametrize("fmt", ["int4", "float8_e5m2", "NVFP4", None])
def test_unknown_format_in_quantization_metadata(tmp_path, fmt):
    path = _with_layer_conf(tmp_path, {"format": fmt})
    with SafetensorsFile(path) as f:
        with pytest.raises(CheckpointError) as exc:
            inspect_checkpoint(f)
    message = str(exc.value)
    assert str(path) in message and "transformer_blocks.0.attn1.to_q" in message and repr(fmt) in message
    with pytest.raises(CheckpointError):
        quantize_file(str(path), str(tmp_path / "out.safetensors"), get_policy("bf16"))


def test_corrupt_quantization_metadata_json(tmp_path):
    path = tmp_path / "meta.safetensors"
    config, state = synthetic(num_layers=1)
    metadata = ltx2.header_metadata(config)
    metadata[QUANT_METADATA_KEY] = "{not json"
    save_tensors(path, state, metadata)
    with SafetensorsFile(path) as f:
        with pytest.raises(CheckpointError) as exc:
            inspect_checkpoint(f)
    assert str(path) in str(exc.value) and QUANT_METADATA_KEY in str(exc.value)


def test_corrupt_comfy_quant_tensor(tmp_path):
    path = tmp_path / "cq.safetensors"
    config, state = synthetic(num_layers=1)
    state["transformer_blocks.0.attn1.to_q.comfy_quant"] = torch.tensor([0xFF, 0xFE, 0x00], dtype=torch.uint8)
    save_tensors(path, state, ltx2.header_metadata(config))
    with SafetensorsFile(path) as f:
        with pytest.raises(CheckpointError) as exc:
            inspect_checkpoint(f)
    assert str(path) in str(exc.value) and "transformer_blocks.0.attn1.to_q.comfy_quant" in str(exc.value)


@pytest.mark.parametrize("where", ["header", "tensor"])
def test_non_object_layer_conf_is_a_checkpoint_error(tmp_path, where):
    layer = "transformer_blocks.0.attn1.to_q"
    if where == "header":
        path = _with_layer_conf(tmp_path, "nvfp4", layer)
    else:
        path = tmp_path / "cq.safetensors"
        config, state = synthetic(num_layers=1)
        state[layer + ".comfy_quant"] = torch.tensor(list(b'"nvfp4"'), dtype=torch.uint8)
        save_tensors(path, state, ltx2.header_metadata(config))
    with SafetensorsFile(path) as f:
        with pytest.raises(CheckpointError) as exc:
            inspect_checkpoint(f)
    assert str(path) in str(exc.value) and layer in str(exc.value)


def _quantized_layer_file(tmp_path, fmt, mutate):
    """A ComfyUI-native file with one `fmt` layer whose tensors `mutate(tensors)` breaks."""
    path = tmp_path / "bad_scale.safetensors"
    config, state = synthetic(num_layers=1)
    layer = "transformer_blocks.0.ff.net.0.proj"  # (256, 64)
    qw = weights.quantize_weight(state[layer + ".weight"], fmt)
    tensors = dict(qw.tensors)
    mutate(tensors)
    for suffix, t in tensors.items():
        state[f"{layer}.{suffix}"] = t
    metadata = ltx2.header_metadata(config)
    metadata[QUANT_METADATA_KEY] = json.dumps({"format_version": "1.0", "layers": {layer: {"format": fmt}}})
    save_tensors(path, state, metadata)
    return path, layer


@pytest.mark.parametrize("fmt,mutate,bad", [
    (weights.NVFP4, lambda t: t.update(weight_scale=t["weight_scale"][:64]), "weight_scale"),
    (weights.NVFP4, lambda t: t.update(weight_scale_2=torch.ones(4)), "weight_scale_2"),
    (weights.NVFP4, lambda t: t.update(weight_scale=t["weight_scale"].float()), "weight_scale"),
    (weights.MXFP8, lambda t: t.update(weight_scale=t["weight_scale"][:, :2]), "weight_scale"),
    (weights.FP8_TENSOR, lambda t: t.update(weight_scale=torch.ones(3)), "weight_scale"),
    (weights.FP8_TENSOR, lambda t: t.update(weight_scale=torch.ones((), dtype=torch.bfloat16)), "weight_scale"),
    (weights.FP8_ROWWISE, lambda t: t.update(weight_scale=torch.ones(255, 1)), "weight_scale"),
    (weights.FP8_TENSOR, lambda t: t.update(input_scale=torch.ones(4)), "input_scale"),
    (weights.NVFP4, lambda t: t.update(weight=t["weight"][:128]), "weight"),  # bias says 256 rows
], ids=["nvfp4-block-scales-short", "nvfp4-global-not-scalar", "nvfp4-scales-fp32", "mxfp8-scales-short",
        "fp8-scale-vector", "fp8-scale-bf16", "fp8-rowwise-scale-rows", "input-scale-vector", "nvfp4-weight-rows"])
def test_scale_with_wrong_shape_for_its_format(tmp_path, fmt, mutate, bad):
    path, layer = _quantized_layer_file(tmp_path, fmt, mutate)
    with SafetensorsFile(path) as f:
        with pytest.raises(CheckpointError) as exc:
            inspect_checkpoint(f)
    assert str(path) in str(exc.value) and f"{layer}.{bad}" in str(exc.value)


def test_missing_scale_tensor(tmp_path):
    path, layer = _quantized_layer_file(tmp_path, weights.NVFP4, lambda t: t.pop("weight_scale_2"))
    with SafetensorsFile(path) as f:
        with pytest.raises(CheckpointError) as exc:
            inspect_checkpoint(f)
    assert str(path) in str(exc.value) and layer in str(exc.value) and "weight_scale_2" in str(exc.value)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("policy_name", ["nvfp4", "fp8-cast", "mxfp8"])
def test_nan_inf_weights_refused_naming_the_layer(tmp_path, bad_value, policy_name):
    src, dst = tmp_path / "nan.safetensors", tmp_path / "out.safetensors"
    config, state = synthetic(num_layers=2)
    layer = "transformer_blocks.1.attn2.to_k"
    state[layer + ".weight"][3, 5] = bad_value
    save_tensors(src, state, ltx2.header_metadata(config))
    with pytest.raises(CheckpointError) as exc:
        quantize_file(str(src), str(dst), get_policy(policy_name))
    assert str(src) in str(exc.value) and repr(layer) in str(exc.value)
    assert not dst.exists() and not tmp_leftovers(tmp_path)


def test_nan_outside_scope_is_refused_too(tmp_path):
    # A tensor copied as it is would make the video black just the same (issue #7).
    src, dst = tmp_path / "nan.safetensors", tmp_path / "out.safetensors"
    config, state = synthetic(num_layers=1)
    state["transformer_blocks.0.attn1.to_gate_logits.weight"][0, 0] = float("nan")
    save_tensors(src, state, ltx2.header_metadata(config))
    with pytest.raises(CheckpointError, match=r"'transformer_blocks\.0\.attn1\.to_gate_logits\.weight' has 1 NaN"):
        quantize_file(str(src), str(dst), get_policy("nvfp4"))
    assert not dst.exists() and not tmp_leftovers(tmp_path)


@pytest.mark.parametrize("shape", [(64,), (2, 32, 32), ()])
@pytest.mark.parametrize("fmt", weights.FORMATS)
def test_quantize_weight_rejects_non_2d(fmt, shape):
    with pytest.raises(FormatError) as exc:
        weights.quantize_weight(torch.randn(shape), fmt)
    assert fmt in str(exc.value) and str(tuple(shape)) in str(exc.value)


@pytest.mark.parametrize("fmt", ["int8", "fp4", "float8_e5m2", "NVFP4", ""])
def test_quantize_weight_unknown_format(fmt):
    with pytest.raises(FormatError) as exc:
        weights.quantize_weight(torch.randn(16, 16), fmt)
    assert repr(fmt) in str(exc.value)
    with pytest.raises(FormatError):
        weights.storage_specs(fmt, (16, 16))
    assert issubclass(FormatError, ValueError)


def test_quantize_weight_rejects_integer_tensor():
    with pytest.raises(FormatError, match="int32"):
        weights.quantize_weight(torch.ones(16, 16, dtype=torch.int32), weights.NVFP4)


def test_convert_layer_names_layer_on_nan(tmp_path):
    src = tmp_path / "nan.safetensors"
    config, state = synthetic(num_layers=1)
    state["transformer_blocks.0.ff.net.2.weight"][0] = float("nan")
    save_tensors(src, state, ltx2.header_metadata(config))
    with SafetensorsFile(src) as f:
        info = inspect_checkpoint(f)
        with pytest.raises(CheckpointError, match=r"transformer_blocks\.0\.ff\.net\.2.*256 NaN/Inf"):
            convert_layer(f, info.layers["transformer_blocks.0.ff.net.2"], weights.NVFP4)


# ---------------------------------------------------------------------------------------------
# Bugs found while writing these tests, fixed since (each test reproduces its bug)
# ---------------------------------------------------------------------------------------------

def test_plain_layer_with_input_scale_keeps_it(tmp_path):
    src, dst = tmp_path / "calibrated.safetensors", tmp_path / "out.safetensors"
    config, state = synthetic(num_layers=1)
    layer = "transformer_blocks.0.attn1.to_q"
    state[layer + ".input_scale"] = torch.tensor(0.125)
    save_tensors(src, state, ltx2.header_metadata(config))
    quantize_file(str(src), str(dst), get_policy("fp8-scaled-mm", fp8_per_tensor=True))
    with SafetensorsFile(dst) as f:
        assert f.read(layer + ".input_scale").item() == 0.125
        assert f.tensors[layer + ".weight"].dtype == torch.float8_e4m3fn


def test_e5m2_weights_quantize_or_are_refused_cleanly(tmp_path):
    src, dst = tmp_path / "e5m2.safetensors", tmp_path / "out.safetensors"
    config, state = synthetic(num_layers=1)
    layer = "transformer_blocks.0.attn1.to_q"
    state[layer + ".weight"] = state[layer + ".weight"].to(torch.float8_e5m2)
    save_tensors(src, state, ltx2.header_metadata(config))
    try:
        quantize_file(str(src), str(dst), get_policy("nvfp4"))
    except CheckpointError as e:
        assert layer in str(e)


def test_written_file_has_normal_permissions(tmp_path):
    path = tmp_path / "out.safetensors"
    save_tensors(path, {"x": torch.ones(2)})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("per_tensor", [False, True])
def test_fp8_cast_layers_carry_full_precision_flag(tmp_path, per_tensor):
    """The issue: fp8-cast layers carry "full_precision_matrix_mult": true (ComfyUI's dequantize path),
    per-channel or per-tensor; W8A8 fp8-scaled-mm layers do not, except the few-token (audio, text
    K/V) layers, which run weight-only in every policy."""
    src = tmp_path / "in.safetensors"
    write_synthetic(src, num_layers=1)
    for name, flag in (("fp8-cast", True), ("fp8-scaled-mm", False)):
        dst = tmp_path / f"{name}.safetensors"
        quantize_file(str(src), str(dst), get_policy(name, fp8_per_tensor=per_tensor, policy_scope=False))
        with SafetensorsFile(dst) as f:
            layers = json.loads(f.metadata[QUANT_METADATA_KEY])["layers"]
            assert len(layers) == 28
            assert {c["format"] for c in layers.values()} == {weights.FP8_TENSOR if per_tensor else weights.FP8_ROWWISE}
            for layer, c in layers.items():
                expected = flag or ltx2.reads_few_tokens(layer)
                assert c.get("full_precision_matrix_mult", False) is expected, (name, layer, c)
            assert json.loads(f.metadata[PACK_METADATA_KEY])["activation"] == ("none" if flag else "fp8")


def test_kept_layers_keep_the_files_full_precision_flag(tmp_path):
    """A quantized file read under a policy that keeps its layers (bf16) keeps each layer's
    full-precision flag as the file has it: fp8-cast layers stay weight-only, fp8-scaled-mm's
    video-token layers stay W8A8 (stock ComfyUI runs the file the same way)."""
    src = tmp_path / "in.safetensors"
    write_synthetic(src, num_layers=1)
    for name in ("fp8-cast", "fp8-scaled-mm"):
        dst = tmp_path / f"{name}.safetensors"
        quantize_file(str(src), str(dst), get_policy(name, fp8_per_tensor=True))
        again = tmp_path / f"{name}_again.safetensors"
        quantize_file(str(dst), str(again), get_policy("bf16"))
        with SafetensorsFile(dst) as f, SafetensorsFile(again) as g:
            assert json.loads(g.metadata[QUANT_METADATA_KEY])["layers"] == \
                json.loads(f.metadata[QUANT_METADATA_KEY])["layers"]


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------

def test_existing_output_is_not_overwritten(tmp_path):
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    write_synthetic(src, num_layers=1)
    dst.write_bytes(b"precious")
    before = dst.stat()
    with pytest.raises(FileExistsError) as exc:
        quantize_file(str(src), str(dst), get_policy("nvfp4"))
    assert str(dst) in str(exc.value)
    assert dst.read_bytes() == b"precious" and dst.stat().st_mtime_ns == before.st_mtime_ns
    assert not tmp_leftovers(tmp_path)


def test_overwrite_replaces(tmp_path):
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    write_synthetic(src, num_layers=1)
    quantize_file(str(src), str(dst), get_policy("fp8-cast"))
    quantize_file(str(src), str(dst), get_policy("nvfp4"), overwrite=True)
    with SafetensorsFile(dst) as f:
        assert json.loads(f.metadata[PACK_METADATA_KEY])["policy"] == "nvfp4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "out.safetensors"]


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("existing", [False, True])
def test_progress_that_raises_leaves_nothing_behind(tmp_path, exc_type, existing):
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    write_synthetic(src, num_layers=2)
    if existing:
        dst.write_bytes(b"old output")
    calls = []

    def progress(done, total):
        calls.append((done, total))
        if done == total // 2:
            # The temp file is being written right now, in the target folder.
            assert tmp_leftovers(tmp_path)
            raise exc_type("cancelled")

    with pytest.raises(exc_type, match="cancelled"):
        quantize_file(str(src), str(dst), get_policy("nvfp4"), overwrite=existing, progress=progress)
    assert not tmp_leftovers(tmp_path)
    if existing:
        assert dst.read_bytes() == b"old output"
    else:
        assert not dst.exists()
    assert calls[-1][0] == calls[-1][1] // 2


def test_progress_reports_every_step(tmp_path):
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    _, state = write_synthetic(src, num_layers=1)
    calls = []
    quantize_file(str(src), str(dst), get_policy("nvfp4"), progress=lambda d, t: calls.append((d, t)))
    total = calls[0][1]
    assert [c[0] for c in calls] == list(range(1, total + 1)) and all(c[1] == total for c in calls)
    assert total == len(state)  # one step per plain tensor or per quantized layer (weight + its scales)


# ---------------------------------------------------------------------------------------------
# Streaming memory: peak extra RSS of quantize_file in a fresh process
#
# Measured with the default glibc allocator, i.e. what a user's process sees. What the code holds
# (one input tensor, its converted tensors, 1 Mi-element row-chunk temporaries) peaks at 3-4x the
# largest tensor (measured with malloc_trim after every step). On top of that glibc keeps freed heap
# chunks: the same code peaked at 3.4x-7.4x on one 2-core machine from run to run and at 8.1x on a
# CI machine. That plateau does not grow with the file, so the file is 1 GiB, where holding the
# whole input or all outputs shows as a fraction of the file, and the per-tensor factor is 12x.
# ---------------------------------------------------------------------------------------------

BIG_SHAPE = (4096, 4096)  # a video attention Linear of the real model
BIG_TENSORS = [f"transformer_blocks.{b}.{a}.{p}.weight" for b in range(4) for a in ("attn1", "attn2")
               for p in PROJECTIONS]  # 32 x 32 MiB bf16 = 1 GiB
MEMORY_FACTOR = 12  # peak extra RSS < 12 x the largest tensor's bf16 bytes (0.375x the file)
FILE_FRACTION = 0.4  # ... and < 0.4x the file: nvfp4's outputs plus the plateau would be ~0.55x

CHILD = textwrap.dedent("""
    import json, sys, time

    def status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024

    import torch
    from quant import conversion, policies
    src, dst, name = sys.argv[1:4]
    policy = policies.get_policy(name)
    before = {"hwm": status("VmHWM"), "rss": status("VmRSS")}
    start = time.perf_counter()
    conversion.quantize_file(src, dst, policy)
    seconds = time.perf_counter() - start
    print(json.dumps({"before": before, "after": {"hwm": status("VmHWM")}, "seconds": seconds}))
""")


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big")
    path = folder / "big.safetensors"
    block = (torch.randn(BIG_SHAPE, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    specs = [TensorSpec(k, torch.bfloat16, BIG_SHAPE) for k in BIG_TENSORS]
    specs += [TensorSpec(ltx2.FAMILY_KEY, torch.bfloat16, (64,)), TensorSpec(ltx2.AUDIO_VIDEO_KEY, torch.bfloat16, (64, 64))]

    def produce():  # distinct tensors without paying for 256 M random numbers
        for i, spec in enumerate(specs):
            if spec.shape == BIG_SHAPE:
                yield torch.roll(block, shifts=i * 97, dims=1) * (1 + i / 16)
            else:
                yield torch.zeros(spec.shape, dtype=torch.bfloat16)

    write_streaming(path, specs, produce())
    yield path
    path.unlink()


def _measure(src: Path, dst: Path, policy_name: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # A bound against a hung child, not a speed check: NVFP4's block-scale search takes 10-20 s per
    # 4096x4096 layer on a 2-core machine (32 of them here).
    proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst), policy_name],
                          capture_output=True, text=True, env=env, cwd=str(REPO), timeout=1200)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    # VmHWM, not ru_maxrss: after fork+exec, ru_maxrss keeps the RSS of the forked pytest image
    # (which holds the big fixture tensors), so it says nothing about the child itself.
    m["extra"] = m["after"]["hwm"] - m["before"]["rss"]
    return m


@pytest.mark.parametrize("policy_name", ["fp8-cast", "nvfp4"])  # mxfp8 measured like fp8 (4.2x), left out for time
def test_streaming_memory(big_checkpoint, tmp_path, policy_name):
    dst = tmp_path / "out.safetensors"
    m = _measure(big_checkpoint, dst, policy_name)
    file_size = big_checkpoint.stat().st_size
    largest = BIG_SHAPE[0] * BIG_SHAPE[1] * 2
    extra = m["extra"]
    report = (f"{policy_name}: file {file_size / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB; "
              f"RSS before {m['before']['rss'] / 2**20:.0f} MiB, peak {m['after']['hwm'] / 2**20:.0f} MiB; "
              f"peak extra {extra / 2**20:.0f} MiB = {extra / largest:.1f}x largest tensor = "
              f"{extra / file_size:.2f}x file; quantize_file {m['seconds']:.1f} s")
    print("\n" + report)
    with SafetensorsFile(dst) as f:
        assert len(json.loads(f.metadata[QUANT_METADATA_KEY])["layers"]) == len(BIG_TENSORS)
    assert dst.stat().st_size < file_size
    assert extra < MEMORY_FACTOR * largest, report
    assert extra < FILE_FRACTION * file_size, report


def test_refused_page_locked_memory_falls_back_to_plain_copies(tmp_path, monkeypatch, caplog):
    """A GPU load whose staging buffers cannot be page-locked (a memlock limit) still loads, with
    plain copies, and says so."""
    from quant import conversion

    def refuse(*args):
        raise RuntimeError("cudaHostAlloc failed: out of memory")
    monkeypatch.setattr(conversion, "HostStaging", refuse)
    path = tmp_path / "bf16.safetensors"
    write_synthetic(path)
    policy = get_policy("fp8-scaled-mm")
    with caplog.at_level("WARNING", logger="ltx2_quant"), SafetensorsFile(path) as f:
        info = inspect_checkpoint(f)
        assert conversion._host_staging(f, info, plan(policy, info.layer_table(), info.num_blocks), "cuda") is None
    assert "no page-locked staging buffers (cudaHostAlloc failed: out of memory)" in caplog.text
    if torch.cuda.is_available():  # the whole load, on the GPU
        loaded = conversion.load_converted(str(path), policy, device="cuda")
        assert loaded.state_dict["transformer_blocks.0.attn1.to_q.weight"].dtype == torch.float8_e4m3fn
