"""LTX-2 checkpoints: discover what a file holds, and check that it is a whole LTX-2 transformer that
ComfyUI builds as its header says. conversion.py quantizes it.

Reads plain bf16/fp16/fp32 files (single-file `model.diffusion_model.` checkpoints and bare
diffusion-model files), ComfyUI-native quantized files (`_quantization_metadata` header or
`.comfy_quant` tensors), Lightricks' official fp8 files (`weight_scale` + `input_scale`, no
metadata) and official NVFP4 files (U8 weight, e4m3 swizzled `weight_scale`, fp32
`weight_scale_2`).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Iterator

import torch

from . import comfy_quant, ltx2, weights
from .safetensors_io import DTYPE_NAMES, CheckpointError, MemoryTensors, SafetensorsFile

SCALE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale")
# Tensors of a quantized layer besides its weight and bias.
LAYER_EXTRA_SUFFIXES = (*SCALE_SUFFIXES, *weights.OUTLIER_SUFFIXES, comfy_quant.CONF_SUFFIX[1:])
# The header config entries ltx2.block_shapes computes a transformer block's tensors from, and those
# ltx2.model_shapes also needs for the rest of an LTX-2.3 or LTX-2.5 transformer.
BLOCK_LAYOUT_KEYS = ("num_layers", "num_attention_heads", "attention_head_dim", "audio_num_attention_heads",
                     "audio_attention_head_dim")
MODEL_LAYOUT_KEYS = ("connector_num_layers", "connector_num_attention_heads", "audio_connector_num_attention_heads")
MAX_LAYOUT_VALUE = 4096  # beyond any LTX-2 width or depth; keeps a damaged header from building a huge model
BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
# Numbers in the header config: LTX-2's largest is 4,096; past 2^24 a float32 no longer holds every
# whole number, and ComfyUI computes the timestep and position embeddings from them in float32.
MAX_CONFIG_NUMBER = 2 ** 24
# Config numbers ComfyUI multiplies the timestep by or divides positions by: zero or a negative value
# gives NaN or a model that ignores its input.
POSITIVE_CONFIG_KEYS = ("timestep_scale_multiplier", "av_ca_timestep_scale_multiplier", "positional_embedding_theta",
                        "positional_embedding_max_pos", "audio_positional_embedding_max_pos",
                        "connector_positional_embedding_max_pos")

log = logging.getLogger("ltx2_quant")


@dataclass
class LayerSource:
    """One Linear-like weight of a checkpoint: its format and the file keys that hold it."""

    layer: str  # unprefixed name, e.g. transformer_blocks.0.attn1.to_q
    format: str  # BF16/F16/F32 for plain weights, else a weights.FORMATS name
    shape: tuple[int, ...]  # logical shape
    keys: dict[str, str] = field(default_factory=dict)  # suffix (weight, weight_scale, ...) -> file key
    nbytes: int = 0
    weight_only: bool = False  # the file's config asks for full precision matmuls

    @property
    def quantized(self) -> bool:
        return self.format in weights.FORMATS


@dataclass
class CheckpointInfo:
    path: str
    prefix: str
    family: str | None
    config: dict | None
    metadata: dict[str, str]
    layers: dict[str, LayerSource]
    num_blocks: int
    kind: str  # "plain", "comfyui-native", "lightricks-fp8", "lightricks-nvfp4", "mixed"

    def layer_table(self) -> list[tuple[str, tuple[int, ...], str, int]]:
        return [(s.layer, s.shape, s.format, s.nbytes) for s in self.layers.values()]


def _discover_format(f: SafetensorsFile, layer_key: str, conf: dict | None) -> str:
    weight = f.tensors[layer_key + ".weight"]
    if conf is not None:
        try:
            return weights.format_from_conf(conf)
        except weights.FormatError as e:
            raise CheckpointError(f"{f.path}: layer {layer_key!r}: {e}") from None
    has_scale = layer_key + ".weight_scale" in f
    if weight.dtype == torch.float8_e4m3fn and len(weight.shape) == 2:
        if has_scale and f.tensors[layer_key + ".weight_scale"].shape not in ((), (1,)):
            return weights.FP8_ROWWISE
        return weights.FP8_TENSOR  # Lightricks' fp8 (scaled) or an unscaled fp8 cast (scale 1)
    if weight.dtype == torch.uint8 and has_scale and layer_key + ".weight_scale_2" in f:
        return weights.NVFP4  # Lightricks' official NVFP4 layout
    return DTYPE_NAMES[weight.dtype]


def _logical_shape(f: SafetensorsFile, layer_key: str, fmt: str, conf: dict | None) -> tuple[int, ...]:
    if conf and "shape" in conf:  # written by this pack; padded formats cannot tell otherwise
        shape = conf["shape"]
        if not (isinstance(shape, list) and len(shape) == 2
                and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
            raise CheckpointError(f"{f.path}: layer {layer_key!r} has quantization shape {shape!r} in its config; "
                                  "it must be [rows, columns]")
        return tuple(shape)
    stored = f.tensors[layer_key + ".weight"].shape
    bias = f.tensors.get(layer_key + ".bias")
    rows = bias.shape[0] if bias is not None and len(bias.shape) == 1 else stored[0]
    if fmt == weights.NVFP4:
        return (rows, stored[1] * 2)
    return (rows, *stored[1:]) if fmt in weights.FORMATS else tuple(stored)


def _check_outlier_tensors(f: SafetensorsFile, source: LayerSource) -> None:
    """A layer's pre_quant_scale and low-rank branch (quant.outliers) must fit its shape: one factor per input
    feature, down (r, K) and up (N, r) together, in a float dtype."""
    present = [suffix for suffix in weights.OUTLIER_SUFFIXES if suffix in source.keys]
    if not present:
        return
    if not source.quantized or len(source.shape) != 2:
        raise CheckpointError(f"{f.path}: layer {source.layer!r} is not quantized but has {present[0]!r}; "
                              "only quantized layers carry outlier transforms")
    n, k = source.shape
    if ("low_rank_down" in present) != ("low_rank_up" in present):
        raise CheckpointError(f"{f.path}: layer {source.layer!r} has only one of low_rank_down / low_rank_up; "
                              "the low-rank branch needs both")
    rank = (list(f.tensors[source.keys["low_rank_down"]].shape) or [0])[0] if "low_rank_down" in present else 0
    expected = weights.outlier_specs(source.shape, "pre_quant_scale" in present, rank)
    for suffix, (_, shape) in expected.items():
        info = f.tensors[source.keys[suffix]]
        if tuple(info.shape) != tuple(shape) or info.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise CheckpointError(f"{f.path}: tensor {source.keys[suffix]!r} is {DTYPE_NAMES[info.dtype]} "
                                  f"{list(info.shape)}, but the {suffix} of a layer of shape [{n}, {k}] needs a float "
                                  f"tensor of shape {list(shape)}")


def _check_layer_tensors(f: SafetensorsFile, source: LayerSource) -> None:
    """Scale tensors must have the shape and dtype the format needs, or reading would be silently wrong."""
    _check_outlier_tensors(f, source)
    if not source.quantized or len(source.shape) != 2:
        return
    expected = weights.storage_specs(source.format, source.shape)
    for suffix, (dtype, shape) in expected.items():
        key = source.keys.get(suffix)
        if key is None:
            if suffix == "weight_scale" and source.format == weights.FP8_TENSOR:
                continue  # unscaled fp8 cast: scale 1.0
            raise CheckpointError(f"{f.path}: layer {source.layer!r} ({source.format}) lacks tensor {suffix!r}")
        info = f.tensors[key]
        numel_ok = _numel(info.shape) == _numel(shape)
        if suffix == "weight_scale" and source.format in weights.INT8_FORMATS:
            numel_ok = numel_ok or _numel(info.shape) == 1  # ComfyUI's int8_tensorwise: per row or per tensor
        dtype_ok = _stored_dtype_ok(info.dtype, dtype, suffix, source.format)
        if suffix == "weight":
            numel_ok = tuple(info.shape) == tuple(shape)
        if not (numel_ok and dtype_ok):
            raise CheckpointError(f"{f.path}: tensor {key!r} is {DTYPE_NAMES[info.dtype]} {list(info.shape)}, but a "
                                  f"{source.format} layer of shape {list(source.shape)} needs "
                                  f"{DTYPE_NAMES[dtype]} {list(shape)}")
    input_scale = source.keys.get("input_scale")
    if input_scale is not None and _numel(f.tensors[input_scale].shape) != 1:
        raise CheckpointError(f"{f.path}: tensor {input_scale!r} must be a scalar, got shape "
                              f"{list(f.tensors[input_scale].shape)}")


def _stored_dtype_ok(stored: torch.dtype, expected: torch.dtype, suffix: str, fmt: str) -> bool:
    """Whether a tensor stored as `stored` holds what `fmt` needs as `expected` without a silent
    reinterpretation: wider floats may come in another float type of the same size; 1-byte data only
    in its own type, except block scales, which ComfyUI writes as raw bytes (U8) or as their FP8 type."""
    if stored == expected:
        return True
    if expected.itemsize == 1:
        scale_types = (torch.uint8, torch.float8_e8m0fnu if fmt == weights.MXFP8 else torch.float8_e4m3fn)
        return suffix == "weight_scale" and stored in scale_types
    return stored.is_floating_point and expected.is_floating_point and stored.itemsize == expected.itemsize


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def inspect_checkpoint(f: SafetensorsFile, require_ltx: bool = True) -> CheckpointInfo:
    keys = f.keys()
    prefix = ltx2.detect_prefix(keys)
    family = ltx2.detect_family(keys, prefix)
    if family is None and require_ltx:
        raise CheckpointError(f"{f.path}: not an LTX-2 checkpoint (no {ltx2.FAMILY_KEY!r} key, with or "
                              f"without the {ltx2.CHECKPOINT_PREFIX!r} prefix)")
    confs = comfy_quant.read_layer_confs(f)
    layers: dict[str, LayerSource] = {}
    for key in keys:
        if not key.endswith(".weight") or not key.startswith(prefix):
            continue
        layer_key = key[: -len(".weight")]
        conf = confs.get(layer_key)
        fmt = _discover_format(f, layer_key, conf)
        source = LayerSource(ltx2.strip_prefix(layer_key, prefix), fmt, _logical_shape(f, layer_key, fmt, conf),
                             weight_only=bool((conf or {}).get("full_precision_matrix_mult")))
        source.keys["weight"] = key
        for suffix in (*SCALE_SUFFIXES, *weights.OUTLIER_SUFFIXES):
            if f"{layer_key}.{suffix}" in f:
                source.keys[suffix] = f"{layer_key}.{suffix}"
        source.nbytes = sum(f.tensors[k].nbytes for k in source.keys.values())
        _check_layer_tensors(f, source)
        layers[source.layer] = source
    try:
        config = ltx2.transformer_config(f.metadata)
    except ValueError as e:
        raise CheckpointError(f"{f.path}: the header's 'config' metadata {e}; ComfyUI builds the model from it. "
                              "The header is damaged: use the original release file.") from None
    formats_found = {s.format for s in layers.values() if s.quantized}
    if not formats_found:
        kind = "plain"
    elif confs:
        kind = "comfyui-native"
    elif formats_found == {weights.NVFP4}:
        kind = "lightricks-nvfp4"
    elif formats_found == {weights.FP8_TENSOR}:
        kind = "lightricks-fp8"
    else:
        kind = "mixed"
    return CheckpointInfo(f.path, prefix, family, config, dict(f.metadata), layers,
                          ltx2.block_count(keys, prefix), kind)


# The families ComfyUI builds from the header config alone: without it, it builds LTX-2.
CONFIG_FAMILIES = ("ltx2.3", "ltx2.5")


def require_config(info: CheckpointInfo) -> None:
    if info.family in CONFIG_FAMILIES and info.config is None:
        raise CheckpointError(
            f"{info.path}: this is an {ltx2.FAMILY_NAMES[info.family]} transformer but its header has no 'config' "
            "metadata; ComfyUI would build it as LTX-2 and fail. Quantize the original release file, which "
            "carries it.")


def _config_numbers(config: dict) -> Iterator[tuple[str, object]]:
    """(path, value) of every number in a parsed config, e.g. ('positional_embedding_max_pos[1]', 2048)."""
    stack: list[tuple[str, object]] = [(key, value) for key, value in config.items()]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            stack += [(f"{path}.{key}", item) for key, item in value.items()]
        elif isinstance(value, list):
            stack += [(f"{path}[{index}]", item) for index, item in enumerate(value)]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield path, value


def check_config_values(info: CheckpointInfo) -> None:
    """Every number in the header config is finite and of a size an LTX-2 model has, and those
    ComfyUI scales the timestep or positions by are positive: a NaN timestep multiplier samples an
    all-NaN latent without any error."""
    if info.config is None:
        return
    for path, value in _config_numbers(info.config):
        top = re.split(r"[.\[]", path, maxsplit=1)[0]
        bad = (not math.isfinite(value) or abs(value) > MAX_CONFIG_NUMBER
               or (top in POSITIVE_CONFIG_KEYS and value <= 0))
        if bad:
            allowed = "a positive number" if top in POSITIVE_CONFIG_KEYS else "a finite number"
            raise CheckpointError(f"{info.path}: the header config has {path}={value!r}, which no LTX-2 model has "
                                  f"({allowed} of at most {MAX_CONFIG_NUMBER:,}); ComfyUI would build the model with "
                                  "it and sample NaN or noise. The header is damaged: use the original release file.")


def check_layers(f: SafetensorsFile | MemoryTensors, info: CheckpointInfo) -> None:
    """The transformer in the file must be the one its header config describes: ComfyUI builds the
    model from the config and loads the weights non-strictly, so a missing tensor would stay
    uninitialized (noise or black video) and an extra one would be ignored, both silently. Without
    a config that gives the layout, every block must hold the same tensors with the same shapes."""
    if info.family not in ("ltx2", *CONFIG_FAMILIES):
        return
    config = _layout_config(info)
    _check_generation(info)
    blocks: dict[int, dict[str, tuple[int, ...]]] = {}
    outside: dict[str, tuple[int, ...]] = {}
    for key, shape in _transformer_shapes(f, info).items():
        match = BLOCK_KEY.match(key)
        if match:
            blocks.setdefault(int(match.group(1)), {})[match.group(2)] = shape
        else:
            outside[key] = shape
    if config is not None:
        num_blocks, per_block = config["num_layers"], ltx2.block_shapes(config)
        reference = (f"the header config ({num_blocks} blocks, video {config['num_attention_heads']} heads x "
                     f"{config['attention_head_dim']}, audio {config['audio_num_attention_heads']} heads x "
                     f"{config['audio_attention_head_dim']})")
    else:
        num_blocks, per_block = info.num_blocks, {}
        for n in sorted(blocks):
            for key, shape in blocks[n].items():
                per_block.setdefault(key, shape)
        reference = f"the other blocks ({num_blocks} blocks, no header config giving the layout)"
    missing, extra, wrong = [], [], []
    for n in range(min(num_blocks, info.num_blocks)):
        have = blocks.get(n, {})
        for key, shape in per_block.items():
            if key not in have:
                missing.append(f"transformer_blocks.{n}.{key}")
            elif have[key] != tuple(shape):
                wrong.append(f"transformer_blocks.{n}.{key} is {list(have[key])}, not {list(shape)}")
        extra += [f"transformer_blocks.{n}.{key}" for key in have if key not in per_block]
    if num_blocks > info.num_blocks:
        missing.append(f"all of transformer_blocks.{info.num_blocks} to {num_blocks - 1}")
    extra_blocks = [f"all of transformer_blocks.{n}" for n in sorted(blocks) if n >= num_blocks]
    if info.family in CONFIG_FAMILIES and config is not None and all(k in config for k in MODEL_LAYOUT_KEYS):
        # ComfyUI builds the keyframe embedding when the file has it, whatever the header says.
        keyframes = ltx2.KEYFRAMES_EMBEDDING_KEY in outside
        layout = {**config, "num_layers": 0, "use_keyframes_abs_pos_embedding": keyframes}
        for key, shape in ltx2.model_shapes(layout).items():
            if key not in outside:
                missing.append(key)
            elif outside[key] != tuple(shape):
                wrong.append(f"{key} is {list(outside[key])}, not {list(shape)}")
    problems = []
    if missing:
        problems.append(f"missing: {_first(missing)} (ComfyUI would leave them uninitialized: noise or a black video)")
    if extra_blocks:
        problems.append(f"not part of that model: {_first(extra_blocks)} (ComfyUI would ignore them)")
    if extra:  # stray tensors are harmless (ComfyUI ignores them): said, not refused
        log.warning("LTX-2 Quant: %s has tensors the model does not use, ignored: %s", f.path, _first(extra))
    if wrong:
        problems.append(f"wrong shape: {_first(wrong)}")
    if problems:
        raise CheckpointError(f"{f.path}: the transformer does not match {reference}; " + "; ".join(problems)
                              + ". The file is incomplete or damaged, or its header belongs to another model.")


def _layout_config(info: CheckpointInfo) -> dict | None:
    """The header config when it gives the transformer's layout, else None; a layout value that
    ComfyUI could not build a model from is an error."""
    config = info.config
    if config is None:
        return None
    for key in (*BLOCK_LAYOUT_KEYS, *MODEL_LAYOUT_KEYS):
        value = config.get(key)
        if key in config and (not isinstance(value, int) or isinstance(value, bool)
                              or not 0 <= value <= MAX_LAYOUT_VALUE):
            raise CheckpointError(f"{info.path}: the header config has {key}={value!r}, which no LTX-2 model has "
                                  f"(a whole number from 0 to {MAX_LAYOUT_VALUE}); the header is damaged")
    return config if all(k in config for k in BLOCK_LAYOUT_KEYS) else None


def _check_generation(info: CheckpointInfo) -> None:
    """Weights of one LTX generation and a header config of another: gated attention (LTX-2.3 and
    2.5) and bias-free FFNs (LTX-2.5), each in the weights but not the header or the other way round."""
    if info.config is None:
        return
    gated = bool(info.config.get("apply_gated_attention"))
    ffn_bias = bool(info.config.get("ff_bias", True))
    weights_of = ltx2.FAMILY_NAMES[info.family]
    if gated and info.family == "ltx2":
        raise CheckpointError(f"{info.path}: the header config is LTX-2.3's (apply_gated_attention) but the weights "
                              "are LTX-2's (no to_gate_logits layers); ComfyUI would build LTX-2.3 and leave the "
                              "gates uninitialized. The header does not belong to these weights.")
    if not gated and info.family in CONFIG_FAMILIES:
        raise CheckpointError(f"{info.path}: the weights are {weights_of}'s (they have to_gate_logits layers) but "
                              "the header config is LTX-2's (no apply_gated_attention); ComfyUI would build LTX-2 "
                              f"and ignore the gates. Use the {weights_of} release file, whose header matches.")
    if ffn_bias and info.family == "ltx2.5":
        raise CheckpointError(f"{info.path}: the weights are LTX-2.5's (FFN Linears without bias) but the header "
                              "config does not say ff_bias false; ComfyUI would build FFN biases and leave them "
                              "uninitialized. Use the LTX-2.5 release file, whose header matches.")
    if not ffn_bias and info.family != "ltx2.5":
        raise CheckpointError(f"{info.path}: the header config is LTX-2.5's (ff_bias false) but the weights are "
                              f"{weights_of}'s (FFN Linears with bias); ComfyUI would build bias-free FFNs and ignore "
                              "the biases. The header does not belong to these weights.")


def _transformer_shapes(f: SafetensorsFile | MemoryTensors, info: CheckpointInfo) -> dict[str, tuple[int, ...]]:
    """The diffusion model's tensors, unprefixed, with quantized layers at their logical shape and
    their scale tensors left out (inspect_checkpoint has checked those)."""
    shapes = {}
    for key in f.keys():
        if not key.startswith(info.prefix):
            continue
        name = ltx2.strip_prefix(key, info.prefix)
        layer, _, suffix = name.rpartition(".")
        if layer in info.layers and suffix in LAYER_EXTRA_SUFFIXES:
            continue
        shapes[name] = tuple(info.layers[layer].shape if layer in info.layers and suffix == "weight"
                             else f.tensors[key].shape)
    return shapes


def _first(names: list[str], count: int = 5) -> str:
    shown = ", ".join(names[:count])
    return shown + (f" and {len(names) - count} more" if len(names) > count else "")























