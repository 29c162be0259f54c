"""Calibration and quality measurement on ComfyUI models: the plain functions behind the Calibrate and
Quality Report nodes and of bench/bench_quality.py. The math and file formats are in quant/."""

from __future__ import annotations

import contextlib
import copy
import math

import torch
from PIL import Image, ImageDraw  # a ComfyUI requirement

import comfy.model_management
import comfy.sample
import comfy.samplers

from ..quant import runtime
from ..quant.calibration import AmaxRecorder, layer_input_scale
from ..quant.quality import LayerQuality, cosine_similarity, layer_quality
from ..quant.reference import relative_error
from ..quant.safetensors_io import atomic_file
from .ops import quantized_layers

# Input rows kept per layer from the reference run for the per-layer comparison (evenly spaced tokens).
SAMPLE_ROWS = 64


def linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every Linear of a diffusion model by name: ComfyUI's manual_cast Linears and ours alike."""
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def multiplied_input(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the Linear multiplies: its input, after the FFN GELU that ops.fuse_ffn_gelu moved into it."""
    return runtime.ffn_gelu(x) if getattr(module, "input_gelu", False) else x


@contextlib.contextmanager
def hooked_inputs(model: torch.nn.Module, observe):
    """Calls observe(layer name, input it multiplies) before every Linear's forward while the block runs."""
    handles = [m.register_forward_pre_hook(lambda module, args, name=name: observe(name, multiplied_input(module, args[0])))
               for name, m in linear_modules(model).items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _euler(record: list, replay: list | None):
    """A k-diffusion sampler function: Euler steps that append per step (x, denoised) to `record`;
    with `replay` (another run's record) the model is also evaluated at that run's x, so the
    velocity there compares models without the drift of their own trajectories."""
    @torch.no_grad()
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            denoised = model(x, sigmas[i] * s_in, **extra_args)
            step = {"x": x.float().cpu(), "denoised": denoised.float().cpu(), "sigma": float(sigmas[i])}
            if replay is not None:
                ref_x = replay[i]["x"].to(x.device, x.dtype)
                step["denoised_at_reference"] = model(ref_x, sigmas[i] * s_in, **extra_args).float().cpu()
            record.append(step)
            if callback is not None:
                callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x
    return sample


def sample(patcher, positive, negative, latent: dict, sigmas: torch.Tensor, cfg: float, seed: int,
           record: list | None = None, replay: list | None = None):
    """Euler sampling through ComfyUI's CFGGuider, as SamplerCustomAdvanced runs it. Returns the
    output latent (a NestedTensor for audio-video models)."""
    if len(sigmas) < 2:
        raise ValueError(f"need at least two sigmas (one step), got {len(sigmas)}")
    samples = comfy.sample.fix_empty_latent_channels(patcher, latent["samples"],
                                                     latent.get("downscale_ratio_spacial", None))
    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    noise = comfy.sample.prepare_noise(samples, seed)
    sampler = comfy.samplers.KSAMPLER(_euler([] if record is None else record, replay))
    out = guider.sample(noise, samples, sampler, sigmas.float().cpu(), denoise_mask=latent.get("noise_mask"),
                        disable_pbar=True, seed=seed)
    return out.to(comfy.model_management.intermediate_device())


def streams(latent) -> list[torch.Tensor]:
    """[video, audio] of an audio-video latent, [latent] otherwise."""
    return list(latent.unbind()) if getattr(latent, "is_nested", False) else [latent]


def calibrate(patcher, positive, negative, latent: dict, sigmas: torch.Tensor, cfg: float, seed: int
              ) -> AmaxRecorder:
    """Sample once while recording every Linear's input amax (per tensor and per input channel)."""
    recorder = AmaxRecorder()
    comfy.model_management.load_models_gpu([patcher])
    with hooked_inputs(patcher.model.diffusion_model, recorder.observe):
        sample(patcher, positive, negative, latent, sigmas, cfg, seed)
    return recorder


def with_static_scales(patcher, amax: dict[str, float], channel_amax: dict[str, torch.Tensor]):
    """A clone of a model quantized by this pack whose W8A8 (and NVFP4) layers use static activation
    scales from `amax` (a smoothed layer's from `channel_amax` times its pre_quant_scale: what it
    quantizes), and how many layers got one. The layers are swapped in as object patches that
    share the quantized weights, so the input MODEL stays as it was and no weight is copied."""
    new = patcher.clone()
    count = 0
    for name, module in quantized_layers(patcher.model.diffusion_model).items():
        q = module.quant
        smoothing = module._parameters.get("pre_quant_scale")  # on the GPU once loaded; the amax is on the CPU
        scale = layer_input_scale(q.conf, amax[name], channel_amax.get(name),
                                  None if smoothing is None else smoothing.cpu()) if name in amax else None
        if scale is None:
            continue
        layer = copy.copy(module)
        layer._parameters = dict(module._parameters)
        layer.__dict__.pop("_runtime_cache", None)
        scales = runtime.static_scale_tensors(q.path, q.format, module._parameters, scale)
        for key, tensor in scales.items():
            layer._parameters[key] = torch.nn.Parameter(tensor, requires_grad=False)
        new.add_object_patch(f"diffusion_model.{name}", layer)
        count += 1
    return new, count


def _weight_and_activation(module: torch.nn.Linear):
    """(weight as the layer computes with it: QuantizedWeight or a plain tensor, activation mode)."""
    if getattr(module, "quant", None) is not None:
        return module.stored_form(torch.device("cpu")), module.quant.activation
    return module.weight.detach().cpu(), "none"


def compare_models(reference, candidates: dict, positive, negative, latent: dict, sigmas: torch.Tensor,
                   cfg: float, seed: int, per_layer: bool = True) -> dict:
    """Run `reference` (the full-precision MODEL) and each candidate on the same inputs. Returns, per
    candidate: per-step velocity error at the reference trajectory's points, final-latent relative
    error and cosine per stream, and per-layer weight error and output SNR on input rows recorded
    from the reference run (its last step; skipped without `per_layer`, which saves copying the
    reference weights to the CPU)."""
    if quantized_layers(reference.model.diffusion_model):
        raise ValueError("the reference MODEL is quantized by LTX-2 Quant; connect the full-precision model")
    record: list = []
    rows: dict[str, torch.Tensor] = {}

    def keep_rows(name: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1])
        index = torch.linspace(0, flat.shape[0] - 1, min(SAMPLE_ROWS, flat.shape[0]), device=flat.device).long()
        rows[name] = flat[index].float().cpu()

    comfy.model_management.load_models_gpu([reference])
    with hooked_inputs(reference.model.diffusion_model, keep_rows) if per_layer else contextlib.nullcontext():
        ref_out = streams(sample(reference, positive, negative, latent, sigmas, cfg, seed, record=record))
    ref_layers = {name: (m.weight.detach().cpu(), None if m.bias is None else m.bias.detach().cpu())
                  for name, m in linear_modules(reference.model.diffusion_model).items() if name in rows}
    results = {}
    for label, patcher in candidates.items():
        steps: list = []
        comfy.model_management.load_models_gpu([patcher])
        out = streams(sample(patcher, positive, negative, latent, sigmas, cfg, seed, record=steps, replay=record))
        velocity = []
        for ref, own in zip(record, steps):
            ref_v = (ref["x"] - ref["denoised"]) / ref["sigma"]
            own_v = (ref["x"] - own["denoised_at_reference"]) / ref["sigma"]
            velocity.append(relative_error(own_v, ref_v))
        layers: list[LayerQuality] = []
        for name, module in linear_modules(patcher.model.diffusion_model).items():
            if getattr(module, "quant", None) is None or name not in rows or name not in ref_layers:
                continue
            weight, activation = _weight_and_activation(module)
            ref_weight, bias = ref_layers[name]
            layers.append(layer_quality(name, ref_weight, weight, bias, rows[name], activation))
        results[label] = {
            "velocity_error": velocity,
            "final_error": [relative_error(o, r) for o, r in zip(out, ref_out)],
            "final_cosine": [cosine_similarity(o, r) for o, r in zip(out, ref_out)],
            "layers": layers,
        }
    return {"sigmas": [float(s) for s in sigmas], "streams": ["video", "audio"][: len(ref_out)], "models": results}


def format_comparison(report: dict) -> str:
    names = report["streams"]
    lines = [f"{'model':<24}" + "".join(f"{'final err ' + n:>17}{'cos ' + n:>12}" for n in names)
             + f"{'mean v err':>12}{'max v err':>11}{'layers':>8}{'min SNR dB':>12}"]
    for label, r in report["models"].items():
        snr = min((layer.output_snr_db for layer in r["layers"]), default=math.nan)
        velocity = r["velocity_error"]
        lines.append(f"{label:<24}" + "".join(f"{e:>17.4f}{c:>12.5f}" for e, c in zip(r["final_error"], r["final_cosine"]))
                     + f"{sum(velocity) / len(velocity):>12.4f}{max(velocity):>11.4f}{len(r['layers']):>8}{snr:>12.2f}")
    lines.append("final err: relative L2 error of the final latent vs the reference; v err: per-step velocity error "
                 "at the reference trajectory's points; SNR: per-layer output on the reference's last-step inputs")
    return "\n".join(lines)


def plot_comparison(report: dict, width: int = 900, height: int = 420):
    """A PIL image with two panels: per-step velocity error per model, and
    each model's per-layer output SNR by layer order (the dips show which layers to keep in bf16)."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
    panels = [("velocity error per step", {k: r["velocity_error"] for k, r in report["models"].items()}),
              ("layer output SNR (dB), model order", {k: [layer.output_snr_db for layer in r["layers"]
                                                           if math.isfinite(layer.output_snr_db)]
                                                       for k, r in report["models"].items()})]
    panel_width = width // 2
    for p, (title, series) in enumerate(panels):
        left, top, right, bottom = p * panel_width + 50, 30, (p + 1) * panel_width - 15, height - 60
        draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
        draw.text((left, 8), title, fill=(0, 0, 0))
        values = [v for s in series.values() for v in s]
        if not values:
            continue
        low, high = min(0.0, min(values)), max(values)
        high = high if high > low else low + 1.0
        draw.text((p * panel_width + 5, top), f"{high:.3g}", fill=(0, 0, 0))
        draw.text((p * panel_width + 5, bottom - 10), f"{low:.3g}", fill=(0, 0, 0))
        for k, (label, s) in enumerate(series.items()):
            color = colors[k % len(colors)]
            n = max(len(s) - 1, 1)
            points = [(left + (right - left) * i / n, bottom - (bottom - top) * (v - low) / (high - low))
                      for i, v in enumerate(s)]
            if len(points) > 1:
                draw.line(points, fill=color, width=2)
            elif points:
                draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=color)
            draw.text((left + 5, bottom + 8 + 12 * (k % 4)), label, fill=color)
    return image


def image_tensor(image) -> torch.Tensor:
    """A PIL RGB image as a ComfyUI IMAGE: (1, H, W, 3) floats in [0, 1]."""
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(image.height, image.width, 3)
    return (pixels.float() / 255.0).unsqueeze(0)


def save_png(image, path: str, *, overwrite: bool) -> None:
    with atomic_file(path, overwrite=overwrite, suffix=".png") as out:
        image.save(out, "PNG")
