"""LTX-2 checkpoints quantized tensor by tensor: a layer read (through page-locked staging buffers when a
GPU does the math), its values checked, converted to a policy's format, and the whole file planned as
steps that either stream into a ComfyUI-native file (write_quantized: the CLI and the Save node) or
into a state dict the nodes build a model from (load_converted). What a file holds and whether it is
a whole LTX-2 transformer is checkpoint.py's to say."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch

from . import comfy_quant, ltx2, weights
from .calibration import CalibrationError, require_channel_amax
from .checkpoint import (CheckpointInfo, LayerSource, check_config_values, check_layers, inspect_checkpoint,
                         require_config)
from .formats import E2M1_MAX, FP8_MAX, INT8_MAX, round_up
from .outliers import Outliers
from .policies import LayerDecision, Policy, plan
from .safetensors_io import CheckpointError, MemoryTensors, SafetensorsFile, TensorSpec, check_output, write_streaming

log = logging.getLogger("ltx2_quant")

PACK_METADATA_KEY = "ltx2_quant"


PLAIN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# FP8 codes that are NaN or Inf (no isfinite kernel for these dtypes): (mask, value) of the bits.
NONFINITE_FP8_BITS = {torch.float8_e4m3fn: (0x7F, 0x7F), torch.float8_e5m2: (0x7C, 0x7C),
                      torch.float8_e8m0fnu: (0xFF, 0xFF)}


# ComfyUI computes LTX-2 in bfloat16 (or float32, of the same range): a finite value beyond this in a
# wider dtype (an F64 1e300, an F32 3.4e38) becomes Inf there, and the video NaN.
COMPUTE_DTYPE_MAX = torch.finfo(torch.bfloat16).max


FLOAT32 = torch.finfo(torch.float32)


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


@dataclass(frozen=True)
class LayerOutliers:
    """What one layer's conversion does about outliers: the decision's handling, the layer's calibrated
    per-channel amax (smoothing) and, for a file whose header is written first, the branch's rank."""

    handling: Outliers
    channel_amax: torch.Tensor | None = None
    rank: int | None = None  # None: chosen as the layer is quantized (loading)


NO_OUTLIERS = LayerOutliers(Outliers())


def _full_weight(f: SafetensorsFile, source: LayerSource, stored: weights.QuantizedWeight | torch.Tensor,
                 device: torch.device | str) -> torch.Tensor:
    """The layer's weight in a dtype reductions run in, on `device`, refused by name if not finite."""
    if isinstance(stored, weights.QuantizedWeight):
        full = stored.to(device).dequantize(torch.float32)
    else:
        full = stored.to(device)
        if full.dtype == torch.float64:  # checked before float32 turns a finite 1e300 into Inf
            refuse_nonfinite(f.path, source.keys["weight"], full, source.layer)
        if full.dtype not in PLAIN_DTYPES:  # e.g. an fp8_e5m2 cast: no reductions in that dtype
            full = full.float()
    return refuse_nonfinite(f.path, source.keys["weight"], full, source.layer)


def _quantize_on(f: SafetensorsFile, source: LayerSource, stored: weights.QuantizedWeight | torch.Tensor,
                 target: str, device: torch.device | str, staging: HostStaging | None = None,
                 outliers: LayerOutliers = NO_OUTLIERS) -> weights.QuantizedWeight:
    full = _full_weight(f, source, stored, device)
    out = weights.quantize_weight(full, target, outliers.handling, outliers.channel_amax, outliers.rank)
    return staging.download(out) if staging is not None and full.is_cuda else out.to("cpu")


def convert_layer(f: SafetensorsFile, source: LayerSource, target: str,
                  device: torch.device | str = "cpu", staging: HostStaging | None = None,
                  outliers: LayerOutliers = NO_OUTLIERS) -> weights.QuantizedWeight:
    """Quantize (or re-quantize) one layer to `target` with `outliers`' transforms, refusing NaN/Inf
    weights or scales by name.
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
        out = _quantize_on(f, source, stored, target, device, staging, outliers)
    except torch.OutOfMemoryError:
        if torch.device(device).type == "cpu":
            raise
        out = None
    if out is None:
        # Past the except block the failed attempt's frames, and the GPU memory they held, are gone.
        log.warning("LTX-2 Quant: out of GPU memory quantizing %s; quantizing it on the CPU instead", source.layer)
        torch.cuda.empty_cache()
        out = _quantize_on(f, source, stored, target, "cpu", outliers=outliers)
    # A static activation scale travels with its layer, unless the layer is now smoothed: it bounds x,
    # not x * pre_quant_scale (a calibration file gives such a layer its own, model_io.apply_calibration).
    if "input_scale" in source.keys and out.pre_quant_scale is None:
        key = source.keys["input_scale"]
        scale = _check_input_scale(f.path, key, source.layer, refuse_nonfinite(f.path, key, f.read(key), source.layer))
        out.tensors["input_scale"] = scale.float().reshape(())
    return out


@dataclass
class Step:
    """Writes one plain tensor, or all tensors of one quantized layer, in file order."""

    specs: list[TensorSpec]
    make: Callable[[], list[torch.Tensor]]
    # Loading only: the tensors by name, where a low-rank branch's rank is known only once made.
    make_named: Callable[[], dict[str, torch.Tensor]] | None = None

    def named(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self.make_named is not None:
            yield from self.make_named().items()
        else:
            yield from zip((spec.name for spec in self.specs), self.make())


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
               make_weight: Callable[[], weights.QuantizedWeight], smoothed: bool = False,
               rank: int | None = 0) -> Step:
    """The step that writes one quantized layer's tensors in file order; `make_weight()` gives the
    layer in `fmt` when the write reaches it, with a pre_quant_scale if `smoothed` and a low-rank
    branch of `rank` (None: of the rank its quantization chooses; such a step only loads, a file's
    header needs every shape ahead)."""
    planned = weights.storage_specs(fmt, shape)
    if has_input_scale:
        planned["input_scale"] = (torch.float32, ())
    planned.update(weights.outlier_specs(shape, smoothed, rank or 0))
    specs = [TensorSpec(f"{layer_key}.{suffix}", dtype, dims) for suffix, (dtype, dims) in planned.items()]

    def make() -> list[torch.Tensor]:
        if rank is None:
            raise RuntimeError(f"{layer_key}: the rank of its low-rank branch was not planned; it cannot be written")
        qw = make_weight()
        return [qw.tensors[suffix] for suffix in planned]

    def make_named() -> dict[str, torch.Tensor]:
        qw = make_weight()
        return {f"{layer_key}.{suffix}": qw.tensors[suffix] for suffix in
                (*planned, *(s for s in weights.OUTLIER_SUFFIXES if s in qw.tensors and s not in planned))}
    return Step(specs, make, make_named if rank is None else None)


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


def smoothing_amax(decisions: list[LayerDecision], channel_amax: dict[str, torch.Tensor] | None,
                   calibration: str | None) -> tuple[list[LayerDecision], dict[str, torch.Tensor]]:
    """The decisions with smoothing off for layers the calibration file has no per-channel amax for (a
    logged count: a file calibrated on another scope may miss a few), and each smoothed layer's amax.
    Raises before anything is computed when smoothing is asked without any per-channel amax, naming the
    calibration file, or when a layer's amax does not fit its width."""
    asked = [d for d in decisions if d.outliers.smooth_alpha]
    if not asked:
        return decisions, {}
    require_channel_amax(channel_amax, calibration)
    found, missing = {}, []
    for d in asked:
        values = channel_amax.get(d.layer)
        if values is None:
            missing.append(d.layer)
        elif values.numel() != d.shape[1]:
            raise CalibrationError(f"{calibration}: the per-channel amax of layer {d.layer!r} has {values.numel()} "
                                   f"values, the layer takes {d.shape[1]} inputs; the file belongs to another model")
        else:
            found[d.layer] = values
    if missing:
        log.warning("LTX-2 Quant: %d of %d layers to smooth have no per-channel amax in %s (first: %s); they are "
                    "quantized without smoothing", len(missing), len(asked), calibration, missing[0])
        unsmoothed = set(missing)
        decisions = [replace(d, outliers=replace(d.outliers, smooth_alpha=0.0)) if d.layer in unsmoothed else d
                     for d in decisions]
    return decisions, found


def _branch_ranks(f: SafetensorsFile | MemoryTensors, info: CheckpointInfo, decisions: list[LayerDecision],
                  channels: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, int]:
    """Each low-rank layer's branch rank, for a header written before the layers are quantized: a pass
    that reads each such layer and takes its singular values (the quantization pass repeats the read)."""
    ranks = {}
    for d in decisions:
        if d.outliers.low_rank_bytes:
            source = info.layers[d.layer]
            full = _full_weight(f, source, read_layer(f, source), device)
            ranks[d.layer] = weights.branch_rank(full, d.target_format, d.outliers, channels.get(d.layer))
    return ranks


def plan_conversion(f: SafetensorsFile, policy: Policy, device: torch.device | str = "cpu",
                    only_prefix: bool = False, channel_amax: dict[str, torch.Tensor] | None = None,
                    calibration: str | None = None, header_first: bool = False,
                    stock_loadable: bool = False) -> ConversionPlan:
    """Per-layer decisions and the ordered steps that produce the converted tensors lazily.
    `only_prefix` keeps just the diffusion model of a single-file checkpoint (VAE, vocoder and
    text projections are left out). Smoothing takes each layer's amax from `channel_amax`, read from
    the file `calibration` (see smoothing_amax); `header_first` plans every low-rank branch's rank
    ahead, for a file writer; `stock_loadable` refuses what stock ComfyUI would drop (check_stock_loadable)."""
    info = inspect_checkpoint(f)
    require_config(info)
    check_config_values(info)
    check_layers(f, info)
    # A layer kept as the file has it keeps the file's full-precision flag too.
    decisions = [replace(d, weight_only=True) if not d.changed and info.layers[d.layer].weight_only else d
                 for d in plan(policy, info.layer_table(), info.num_blocks)]
    decisions, channels = smoothing_amax(decisions, channel_amax, calibration)
    if stock_loadable:
        check_stock_loadable(decisions)
    ranks = _branch_ranks(f, info, decisions, channels, device) if header_first else {}
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
        outliers = LayerOutliers(decision.outliers, channels.get(decision.layer),
                                 ranks.get(decision.layer, None if decision.outliers.low_rank_bytes else 0))
        if decision.changed:
            has_input_scale = "input_scale" in source.keys and outliers.channel_amax is None
            smoothed, rank = outliers.channel_amax is not None, outliers.rank
        else:  # kept as the file has it, with the transforms it has
            has_input_scale = "input_scale" in source.keys
            smoothed = "pre_quant_scale" in source.keys
            rank = f.tensors[source.keys["low_rank_down"]].shape[0] if "low_rank_down" in source.keys else 0
        steps.append(layer_step(layer_key, decision.target_format, source.shape, has_input_scale,
                                lambda source=source, decision=decision, outliers=outliers: convert_layer(
                                    f, source, decision.target_format, device, staging, outliers),
                                smoothed, rank))
    return ConversionPlan(info, decisions, steps, quant_layers)


def _run_steps(steps: list[Step], progress: Callable[[int, int], None] | None) -> Iterator[tuple[str, torch.Tensor]]:
    for index, step in enumerate(steps):
        yield from step.named()
        if progress is not None:
            progress(index + 1, len(steps))


@dataclass
class QuantizeResult:
    path: str
    decisions: list[LayerDecision]
    bytes_written: int


def quantize_file(in_path: str, out_path: str, policy: Policy, overwrite: bool = False,
                  progress: Callable[[int, int], None] | None = None,
                  device: torch.device | str = "cpu", channel_amax: dict[str, torch.Tensor] | None = None,
                  calibration: str | None = None, stock_loadable: bool = False) -> QuantizeResult:
    """Stream `in_path` to a ComfyUI-native quantized `out_path`, one layer in memory at a time.

    Header metadata (including `config`) is kept verbatim; `_quantization_metadata` is rewritten
    to cover every quantized layer. `progress(done, total)` is called per step and may raise to
    cancel; the partial output is then removed and an existing file is left as it was. Smoothing reads
    `channel_amax` from the file `calibration`; `stock_loadable` refuses outlier transforms stock
    ComfyUI would drop (weights.STOCK_PRE_QUANT_SCALE) before anything is computed."""
    check_output(out_path, overwrite)  # before the input is read: the write would refuse it only at the end
    with SafetensorsFile(in_path) as f:
        conversion = plan_conversion(f, policy, device, channel_amax=channel_amax, calibration=calibration,
                                     header_first=True, stock_loadable=stock_loadable)
        written = write_quantized(out_path, conversion.steps, conversion.metadata(policy), overwrite=overwrite,
                                  progress=progress)
    return QuantizeResult(out_path, conversion.decisions, written)


def stock_refusal(layer: str, fmt: str, suffixes) -> str | None:
    """Why stock ComfyUI would compute a layer of `fmt` carrying these outlier tensors wrongly, or None."""
    if "low_rank_down" in suffixes:
        return (f"layer {layer!r} carries a low-rank branch (low_rank_down / low_rank_up), which stock ComfyUI "
                "drops (an unexpected key): it would compute without it")
    if "pre_quant_scale" in suffixes and fmt not in weights.STOCK_PRE_QUANT_SCALE:
        return (f"layer {layer!r} ({fmt}) is smoothed; stock ComfyUI applies pre_quant_scale to "
                f"{', '.join(weights.STOCK_PRE_QUANT_SCALE)} layers only and would drop it on this one")
    return None


def check_stock_loadable(decisions: list[LayerDecision]) -> None:
    """Refuse outlier handling a file for stock ComfyUI cannot carry, naming the first layer."""
    for d in decisions:
        suffixes = (("pre_quant_scale",) if d.outliers.smooth_alpha else ()) + (
            ("low_rank_down",) if d.outliers.low_rank_bytes else ())
        why = stock_refusal(d.layer, d.target_format, suffixes)
        if why:
            raise ValueError(f"{why}. Write the file for this pack (not ComfyUI-compatible), or turn that option "
                             "off (NVFP4 smoothing alone stays loadable by stock ComfyUI 0.33 and newer)")


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
                   device: torch.device | str = "cpu", channel_amax: dict[str, torch.Tensor] | None = None,
                   calibration: str | None = None) -> LoadedCheckpoint:
    """Read and quantize a checkpoint (a path, an open file, or a state dict already in memory)
    tensor by tensor into a state dict: from a file, the bf16 model is never whole in memory.
    Smoothing reads `channel_amax` from the file `calibration` (plan_conversion)."""
    if isinstance(source, str):
        with SafetensorsFile(source) as f:
            return load_converted(f, policy, progress, device, channel_amax, calibration)
    conversion = plan_conversion(source, policy, device, only_prefix=True, channel_amax=channel_amax,
                                 calibration=calibration)
    prefix = conversion.info.prefix
    state = {ltx2.strip_prefix(name, prefix): tensor for name, tensor in _run_steps(conversion.steps, progress)}
    for layer_key, conf in conversion.quant_layers.items():
        state[ltx2.strip_prefix(layer_key, prefix) + comfy_quant.CONF_SUFFIX] = comfy_quant.conf_tensor(conf)
    return LoadedCheckpoint(state, conversion.metadata(policy), conversion.decisions, conversion.info)
