"""LTX-2.5 in quant/: its family and layout (bias-free FFNs, no prompt AdaLN embedders, the keyframe
embedding), every policy over its layers, files written and read back with the header kept verbatim,
and the official transformer files' layouts (per-layer `.comfy_quant`, no header quantization
metadata) made here by comfy-kitchen, the independent producer. tests/integration/test_ltx25_comfyui.py
runs the same model in ComfyUI v0.33."""

from __future__ import annotations

import json

import pytest
import torch

from quant import ltx2, memory, runtime, weights
from quant.capability import BLACKWELL, HOPPER, Capability
from quant.comfy_quant import QUANT_METADATA_KEY
from quant.checkpoint import check_layers, inspect_checkpoint
from quant.conversion import load_converted, quantize_file, read_layer
from quant.modes import Activation, layer_activation
from quant.policies import POLICIES, get_policy
from quant.safetensors_io import CheckpointError, SafetensorsFile, save_tensors
from test_checkpoint import block_linears, rel_err
from test_safetensors_io import read_all, same_tensor

pytest.importorskip("comfy_kitchen")
from official_layouts import INT8_CONVROT_CONF, NVFP4_CONF, official_layers  # noqa: E402  (needs comfy_kitchen)

# Widths of 256 so every block Linear takes whole ConvRot groups, as in the release (4096 / 2048).
CONFIG = ltx2.tiny_config(num_layers=2, heads=4, head_dim=64, audio_heads=4, audio_head_dim=64,
                          release=ltx2.LTX25_CONFIG)
# What the release headers carry besides `config` (the NVFP4 file's: config, gemma_source_checkpoint,
# license, model_version); kept verbatim by everything that writes a file.
METADATA = {**ltx2.header_metadata(CONFIG), "model_version": "2.5.0", "license": "LTX-2 Community License",
            "gemma_source_checkpoint": json.dumps({"name": "gemma4-12b-ltx-v1"})}
FFN_BIASES = ("ff.net.0.proj.bias", "ff.net.2.bias", "audio_ff.net.0.proj.bias", "audio_ff.net.2.bias")


def block_ffn_biases(keys) -> list[str]:
    """The transformer blocks' FFN biases among `keys` (the text connectors' FFNs keep theirs)."""
    return [k for k in keys if "transformer_blocks." in k and "transformer_1d_blocks." not in k
            and k.endswith(FFN_BIASES)]
# Block Linears each policy's default scope leaves in bf16 (fp8-scaled-mm: policies.FP8_SCALED_MM_KEEPS).
KEPT_PER_BLOCK = {name: {"bf16": 28, "fp8-scaled-mm": 3}.get(name, 0) for name in POLICIES}


def write_bf16(path, config: dict = CONFIG, metadata: dict | None = None, prefix: str = "") -> dict:
    state = {prefix + k: v for k, v in ltx2.synthetic_state_dict(config, seed=4).items()}
    save_tensors(path, state, METADATA if metadata is None else metadata)
    return state


def test_layout_drops_ffn_biases_and_adds_the_keyframe_embedding():
    shapes, shapes23 = ltx2.model_shapes(CONFIG), ltx2.model_shapes(ltx2.tiny_config(
        num_layers=2, heads=4, head_dim=64, audio_heads=4, audio_head_dim=64))
    assert set(shapes23) - set(shapes) == {f"transformer_blocks.{b}.{k}" for b in range(2) for k in FFN_BIASES}
    assert set(shapes) - set(shapes23) == {ltx2.KEYFRAMES_EMBEDDING_KEY}
    assert shapes[ltx2.KEYFRAMES_EMBEDDING_KEY] == (1, 256)
    assert all(shapes[k] == shapes23[k] for k in shapes if k in shapes23)
    # Without the prompt AdaLN embedders; the blocks keep their prompt scale-shift tables.
    without_prompt = ltx2.model_shapes({**CONFIG, "use_prompt_adaln_single": False})
    assert {k.split(".")[0] for k in set(shapes) - set(without_prompt)} == {"prompt_adaln_single",
                                                                           "audio_prompt_adaln_single"}
    assert "transformer_blocks.0.prompt_scale_shift_table" in without_prompt


@pytest.mark.parametrize("prefix", ["", ltx2.CHECKPOINT_PREFIX])
def test_family_is_told_by_the_bias_free_ffns(prefix):
    keys25 = [prefix + k for k in ltx2.model_shapes(CONFIG)]
    keys23 = [prefix + k for k in ltx2.model_shapes(ltx2.tiny_config())]
    assert ltx2.detect_family(keys25, prefix) == "ltx2.5"
    assert ltx2.detect_family(keys23, prefix) == "ltx2.3"
    # The keyframe embedding alone does not make a file LTX-2.5.
    assert ltx2.detect_family([*keys23, prefix + ltx2.KEYFRAMES_EMBEDDING_KEY], prefix) == "ltx2.3"


@pytest.mark.parametrize("policy_name", list(POLICIES))
def test_every_policy_plans_the_same_linears_and_counts_no_missing_tensors(policy_name):
    """The block Linears of LTX-2.5 are LTX-2.3's 28 per block; the memory plan's bytes differ from
    the same model with FFN biases and no keyframe embedding by exactly those tensors (bf16)."""
    shapes = ltx2.model_shapes(CONFIG)
    linears = [k[: -len(".weight")] for k in shapes if k.endswith(".weight")]
    assert sorted(k for k in linears if ltx2.BLOCK_LINEAR_RE.match(k)) == sorted(block_linears(2))
    with_all = {**CONFIG, "ff_bias": True, "audio_ff_bias": True, "use_keyframes_abs_pos_embedding": False}
    shapes_all = ltx2.model_shapes(with_all)
    bf16_bytes = lambda keys, table: sum(2 * torch.Size(table[k]).numel() for k in keys)  # noqa: E731
    assert memory.planned_bytes(policy_name, config=with_all) - memory.planned_bytes(policy_name, config=CONFIG) == (
        bf16_bytes(set(shapes_all) - set(shapes), shapes_all) - bf16_bytes(set(shapes) - set(shapes_all), shapes))


@pytest.mark.parametrize("policy_name", list(POLICIES))
def test_quantize_file_keeps_the_layout_and_the_header(tmp_path, policy_name):
    src, dst, again = (tmp_path / n for n in ("in.safetensors", "out.safetensors", "again.safetensors"))
    state = write_bf16(src)
    quantize_file(str(src), str(dst), get_policy(policy_name))
    with SafetensorsFile(dst) as f:
        info = inspect_checkpoint(f)
        assert info.family == "ltx2.5" and info.config == CONFIG
        assert {k: v for k, v in f.metadata.items() if k in METADATA} == METADATA
        assert not block_ffn_biases(f.keys())
        assert ltx2.KEYFRAMES_EMBEDDING_KEY in f.tensors
        check_layers(f, info)
        assert sum(source.quantized for source in info.layers.values()) == 2 * (28 - KEPT_PER_BLOCK[policy_name])
        for layer in block_linears(2):
            qw = read_layer(f, info.layers[layer])
            dense = qw.dequantize() if isinstance(qw, weights.QuantizedWeight) else qw.float()
            assert rel_err(dense, state[layer + ".weight"].float()) < 0.13, layer
    quantize_file(str(dst), str(again), get_policy(policy_name))  # the written file reads back as LTX-2.5
    assert read_all(again)[1]["config"] == METADATA["config"]


@pytest.mark.parametrize("policy_name", list(POLICIES))
def test_loader_state_dict_has_no_ffn_biases_and_keeps_the_header(tmp_path, policy_name):
    write_bf16(tmp_path / "in.safetensors", prefix=ltx2.CHECKPOINT_PREFIX)
    loaded = load_converted(str(tmp_path / "in.safetensors"), get_policy(policy_name))
    assert not block_ffn_biases(loaded.state_dict)
    assert {k: v for k, v in loaded.metadata.items() if k in METADATA} == METADATA
    confs = {k[: -len(".comfy_quant")]: json.loads(bytes(v.tolist())) for k, v in loaded.state_dict.items()
             if k.endswith(".comfy_quant")}
    if policy_name == "int8-convrot":  # every width of this model takes whole ConvRot groups
        assert {weights.format_from_conf(c) for c in confs.values()} == {weights.INT8_CONVROT}
    assert len(confs) == 2 * (28 - KEPT_PER_BLOCK[policy_name])


def test_header_and_weights_of_different_generations_are_refused(tmp_path):
    config23 = {**CONFIG, "ff_bias": True, "audio_ff_bias": True}
    write_bf16(tmp_path / "a.safetensors", metadata={**METADATA, **ltx2.header_metadata(config23)})
    with pytest.raises(CheckpointError, match="weights are LTX-2.5's .FFN Linears without bias. but the header"):
        quantize_file(str(tmp_path / "a.safetensors"), str(tmp_path / "out.safetensors"), get_policy("nvfp4"))
    write_bf16(tmp_path / "b.safetensors", config=config23, metadata=METADATA)
    with pytest.raises(CheckpointError, match="LTX-2.5.s .ff_bias false. but the weights are LTX-2.3.s"):
        quantize_file(str(tmp_path / "b.safetensors"), str(tmp_path / "out.safetensors"), get_policy("nvfp4"))
    write_bf16(tmp_path / "c.safetensors", metadata={})
    with pytest.raises(CheckpointError, match="LTX-2.5 transformer but its header has no 'config'"):
        quantize_file(str(tmp_path / "c.safetensors"), str(tmp_path / "out.safetensors"), get_policy("nvfp4"))
    assert not (tmp_path / "out.safetensors").exists()


def test_keyframe_embedding_follows_the_file_and_prompt_embedders_the_header(tmp_path):
    """ComfyUI builds the keyframe embedding when the key is there, whatever the header says; the
    prompt AdaLN embedders unless the header says use_prompt_adaln_single false (then they must be in
    the file)."""
    state = ltx2.synthetic_state_dict(CONFIG, seed=4)
    without_keyframes = {k: v for k, v in state.items() if k != ltx2.KEYFRAMES_EMBEDDING_KEY}
    save_tensors(tmp_path / "no_kf.safetensors", without_keyframes, METADATA)
    save_tensors(tmp_path / "kf_not_in_header.safetensors", state,
                 ltx2.header_metadata({**CONFIG, "use_keyframes_abs_pos_embedding": False}))
    without_prompt = {k: v for k, v in state.items() if "prompt_adaln_single." not in k}
    save_tensors(tmp_path / "no_prompt.safetensors", without_prompt,
                 ltx2.header_metadata({**CONFIG, "use_prompt_adaln_single": False}))
    save_tensors(tmp_path / "prompt_missing.safetensors", without_prompt, METADATA)
    for name in ("no_kf", "kf_not_in_header", "no_prompt"):
        with SafetensorsFile(tmp_path / f"{name}.safetensors") as f:
            check_layers(f, inspect_checkpoint(f))
    with SafetensorsFile(tmp_path / "prompt_missing.safetensors") as f:
        with pytest.raises(CheckpointError, match="missing: .*prompt_adaln_single"):
            check_layers(f, inspect_checkpoint(f))


OFFICIAL_CONFS = {"int8-convrot": INT8_CONVROT_CONF, "nvfp4": NVFP4_CONF}


def official_file(path, fmt: str) -> dict[str, tuple[torch.Tensor, dict]]:
    """A transformer in the layout of Lightricks' official LTX-2.5 `fmt` file for ComfyUI: every block
    Linear in that format with its `.comfy_quant` tensor (tests/official_layouts.py), the rest bf16,
    the release header."""
    state = {ltx2.CHECKPOINT_PREFIX + k: v for k, v in ltx2.synthetic_state_dict(CONFIG, seed=4).items()}
    made = official_layers(state, [ltx2.CHECKPOINT_PREFIX + layer for layer in block_linears(2)], OFFICIAL_CONFS[fmt])
    save_tensors(path, state, METADATA)
    return {ltx2.strip_prefix(layer, ltx2.CHECKPOINT_PREFIX): value for layer, value in made.items()}


@pytest.mark.parametrize("fmt, stored_format", [("int8-convrot", weights.INT8_CONVROT), ("nvfp4", weights.NVFP4)])
def test_official_files_read_as_they_are(tmp_path, fmt, stored_format):
    made = official_file(tmp_path / "official.safetensors", fmt)
    with SafetensorsFile(tmp_path / "official.safetensors") as f:
        assert QUANT_METADATA_KEY not in f.metadata
        info = inspect_checkpoint(f)
        assert (info.kind, info.family, info.prefix) == ("comfyui-native", "ltx2.5", ltx2.CHECKPOINT_PREFIX)
        check_layers(f, info)
        for layer, (reference, _) in made.items():
            assert info.layers[layer].format == stored_format
            assert torch.equal(read_layer(f, info.layers[layer]).dequantize(), reference), layer
    # Loaded with the policy of its own format (or bf16), every layer is kept byte for byte.
    for policy_name in (fmt, "bf16"):
        loaded = load_converted(str(tmp_path / "official.safetensors"), get_policy(policy_name))
        assert not any(d.changed for d in loaded.decisions)
        assert {k: v for k, v in loaded.metadata.items() if k in METADATA} == METADATA
        for layer, (_, tensors) in made.items():
            for suffix, tensor in tensors.items():
                assert same_tensor(loaded.state_dict[f"{layer}.{suffix}"], tensor), (layer, suffix)


@pytest.mark.parametrize("fmt, capability, fast_path", [
    ("int8-convrot", Capability("cuda", (8, 0), True), "int8-rowwise"),
    ("int8-convrot", Capability("cuda", HOPPER, True), "int8-rowwise"),
    ("nvfp4", Capability("cuda", HOPPER, True), "nvfp4-jit-fp8"),
    ("nvfp4", Capability("cuda", BLACKWELL, True), "nvfp4-native"),
])
def test_official_files_run_on_the_fast_paths(tmp_path, fmt, capability, fast_path):
    """The layers of the official files, as the loader hands them to ComfyUI, take the pack's W8A8 /
    W4A4 paths where their activations are video tokens (the few-token ones run weight-only)."""
    official_file(tmp_path / "official.safetensors", fmt)
    loaded = load_converted(str(tmp_path / "official.safetensors"), get_policy(fmt))
    paths = {}
    for key, tensor in loaded.state_dict.items():
        if key.endswith(".comfy_quant"):
            conf = json.loads(bytes(tensor.tolist()))
            layer = key[: -len(".comfy_quant")]
            paths[layer] = runtime.choose_path(weights.format_from_conf(conf), layer_activation(conf, "fast"),
                                               capability, tuple(conf["shape"]))[0]
    assert set(paths) == set(block_linears(2))
    video_token_layers = [layer for layer in paths if not ltx2.reads_few_tokens(layer)]
    assert video_token_layers and {paths[layer] for layer in video_token_layers} == {fast_path}
    assert {paths[layer] for layer in paths if ltx2.reads_few_tokens(layer)} == {
        "bf16-dequant" if fmt == "int8-convrot" else "nvfp4-jit-bf16"}
    assert layer_activation(INT8_CONVROT_CONF) == Activation.INT8  # the file's own config, as ComfyUI reads it
