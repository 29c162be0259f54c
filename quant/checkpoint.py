"""LTX-2 checkpoints: discover what a file holds, and quantize it tensor by tensor.

Reads plain bf16/fp16/fp32 files (single-file `model.diffusion_model.` checkpoints and bare
diffusion-model files), ComfyUI-native quantized files (`_quantization_metadata` header or
`.comfy_quant` tensors), Lightricks' official fp8 files (`weight_scale` + `input_scale`, no
metadata) and official NVFP4 files (U8 weight, e4m3 swizzled `weight_scale`, fp32
`weight_scale_2`). Writes ComfyUI-native files that stock ComfyUI loads.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import torch

from . import comfy_quant, ltx2, weights
from .formats import E2M1_MAX, FP8_MAX, INT8_MAX, round_up
from .policies import LayerDecision, Policy, plan
from .safetensors_io import (DTYPE_NAMES, CheckpointError, MemoryTensors, SafetensorsFile, TensorSpec, check_output,
                             write_streaming)

PACK_METADATA_KEY = "ltx2_quant"
SCALE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale")
PLAIN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Tensors of a quantized layer besides its weight and bias.
LAYER_EXTRA_SUFFIXES = (*SCALE_SUFFIXES, comfy_quant.CONF_SUFFIX[1:])
# The header config entries ltx2.block_shapes computes a transformer block's tensors from, and those
# ltx2.model_shapes also needs for the rest of an LTX-2.3 or LTX-2.5 transformer.
BLOCK_LAYOUT_KEYS = ("num_layers", "num_attention_heads", "attention_head_dim", "audio_num_attention_heads",
                     "audio_attention_head_dim")
MODEL_LAYOUT_KEYS = ("connector_num_layers", "connector_num_attention_heads", "audio_connector_num_attention_heads")
MAX_LAYOUT_VALUE = 4096  # beyond any LTX-2 width or depth; keeps a damaged header from building a huge model
BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
# FP8 codes that are NaN or Inf (no isfinite kernel for these dtypes): (mask, value) of the bits.
NONFINITE_FP8_BITS = {torch.float8_e4m3fn: (0x7F, 0x7F), torch.float8_e5m2: (0x7C, 0x7C),
                      torch.float8_e8m0fnu: (0xFF, 0xFF)}
# ComfyUI computes LTX-2 in bfloat16 (or float32, of the same range): a finite value beyond this in a
# wider dtype (an F64 1e300, an F32 3.4e38) becomes Inf there, and the video NaN.
COMPUTE_DTYPE_MAX = torch.finfo(torch.bfloat16).max
FLOAT32 = torch.finfo(torch.float32)
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


def _check_layer_tensors(f: SafetensorsFile, source: LayerSource) -> None:
    """Scale tensors must have the shape and dtype the format needs, or reading would be silently wrong."""
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
        for suffix in SCALE_SUFFIXES:
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


STAGING_ALIGN = 256  # bytes: where each tensor sharing a staging buffer starts (any dtype can view it)


def _aligned(nbytes: int) -> int:
    return round_up(nbytes, STAGING_ALIGN)


class HostStaging:
    """Two page-locked host buffers that every layer quantized on a GPU reuses: the file is read
    straight into one, so no fresh pages are faulted in and the copy up is DMA; results come down
    into the other and are then copied by torch's threads into the memory they keep. Copies between
    the GPU and fresh pageable memory took 17 s of a 48 s load of the 22B model (H200, cProfile)."""

    def __init__(self, up_bytes: int, down_bytes: int):
        pinned = torch.cuda.is_available()
        self._up = torch.empty(up_bytes, dtype=torch.uint8, pin_memory=pinned)
        self._down = torch.empty(down_bytes, dtype=torch.uint8, pin_memory=pinned)

    @staticmethod
    def _regions(buffer: torch.Tensor, sizes: list[int]) -> list[torch.Tensor] | None:
        """Consecutive aligned slices of `buffer` of these sizes, or None when they do not fit."""
        regions, offset = [], 0
        for size in sizes:
            regions.append(buffer[offset:offset + size])
            offset += _aligned(size)
        return regions if offset <= buffer.numel() else None

    def read(self, f: SafetensorsFile, keys: list[str]) -> list[torch.Tensor] | None:
        """Tensors read from `f` into the upload buffer (views, valid until the next call), or None
        when they do not fit it."""
        regions = self._regions(self._up, [f.tensors[key].nbytes for key in keys])
        return None if regions is None else [f.read(key, into) for key, into in zip(keys, regions)]

    def download(self, qw: weights.QuantizedWeight) -> weights.QuantizedWeight:
        """`qw` (on a GPU) in fresh host memory."""
        gpu = list(qw.tensors.values())
        regions = self._regions(self._down, [t.numel() * t.element_size() for t in gpu])
        if regions is None:
            return qw.to("cpu")
        staged = [region.view(t.dtype).reshape(t.shape).copy_(t, non_blocking=True) for region, t in zip(regions, gpu)]
        if gpu[0].is_cuda:
            torch.cuda.current_stream(gpu[0].device).synchronize()
        host = [torch.empty(t.shape, dtype=t.dtype).copy_(t) for t in staged]
        return weights.QuantizedWeight(qw.format, qw.shape, dict(zip(qw.tensors, host)))


def read_layer(f: SafetensorsFile, source: LayerSource,
               staging: HostStaging | None = None) -> weights.QuantizedWeight | torch.Tensor:
    """A layer's weight as stored: a plain tensor or a QuantizedWeight (scales as ComfyUI types them).
    With `staging` (and a file) its tensors are views of the staging buffer, valid until the next read."""
    suffixes = ["weight"] if not source.quantized else list(source.keys)
    keys = [source.keys[suffix] for suffix in suffixes]
    staged = staging.read(f, keys) if staging is not None and isinstance(f, SafetensorsFile) else None
    tensors = dict(zip(suffixes, staged if staged is not None else [f.read(key) for key in keys]))
    if not source.quantized:
        return tensors["weight"]
    return weights.QuantizedWeight.from_tensors(source.format, tuple(source.shape), tensors)


def nonfinite_count(tensor: torch.Tensor) -> int:
    """How many NaN/Inf values a tensor holds (0 for integer tensors). A float32 sum is finite
    unless some value is NaN/Inf (or the sum overflows), and it runs about twice as fast as
    isfinite on bf16, so values are counted only when the sum says there is something to count."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0
    if tensor.dtype in NONFINITE_FP8_BITS:
        mask, value = NONFINITE_FP8_BITS[tensor.dtype]
        return int(((tensor.view(torch.uint8) & mask) == value).sum())
    if torch.isfinite(tensor.sum(dtype=torch.float32)):
        return 0
    return int((~torch.isfinite(tensor)).sum())


def beyond_compute_range(tensor: torch.Tensor) -> float | None:
    """The largest magnitude in `tensor` if it is finite but beyond what ComfyUI computes in (only
    float32 and float64 can hold one), else None. Run after the NaN/Inf check."""
    if tensor.dtype not in (torch.float32, torch.float64) or tensor.numel() == 0:
        return None
    low, high = torch.aminmax(tensor)
    largest = max(-float(low), float(high))
    return largest if largest > COMPUTE_DTYPE_MAX else None


def refuse_nonfinite(path: str, key: str, tensor: torch.Tensor, layer: str | None = None) -> torch.Tensor:
    """`tensor`, or a CheckpointError naming the file, the tensor (and its layer) if any value is NaN/Inf
    or too large to compute with."""
    where = f"layer {layer!r}: tensor {key!r}" if layer else f"tensor {key!r}"
    bad = nonfinite_count(tensor)
    if bad:
        raise CheckpointError(f"{path}: {where} has {bad} NaN/Inf values; refusing to use it (the video would "
                              "come out black or as noise). The file is damaged: download it again.")
    largest = beyond_compute_range(tensor)
    if largest is not None:
        raise CheckpointError(f"{path}: {where} holds {largest:g}, beyond bfloat16's range (±{COMPUTE_DTYPE_MAX:.4g}) "
                              "that ComfyUI computes LTX-2 in; it would become Inf and the video NaN. The file is "
                              "damaged: download it again.")
    return tensor


def _largest_weight(qw: weights.QuantizedWeight) -> float:
    """An upper bound of a stored layer's weight magnitudes without dequantizing it: the format's
    largest code times its largest scales."""
    scale = qw.tensors.get("weight_scale")
    if qw.format == weights.MXFP8:  # E8M0 bytes: 2^(byte - 127)
        return FP8_MAX * 2.0 ** (int(scale.max()) - 127)
    largest_scale = float(scale.float().abs().max()) if scale is not None else 1.0
    if qw.format == weights.NVFP4:
        return E2M1_MAX * largest_scale * abs(float(qw.tensors["weight_scale_2"]))
    return (INT8_MAX if qw.format in weights.INT8_FORMATS else FP8_MAX) * largest_scale


def _check_input_scale(path: str, key: str, layer: str, scale: torch.Tensor) -> torch.Tensor:
    """A static activation scale divides every input of its layer: zero makes Inf, a subnormal or a
    negative one garbage."""
    value = float(scale.float().reshape(-1)[0])
    if not value >= FLOAT32.tiny:
        raise CheckpointError(f"{path}: layer {layer!r}: tensor {key!r} is {value:g}; an activation scale must be a "
                              f"positive normal float32 ({FLOAT32.tiny:g} to {FLOAT32.max:g}). The file is damaged.")
    return scale


def _quantize_on(f: SafetensorsFile, source: LayerSource, stored: weights.QuantizedWeight | torch.Tensor,
                 target: str, device: torch.device | str, staging: HostStaging | None = None) -> weights.QuantizedWeight:
    if isinstance(stored, weights.QuantizedWeight):
        full = stored.to(device).dequantize(torch.float32)
    else:
        full = stored.to(device)
        if full.dtype == torch.float64:  # checked before float32 turns a finite 1e300 into Inf
            refuse_nonfinite(f.path, source.keys["weight"], full, source.layer)
        if full.dtype not in PLAIN_DTYPES:  # e.g. an fp8_e5m2 cast: no reductions in that dtype
            full = full.float()
    refuse_nonfinite(f.path, source.keys["weight"], full, source.layer)
    out = weights.quantize_weight(full, target)
    return staging.download(out) if staging is not None and full.is_cuda else out.to("cpu")


def convert_layer(f: SafetensorsFile, source: LayerSource, target: str,
                  device: torch.device | str = "cpu", staging: HostStaging | None = None) -> weights.QuantizedWeight:
    """Quantize (or re-quantize) one layer to `target`, refusing NaN/Inf weights or scales by name.
    The math runs on `device` (a GPU makes load-time quantization fast; `staging` moves the data
    there and back); the result comes back to the CPU. A layer that does not fit the GPU's free
    memory is quantized on the CPU instead."""
    stored = read_layer(f, source, staging)
    if isinstance(stored, weights.QuantizedWeight):
        for suffix, key in source.keys.items():  # scales are tiny; FP8 codes are checked bitwise
            tensor = stored.tensors[suffix]
            if stored.format == weights.MXFP8 and suffix == "weight_scale":
                tensor = tensor.view(torch.float8_e8m0fnu)  # E8M0 held as bytes; 0xFF is NaN
            refuse_nonfinite(f.path, key, tensor, source.layer)
            if suffix == "input_scale":
                _check_input_scale(f.path, key, source.layer, tensor)
        largest = _largest_weight(stored)
        if largest > COMPUTE_DTYPE_MAX:
            raise CheckpointError(f"{f.path}: layer {source.layer!r}: its scales let weights reach {largest:g} (largest "
                                  f"{stored.format} code times the largest scales), beyond bfloat16's range "
                                  f"(±{COMPUTE_DTYPE_MAX:.4g}) that ComfyUI computes in. The file is damaged.")
        if stored.format == target:  # kept as stored; out of the staging buffer, which the next read reuses
            return stored if staging is None else weights.QuantizedWeight(
                stored.format, stored.shape, {k: v.clone() for k, v in stored.tensors.items()})
    try:
        out = _quantize_on(f, source, stored, target, device, staging)
    except torch.OutOfMemoryError:
        if torch.device(device).type == "cpu":
            raise
        out = None
    if out is None:
        # Past the except block the failed attempt's frames, and the GPU memory they held, are gone.
        log.warning("LTX-2 Quant: out of GPU memory quantizing %s; quantizing it on the CPU instead", source.layer)
        torch.cuda.empty_cache()
        out = _quantize_on(f, source, stored, target, "cpu")
    if "input_scale" in source.keys:  # a static activation scale travels with its layer
        key = source.keys["input_scale"]
        scale = _check_input_scale(f.path, key, source.layer, refuse_nonfinite(f.path, key, f.read(key), source.layer))
        out.tensors["input_scale"] = scale.float().reshape(())
    return out


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


@dataclass
class Step:
    """Writes one plain tensor, or all tensors of one quantized layer, in file order."""

    specs: list[TensorSpec]
    make: Callable[[], list[torch.Tensor]]


@dataclass
class ConversionPlan:
    info: CheckpointInfo
    decisions: list[LayerDecision]
    steps: list[Step]
    quant_layers: dict[str, dict]  # prefixed layer name -> ComfyUI per-layer config

    def metadata(self, policy: Policy) -> dict[str, str]:
        """Header of the converted file: the source's metadata (with `config`) verbatim, plus the
        rewritten `_quantization_metadata` and a note of the policy."""
        metadata = comfy_quant.with_layer_confs(self.info.metadata, self.quant_layers)
        metadata[PACK_METADATA_KEY] = json.dumps({"policy": policy.name, "activation": policy.activation})
        return metadata


def layer_step(layer_key: str, fmt: str, shape: tuple[int, int], has_input_scale: bool,
               make_weight: Callable[[], weights.QuantizedWeight]) -> Step:
    """The step that writes one quantized layer's tensors in file order; `make_weight()` gives the
    layer in `fmt` when the write reaches it."""
    planned = weights.storage_specs(fmt, shape)
    if has_input_scale:
        planned["input_scale"] = (torch.float32, ())
    specs = [TensorSpec(f"{layer_key}.{suffix}", dtype, dims) for suffix, (dtype, dims) in planned.items()]

    def make() -> list[torch.Tensor]:
        qw = make_weight()
        return [qw.tensors[suffix] for suffix in planned]
    return Step(specs, make)


def _host_staging(f: SafetensorsFile | MemoryTensors, info: CheckpointInfo, decisions: list[LayerDecision],
                  device: torch.device | str) -> HostStaging | None:
    """Staging buffers sized for the largest layer a GPU converts (read and result), or None on the CPU."""
    converted = [d for d in decisions if d.target_format in weights.FORMATS and d.target_format != info.layers[d.layer].format]
    if torch.device(device).type != "cuda" or not converted:
        return None
    up = max(sum(_aligned(f.tensors[key].nbytes) for key in info.layers[d.layer].keys.values()) for d in converted)
    down = max(sum(_aligned(dtype.itemsize * math.prod(dims))
                   for dtype, dims in weights.storage_specs(d.target_format, d.shape).values()) for d in converted)
    try:
        return HostStaging(up if isinstance(f, SafetensorsFile) else 0, down)
    except RuntimeError as e:  # page-locked memory refused (e.g. a memlock limit): plain copies still work
        log.warning("LTX-2 Quant: no page-locked staging buffers (%s); loading with plain copies, slower", e)
        return None


def plan_conversion(f: SafetensorsFile, policy: Policy, device: torch.device | str = "cpu",
                    only_prefix: bool = False) -> ConversionPlan:
    """Per-layer decisions and the ordered steps that produce the converted tensors lazily.
    `only_prefix` keeps just the diffusion model of a single-file checkpoint (VAE, vocoder and
    text projections are left out)."""
    info = inspect_checkpoint(f)
    require_config(info)
    check_config_values(info)
    check_layers(f, info)
    # A layer kept as the file has it keeps the file's full-precision flag too.
    decisions = [replace(d, weight_only=True) if not d.changed and info.layers[d.layer].weight_only else d
                 for d in plan(policy, info.layer_table(), info.num_blocks)]
    layer_of_key: dict[str, tuple[LayerSource, LayerDecision]] = {}
    for decision in decisions:
        source = info.layers[decision.layer]
        for key in source.keys.values():
            layer_of_key[key] = (source, decision)
    staging = _host_staging(f, info, decisions, device)
    steps: list[Step] = []
    quant_layers: dict[str, dict] = {}
    for key in f.keys():
        if key.endswith(comfy_quant.CONF_SUFFIX) or (only_prefix and not key.startswith(info.prefix)):
            continue  # quantization configs are rewritten into the header
        entry = layer_of_key.get(key)
        if entry is None or entry[1].target_format not in weights.FORMATS:
            t = f.tensors[key]
            steps.append(Step([TensorSpec(key, t.dtype, t.shape)],
                              lambda key=key: [refuse_nonfinite(f.path, key, f.read(key))]))
            continue
        source, decision = entry
        if key != source.keys["weight"]:
            continue  # scales are written with their weight
        layer_key = info.prefix + source.layer
        quant_layers[layer_key] = comfy_quant.layer_conf(decision)
        steps.append(layer_step(layer_key, decision.target_format, source.shape, "input_scale" in source.keys,
                                lambda source=source, decision=decision: convert_layer(
                                    f, source, decision.target_format, device, staging)))
    return ConversionPlan(info, decisions, steps, quant_layers)


def _run_steps(steps: list[Step], progress: Callable[[int, int], None] | None) -> Iterator[tuple[str, torch.Tensor]]:
    for index, step in enumerate(steps):
        yield from zip((spec.name for spec in step.specs), step.make())
        if progress is not None:
            progress(index + 1, len(steps))


@dataclass
class QuantizeResult:
    path: str
    decisions: list[LayerDecision]
    bytes_written: int


def quantize_file(in_path: str, out_path: str, policy: Policy, overwrite: bool = False,
                  progress: Callable[[int, int], None] | None = None,
                  device: torch.device | str = "cpu") -> QuantizeResult:
    """Stream `in_path` to a ComfyUI-native quantized `out_path`, one layer in memory at a time.

    Header metadata (including `config`) is kept verbatim; `_quantization_metadata` is rewritten
    to cover every quantized layer. `progress(done, total)` is called per step and may raise to
    cancel; the partial output is then removed and an existing file is left as it was."""
    check_output(out_path, overwrite)  # before the input is read: the write would refuse it only at the end
    with SafetensorsFile(in_path) as f:
        conversion = plan_conversion(f, policy, device)
        written = write_quantized(out_path, conversion.steps, conversion.metadata(policy), overwrite=overwrite,
                                  progress=progress)
    return QuantizeResult(out_path, conversion.decisions, written)


def write_quantized(path: str, steps: list[Step], metadata: dict[str, str], *, overwrite: bool,
                    progress: Callable[[int, int], None] | None = None) -> int:
    """Write the tensors `steps` make, one step in memory at a time, as a safetensors file with header
    `metadata`, atomically (temp file, fsync, rename); returns the bytes written. `progress(done,
    total)` is called after each step and may raise to cancel: the temp file is then removed."""
    specs = [spec for step in steps for spec in step.specs]
    tensors = (tensor for _, tensor in _run_steps(steps, progress))
    return write_streaming(path, specs, tensors, metadata, overwrite=overwrite)


@dataclass
class LoadedCheckpoint:
    """A converted diffusion model in memory, keyed without the single-file prefix, with each
    quantized layer's ComfyUI config as a `<layer>.comfy_quant` uint8 JSON tensor (what ComfyUI's
    loaders and our ops read)."""

    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str]
    decisions: list[LayerDecision]
    info: CheckpointInfo


def load_converted(source: str | SafetensorsFile | MemoryTensors, policy: Policy,
                   progress: Callable[[int, int], None] | None = None,
                   device: torch.device | str = "cpu") -> LoadedCheckpoint:
    """Read and quantize a checkpoint (a path, an open file, or a state dict already in memory)
    tensor by tensor into a state dict: from a file, the bf16 model is never whole in memory."""
    if isinstance(source, str):
        with SafetensorsFile(source) as f:
            return load_converted(f, policy, progress, device)
    conversion = plan_conversion(source, policy, device, only_prefix=True)
    prefix = conversion.info.prefix
    state = {ltx2.strip_prefix(name, prefix): tensor for name, tensor in _run_steps(conversion.steps, progress)}
    for layer_key, conf in conversion.quant_layers.items():
        state[ltx2.strip_prefix(layer_key, prefix) + comfy_quant.CONF_SUFFIX] = comfy_quant.conf_tensor(conf)
    return LoadedCheckpoint(state, conversion.metadata(policy), conversion.decisions, conversion.info)

