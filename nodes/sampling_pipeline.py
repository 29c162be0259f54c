"""The distilled two-stage LTX-2 flow in ComfyUI, as plain functions behind the sampler and upscale
nodes: stage 1 at half width and height, the latent spatial upsampler (under ComfyUI's model
management), re-noise with the first stage-2 sigma from the same seeded generator, stage 2 at full size.
Sampling itself is ComfyUI's (`comfy.samplers` guiders and samplers)."""

from __future__ import annotations

import copy
import logging
import weakref

import torch
import torch.nn.utils.parametrize

import comfy.model_management
import comfy.model_patcher
import comfy.nested_tensor
import comfy.samplers
import comfy.utils
import latent_preview

from ..quant import sampling
from ..quant.formats import dequantize_fp8, fp8_scale, quantize_fp8

log = logging.getLogger("ltx2_quant")

LTX_MODELS = ("LTXAVModel", "LTXVModel")
# Sampler choices: (stage 1 sampler, stage 2 sampler). The cfg_pp pair is what ComfyUI's LTX-2.3 templates use.
SAMPLER_CHOICES = {
    "euler": ("euler", "euler"),
    "gradient_estimation": ("gradient_estimation", "gradient_estimation"),
    "euler_ancestral_cfg_pp / euler_cfg_pp": ("euler_ancestral_cfg_pp", "euler_cfg_pp"),
}
# One patcher per upsampler module, so ComfyUI's model management can keep it loaded or evict it.
_UPSAMPLER_PATCHERS: "weakref.WeakKeyDictionary[torch.nn.Module, comfy.model_patcher.ModelPatcher]" = \
    weakref.WeakKeyDictionary()


def split_av(samples) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(video, audio) of an LTX-2 audio-video latent; audio is None for a video-only latent."""
    if getattr(samples, "is_nested", False):
        video, audio = samples.unbind()
        return video, audio
    return samples, None


def join_av(video: torch.Tensor, audio: torch.Tensor | None):
    return video if audio is None else comfy.nested_tensor.NestedTensor((video, audio))


def check_ltx_model(patcher, role: str = "model") -> None:
    name = type(patcher.model.diffusion_model).__name__
    if name not in LTX_MODELS:
        raise ValueError(f"The {role} is a {name}, not an LTX-2 model ({' or '.join(LTX_MODELS)}); "
                         f"load an LTX-2 / LTX-2.3 / LTX-2.5 checkpoint.")


def check_two_stage_latent(latent: dict) -> None:
    """Validate the full-size latent of the two-stage flow before any compute."""
    sampling.check_two_stage_latent_shape(tuple(split_av(latent["samples"])[0].shape))
    if "noise_mask" in latent:
        raise ValueError("The latent has a noise mask (image conditioning): connect the image to this sampler's "
                         "'image' input instead, so each stage encodes it at its own resolution.")


UPSAMPLER_WEIGHTS = ("as loaded", "fp8")
_FP8_UPSAMPLERS: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def upsampler_patcher(upscale_model) -> comfy.model_patcher.ModelPatcher:
    """The ModelPatcher that loads the upsampler. Newer ComfyUI's LatentUpscaleModelLoader returns one
    (used as it is, so core's nodes and ours share its loaded state); older ones return the bare module,
    which gets one of ours, kept per module."""
    if isinstance(upscale_model, comfy.model_patcher.ModelPatcher):
        return upscale_model
    patcher = _UPSAMPLER_PATCHERS.get(upscale_model)
    if patcher is None:
        patcher = comfy.model_patcher.ModelPatcher(upscale_model, load_device=comfy.model_management.get_torch_device(),
                                                   offload_device=comfy.model_management.unet_offload_device())
        _UPSAMPLER_PATCHERS[upscale_model] = patcher
    return patcher


def prepare_upsampler(upscale_model, weights: str):
    """The upsampler as loaded (a ModelPatcher or the bare module, as the loader gave it), or its
    FP8-stored copy (a module, made once per loaded upsampler)."""
    if weights not in UPSAMPLER_WEIGHTS:
        raise ValueError(f"Unknown upsampler weights {weights!r}; choose one of {UPSAMPLER_WEIGHTS}")
    if weights == "as loaded":
        return upscale_model
    model = upsampler_patcher(upscale_model).model
    if model not in _FP8_UPSAMPLERS:
        _FP8_UPSAMPLERS[model] = quantize_upsampler(model)
    return _FP8_UPSAMPLERS[model]


def quantize_upsampler(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the upsampler whose conv weights are stored as FP8 E4M3 with per-output-channel scales
    and dequantized on each call (about half the bf16 memory; activations stay in the model dtype)."""
    model = copy.deepcopy(model)
    model.ltx2_quant_compute_dtype = next(model.parameters()).dtype
    for module in list(model.modules()):
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
            torch.nn.utils.parametrize.register_parametrization(module, "weight", FP8Weight(module.weight),
                                                                unsafe=True)
    return model


class FP8Weight(torch.nn.Module):
    """Parametrization storing a conv weight as (FP8 rows = output channels, fp32 row scales); forward
    dequantizes it to the dtype it had."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.shape = tuple(weight.shape)
        self.dtype = weight.dtype

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = weight.detach().float().reshape(self.shape[0], -1)
        scale = fp8_scale(rows, per_channel=True)
        return quantize_fp8(rows, scale), scale

    def forward(self, data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return dequantize_fp8(data, scale, self.dtype).reshape(self.shape)


def upsample_video(upscale_model, vae, video: torch.Tensor) -> torch.Tensor:
    """Spatially upsample a normalized video latent: VAE un-normalize -> upsampler -> re-normalize.
    The upsampler is loaded through ComfyUI's model management (it evicts other models as needed)."""
    statistics = getattr(getattr(vae, "first_stage_model", None), "per_channel_statistics", None)
    if statistics is None:
        raise ValueError("The VAE has no per-channel latent statistics: connect the LTX-2 video VAE.")
    patcher = upsampler_patcher(upscale_model)
    model = patcher.model
    # The upsampler's activations: its mid channels (1024 in the release) at the x2 size (4x the cells),
    # fp32, about four such buffers live at once.
    mid = getattr(model, "mid_channels", 1024)
    activations = video.shape[0] * video.shape[2] * video.shape[3] * video.shape[4] * 4 * mid * 4 * 4
    comfy.model_management.load_models_gpu([patcher], memory_required=activations)
    device = patcher.load_device
    dtype = getattr(model, "ltx2_quant_compute_dtype", None) or next(model.parameters()).dtype
    with torch.no_grad():
        x = statistics.un_normalize(video.to(device=device, dtype=dtype))
        x = statistics.normalize(model(x))
    return x.to(device=comfy.model_management.intermediate_device(), dtype=video.dtype)


def condition_on_image(vae, image: torch.Tensor, video: torch.Tensor, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Core's LTXVImgToVideoInplace at this latent's size: the encoded image in the first latent frame(s)
    and the matching noise mask."""
    from comfy_extras.nodes_lt import LTXVImgToVideoInplace  # core's node: one way to encode the guide frame
    out = LTXVImgToVideoInplace.execute(vae, image, {"samples": video}, strength).result[0]
    return out["samples"], out["noise_mask"]


def make_sampler(name: str, ge_gamma: float):
    if name == "gradient_estimation":
        return comfy.samplers.ksampler(name, {"ge_gamma": ge_gamma})
    return comfy.samplers.sampler_object(name)


class TwoStageProgress:
    """One progress bar over both stages (plus the upsample), with latent previews; Cancel is checked
    at each step."""

    def __init__(self, patcher, total: int):
        self.previewer = latent_preview.get_previewer(patcher.load_device, patcher.model.latent_format)
        self.bar = comfy.utils.ProgressBar(total)
        self.total = total
        self.done = 0

    def step(self, count: int = 1, x0: torch.Tensor | None = None) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.done += count
        preview = self.previewer.decode_latent_to_preview_image("JPEG", x0) if self.previewer and x0 is not None else None
        self.bar.update_absolute(self.done, self.total, preview)

    def callback(self):
        return lambda step, x0, x, total_steps: self.step(1, x0)


def run_stage(patcher, positive, negative, cfg: float, sampler, sigmas: torch.Tensor, samples, noise, noise_mask,
              seed: int, progress: TwoStageProgress):
    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    out = guider.sample(noise, samples, sampler, sigmas, denoise_mask=noise_mask, callback=progress.callback(),
                        disable_pbar=True, seed=seed)
    return out.to(comfy.model_management.intermediate_device())


def two_stage_sample(model, positive, negative, latent: dict, upscale_model, vae, *, seed: int,
                     sigmas_stage1: torch.Tensor, sigmas_stage2: torch.Tensor, sampler_choice: str,
                     ge_gamma: float = 2.0, cfg: float = 1.0, model_stage2=None, image: torch.Tensor | None = None,
                     image_strength: float = 1.0, upscale_weights: str = "as loaded") -> tuple[dict, dict]:
    """Stage 1 at half width and height, x2 latent upsample, re-noise with the first stage-2 sigma (the
    sampler's own noise scaling: x = noise*s + x*(1-s)), stage 2 at full size. Noise for both stages
    comes from one generator seeded once; stage 1's equals what RandomNoise(seed) would give.
    Returns (full-size latent, stage-1 latent)."""
    model_stage2 = model_stage2 or model
    check_ltx_model(model)
    check_ltx_model(model_stage2, "stage-2 model")
    check_two_stage_latent(latent)
    sampling.check_sigmas(sigmas_stage1.tolist(), "Stage-1")
    sampling.check_sigmas(sigmas_stage2.tolist(), "Stage-2")
    if sampler_choice not in SAMPLER_CHOICES:
        raise ValueError(f"Unknown sampler {sampler_choice!r}; choose one of {list(SAMPLER_CHOICES)}")
    upscale_model = prepare_upsampler(upscale_model, upscale_weights)
    negative = positive if negative is None else negative  # cfg 1 never evaluates it
    sampler1, sampler2 = (make_sampler(name, ge_gamma) for name in SAMPLER_CHOICES[sampler_choice])

    video, audio = split_av(latent["samples"])
    generator = torch.Generator().manual_seed(seed)
    progress = TwoStageProgress(model, (len(sigmas_stage1) - 1) + 1 + (len(sigmas_stage2) - 1))

    def stage(patcher, sampler, sigmas, video, audio, stage_seed):
        """Sample one stage: noise for video then audio from the shared generator, the image (if any)
        encoded into the first latent frame(s) at this stage's size."""
        mask = None
        if image is not None:
            video, mask = condition_on_image(vae, image, video, image_strength)
        randn = lambda t: torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t.dtype)  # noqa: E731
        noise = join_av(randn(video), None if audio is None else randn(audio))
        if mask is not None:
            mask = join_av(mask, None if audio is None else torch.ones_like(audio))
        return run_stage(patcher, positive, negative, cfg, sampler, sigmas, join_av(video, audio), noise, mask,
                         stage_seed, progress)

    stage1_video = torch.nn.functional.avg_pool3d(video.float(), (1, 2, 2)).to(video.dtype)
    samples = stage(model, sampler1, sigmas_stage1, stage1_video, audio, seed)
    stage1 = {"samples": samples}
    stage1_video, audio = split_av(samples)
    video = upsample_video(upscale_model, vae, stage1_video)
    progress.step()
    samples = stage(model_stage2, sampler2, sigmas_stage2, video, audio, seed + 1)
    out = {key: value for key, value in latent.items() if key != "noise_mask"}
    out["samples"] = samples
    return out, stage1
