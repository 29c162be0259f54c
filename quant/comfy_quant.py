"""ComfyUI's per-layer quantization config: the one place it is read and written.

ComfyUI keeps one JSON object per quantized layer (`{"format": "float8_e4m3fn", ...}`), either in the
file header's `_quantization_metadata` (`{"format_version": "1.0", "layers": {layer: config}}`) or as
a `<layer>.comfy_quant` tensor of UTF-8 bytes, which is also how a state dict carries it into ComfyUI's
loaders and into our ops. Which format a config names is weights.format_from_conf's to say.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch

from . import weights
from .policies import LayerDecision
from .safetensors_io import CheckpointError, SafetensorsFile, parse_json

QUANT_METADATA_KEY = "_quantization_metadata"
CONF_SUFFIX = ".comfy_quant"
MAX_LAYER_CONF_BYTES = 64 * 1024  # a `.comfy_quant` config is under 200 bytes
# Config entries that name the format; the rest (shape, full_precision_matrix_mult, ...) describe the layer.
FORMAT_KEYS = ("format", "convrot", "convrot_groupsize")


def read_layer_confs(f: SafetensorsFile) -> dict[str, dict]:
    """Per-layer config of a file, by prefixed layer name, from `_quantization_metadata` and from
    `<layer>.comfy_quant` tensors (the tensor wins where both have a layer)."""
    confs: dict[str, dict] = {}
    raw = f.metadata.get(QUANT_METADATA_KEY)
    if raw is not None:
        try:
            confs.update(parse_json(raw)["layers"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{f.path}: corrupt {QUANT_METADATA_KEY} header metadata ({e})") from None
    for key in f.keys():
        if key.endswith(CONF_SUFFIX):
            if f.tensors[key].nbytes > MAX_LAYER_CONF_BYTES:
                raise CheckpointError(f"{f.path}: tensor {key!r} holds {f.tensors[key].nbytes:,} bytes, more than the "
                                      f"{MAX_LAYER_CONF_BYTES:,} a layer's quantization config takes")
            try:
                confs[key[: -len(CONF_SUFFIX)]] = parse_json(f.read(key).numpy().tobytes().decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise CheckpointError(f"{f.path}: tensor {key!r} is not the JSON ComfyUI expects ({e})") from None
    for layer, conf in confs.items():
        if not isinstance(conf, dict):
            raise CheckpointError(f"{f.path}: quantization config of layer {layer!r} must be a JSON object, "
                                  f"got {conf!r}")
    return confs


def conf_tensor(conf: dict) -> torch.Tensor:
    """A layer's config as the `<layer>.comfy_quant` uint8 tensor of a state dict."""
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def conf_from_tensor(tensor: torch.Tensor) -> dict:
    """The config a `<layer>.comfy_quant` tensor of a state dict holds (one this pack made, or ComfyUI
    passed on from a file read_layer_confs has checked)."""
    return json.loads(bytes(tensor.tolist()).decode("utf-8"))


def with_layer_confs(metadata: Mapping[str, str], layers: dict[str, dict]) -> dict[str, str]:
    """`metadata` with its `_quantization_metadata` replaced by one covering `layers` (none when empty)."""
    out = {k: v for k, v in metadata.items() if k != QUANT_METADATA_KEY}
    if layers:
        out[QUANT_METADATA_KEY] = json.dumps({"format_version": "1.0", "layers": layers})
    return out


def layer_conf(decision: LayerDecision) -> dict:
    """The config of a layer this pack quantizes. A weight-only layer asks stock ComfyUI for its
    dequantize path (`full_precision_matrix_mult`), as our ops read it too; `shape` lets readers
    recover the logical shape of padded formats."""
    conf: dict = {**weights.conf_for_format(decision.target_format), "shape": list(decision.shape)}
    if decision.weight_only:
        conf["full_precision_matrix_mult"] = True
    return conf


def conf_in_format(conf: dict, fmt: str) -> dict:
    """`conf` with its format entries saying `fmt` instead (a layer written in another format)."""
    return {**{k: v for k, v in conf.items() if k not in FORMAT_KEYS}, **weights.conf_for_format(fmt)}
