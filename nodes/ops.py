"""The op namespace ComfyUI builds the LTX-2 model with (`custom_operations`).

Its Linear holds a quantized layer as plain parameters, in the form its kernel path reads (packed
weight, scales, small per-row helpers), and calls quant.runtime directly in forward: no tensor
subclass, no per-op dispatch. Every other op is ComfyUI's `manual_cast`.

ComfyUI contracts kept:
- `state_dict()` holds only those resident tensors (VRAM accounting adds state-dict bytes);
- `convert_weight` / `set_weight` let ModelPatcher merge LoRAs (dequantize, patch, re-quantize with
  the layer's scales kept, so restoring `weight` alone undoes the patch);
- `weight_function` / `bias_function` (low-VRAM patches) apply to the dequantized weight;
- `comfy_cast_weights` / partial offload: tensors not on the input's device are moved per call;
- `run_every_op()` in forward, so Cancel stops a step.

One change to the model's own modules: `fuse_ffn_gelu` moves each FFN's GELU into its quantized
second Linear (same math; one pass with the FP8 activation quantization on W8A8 GPU paths).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

import comfy.model_management
import comfy.ops
from comfy.ldm.lightricks.model import FeedForward, GELU_approx

from ..quant import runtime
from ..quant.capability import capability as device_capability
from ..quant.comfy_quant import CONF_SUFFIX, conf_from_tensor
from ..quant.modes import layer_activation
from ..quant.weights import MXFP8, OUTLIER_SUFFIXES, QuantizedWeight, format_from_conf, requantize_like

log = logging.getLogger("ltx2_quant")


@dataclass(frozen=True)
class LayerQuant:
    format: str
    shape: tuple[int, int]
    path: str
    activation: str
    conf: dict  # the ComfyUI per-layer config it was loaded from


def make_ops(compute_device: torch.device, nvfp4_mode: str = "fast") -> type:
    """An op namespace bound to the device the model will run on (which decides each layer's path)."""
    capability = device_capability(compute_device)

    class LTX2QuantOps(comfy.ops.manual_cast):
        paths: dict[tuple[str, str], str] = {}  # (format, path) -> reason, for the load report

        class Linear(comfy.ops.manual_cast.Linear):
            quant: LayerQuant | None = None
            input_gelu = False  # set by fuse_ffn_gelu: this layer applies the FFN's tanh GELU to its input

            def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs):
                conf_tensor = state_dict.pop(prefix + CONF_SUFFIX[1:], None)
                if conf_tensor is None:
                    return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                         unexpected_keys, error_msgs)
                conf = conf_from_tensor(conf_tensor)
                shape = tuple(conf.get("shape") or (self.out_features, self.in_features))
                stored = {}
                for suffix in ("weight", "weight_scale", "weight_scale_2", "input_scale", *OUTLIER_SUFFIXES):
                    tensor = state_dict.pop(prefix + suffix, None)
                    if tensor is not None:
                        stored[suffix] = tensor
                qw = QuantizedWeight.from_tensors(format_from_conf(conf), shape, stored)
                asked = layer_activation(conf, nvfp4_mode)
                path, reason, activation = runtime.choose_path(qw.format, asked, capability, shape)
                LTX2QuantOps.paths[(qw.format, path)] = reason
                # Re-blocking MXFP8 is real work: do it on the GPU, keep the result where the weight was.
                prepare_on = compute_device if qw.format == MXFP8 else qw.data.device
                prepared = runtime.prepare(qw, path, prepare_on)
                for name, tensor in prepared.items():
                    setattr(self, name, torch.nn.Parameter(tensor.to(qw.data.device), requires_grad=False))
                self.quant = LayerQuant(qw.format, shape, path, activation, conf)
                bias = state_dict.pop(prefix + "bias", None)
                if bias is not None:
                    self.bias = torch.nn.Parameter(bias, requires_grad=False)

            def _tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
                """The path's tensors on `device`. The dict is cached while the module's parameters
                stay the same objects (ComfyUI's moves and LoRA patches replace them), which keeps
                per-call host work down: at 6k tokens a step runs 1,344 of these layers."""
                weight = self._parameters["weight"]
                cached = self.__dict__.get("_runtime_cache")
                if cached is not None and cached[0] is weight and cached[1] == device:
                    return cached[2]
                tensors = {name: (t if t.device == device else t.to(device, non_blocking=True))
                           for name, t in self._parameters.items() if name != "bias" and t is not None}
                if weight.device == device:  # only cache resident tensors, not per-call copies
                    self.__dict__["_runtime_cache"] = (weight, device, tensors)
                return tensors

            def _apply(self, fn, recurse=True):
                self.__dict__.pop("_runtime_cache", None)  # never keep tensors of the old device alive
                return super()._apply(fn, recurse)

            def stored_form(self, device: torch.device | None = None) -> QuantizedWeight:
                q = self.quant
                tensors = self._tensors(device or self.weight.device)
                return runtime.stored_form(q.path, tensors, q.format, q.shape)

            def forward(self, input, *args, **kwargs):
                if self.quant is None:
                    return super().forward(input, *args, **kwargs)
                comfy.ops.run_every_op()
                bias = self.bias
                if bias is not None and bias.device != input.device:
                    bias = bias.to(input.device, non_blocking=True)
                if self.weight_function or self.bias_function:  # patches applied per call
                    if self.input_gelu:
                        input = runtime.ffn_gelu(input)
                    weight = self.stored_form(input.device).dequantize(input.dtype)
                    for f in self.weight_function:
                        weight = f(weight)
                    for f in self.bias_function:
                        bias = f(bias)
                    return torch.nn.functional.linear(input, weight, None if bias is None else bias.to(input.dtype))
                q = self.quant
                return runtime.run(input, q.path, self._tensors(input.device), q.shape, bias, q.format, q.activation,
                                   input_gelu=self.input_gelu)

            def convert_weight(self, weight, inplace=False, **kwargs):
                """`weight` is a cast copy of the packed data (uint8 codes or E4M3 values, exact in
                the float dtype ModelPatcher chose); return the dequantized weight in that dtype."""
                if self.quant is None:
                    return weight
                stored = self.stored_form(weight.device)
                stored.tensors["weight"] = weight.to(self.weight.dtype)
                return stored.dequantize(weight.dtype)

            def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
                if self.quant is None:
                    weight = weight.to(self.weight.dtype)
                else:
                    weight = requantize_like(self.stored_form(weight.device), weight, seed).data
                    weight = weight.to(self.weight.device)
                if return_weight:
                    return weight
                self.__dict__.pop("_runtime_cache", None)
                self.weight = torch.nn.Parameter(weight, requires_grad=False)

    return LTX2QuantOps


class FeedForwardGELUMoved(FeedForward):
    """An LTX FeedForward whose tanh GELU fuse_ffn_gelu moved into its quantized second Linear: the
    first Linear's projection goes straight into it (Dropout is 0 and off at inference). Its own
    forward rather than ComfyUI's, whose body differs between versions: newer ones call
    `comfy.ops.linear_input_act(net[2], proj(x), "gelu_tanh")`, which applies the GELU itself and would
    apply it twice here. A class, not a patched method, so copies and object patches of `net.0.proj`
    and `net.2` are looked up per call."""

    def forward(self, x):
        return self.net[2](self.net[0].proj(x))


def fuse_ffn_gelu(model: torch.nn.Module) -> int:
    """Move each LTX FeedForward's tanh GELU (ComfyUI's `GELU_approx`: gelu(proj(x))) from the first
    Linear's output into the second Linear when that one is quantized. On a W8A8 GPU path its
    activation quantization then applies the GELU in the same pass (runtime.run's input_gelu) instead
    of a GELU kernel and a quantization kernel that reads the result again; elsewhere the Linear
    applies F.gelu first, the model's own math. Returns how many FeedForwards changed."""
    moved = 0
    for module in model.modules():
        if type(module) is not FeedForward:  # not yet moved
            continue
        first, second = module.net[0], module.net[2]
        quant = getattr(second, "quant", None)
        if type(first) is not GELU_approx or quant is None:
            continue
        module.__class__ = FeedForwardGELUMoved  # same submodules and state dict
        second.input_gelu = True
        moved += 1
    return moved


def quantized_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The quantized Linears of a diffusion model built with these ops, by module name."""
    return {name: m for name, m in model.named_modules() if getattr(m, "quant", None) is not None}


def describe_paths(ops: type) -> str:
    lines = [f"{fmt}: {path} ({reason})" for (fmt, path), reason in sorted(ops.paths.items())]
    for line in lines:
        log.info("LTX-2 Quant kernel path: %s", line)
    return "\n".join(lines)


def compute_device() -> torch.device:
    return comfy.model_management.get_torch_device()
