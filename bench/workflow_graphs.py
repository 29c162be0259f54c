"""The graphs bench_workflow.py runs, in ComfyUI's API format ({id: {class_type, inputs}}, ids in dependency
order): ComfyUI core's distilled two-stage LTX-2.3 template, and the pack's workflow at a policy."""

from __future__ import annotations

STAGE1_SIGMAS = "1.0, 0.99375, 0.9875, 0.98125, 0.975, 0.909375, 0.725, 0.421875, 0.0"
STAGE2_SIGMAS = "0.909375, 0.725, 0.421875, 0.0"
PROMPT = ("A red fox trots across a snowy forest clearing at dawn, breath steaming, soft golden light through the "
          "pines; the crunch of snow underfoot and distant birdsong.")
NEGATIVE = "blurry, low quality, still frame, watermark, text"
CORE_MODES = ("core bf16", "core fp8")
PACK_MODES = ("fp8-scaled-mm", "int8-convrot", "nvfp4")
MODES = (*CORE_MODES, *PACK_MODES)
# The pack's recommended patches per policy (README, "Fast on Hopper"): Compile Blocks (with CUDA graphs
# for nvfp4) and the 8-bit attention where the GPU has it.
COMPILE_MODE = {"nvfp4": "blocks, cuda graphs"}
ATTENTION = "auto-8bit"
# The templates' decode: 768-pixel tiles, whole clips in time.
DECODE = {"tile_size": 768, "overlap": 64, "temporal_size": 4096, "temporal_overlap": 4}
BENCH_AUDIO_LATENT = "LTX2QBenchAudioLatent"  # workflow_phases.BenchAudioLatent


class Graph(dict):
    def add(self, class_type: str, **inputs) -> str:
        node_id = str(len(self) + 1)
        self[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id


def out(node_id: str, slot: int = 0) -> list:
    return [node_id, slot]


def _text_encoder(g: Graph, files: dict, policy: str | None, tiny: bool) -> str:
    """ComfyUI's LTXAVTextEncoderLoader for core modes; the pack's loader at `policy` otherwise. ComfyUI's
    loader builds only the full-size Gemma 3 12B, so a tiny run uses the pack's at bf16 (the file as stored)."""
    if policy is None and not tiny:
        return g.add("LTXAVTextEncoderLoader", text_encoder=files["gemma"], ckpt_name=files["projection"],
                     device="default")
    return g.add("LTX2QuantTextEncoderLoader", text_encoder=files["gemma"], ckpt_name=files["projection"],
                 policy=policy or "bf16", device="default")


def _conditioning(g: Graph, clip: str) -> str:
    positive = g.add("CLIPTextEncode", clip=out(clip), text=PROMPT)
    negative = g.add("CLIPTextEncode", clip=out(clip), text=NEGATIVE)
    return g.add("LTXVConditioning", positive=out(positive), negative=out(negative), frame_rate=24.0)


def _audio_latent(g: Graph, audio_vae: list | None, frames: int) -> list:
    """ComfyUI's empty audio latent; without an audio VAE (the tiny set has none) the bench's own, of the
    shape the audio VAE gives (8 channels, 25 latents a second, 16 mel bins)."""
    if audio_vae is None:
        return out(g.add(BENCH_AUDIO_LATENT, frames=frames))
    return out(g.add("LTXVEmptyLatentAudio", frames_number=frames, frame_rate=24, batch_size=1, audio_vae=audio_vae))


def _decode(g: Graph, samples: list, vae: list, audio_vae: list | None, pack: bool = False) -> None:
    """The video decode (core's template: tiled at fixed sizes; the pack: sized to the free memory) and the
    audio one through the audio VAE (when there is one)."""
    split = g.add("LTXVSeparateAVLatent", av_latent=samples)
    if pack:
        g.add("LTX2QuantVAEDecode", samples=out(split, 0), vae=vae)
    else:
        g.add("VAEDecodeTiled", samples=out(split, 0), vae=vae, **DECODE)
    if audio_vae is not None:
        g.add("LTXVAudioVAEDecode", samples=out(split, 1), audio_vae=audio_vae)


def _image(g: Graph, width: int, height: int) -> list:
    return out(g.add("EmptyImage", width=width, height=height, batch_size=1, color=0x7F8FA0))


def pack_graph(mode: str, files: dict, width: int, height: int, frames: int, i2v: bool, tiny: bool) -> Graph:
    g = Graph()
    model = g.add("LTX2QuantLoader", ckpt_name=files["checkpoint"], policy=mode, nvfp4_mode="fast",
                  scope="policy default")
    clip = _text_encoder(g, files, mode, tiny)
    vae = out(g.add("LTX2QuantVAELoader", ckpt_name=files["checkpoint"]))
    audio_vae = out(g.add("LTXVAudioVAELoader", ckpt_name=files["checkpoint"])) if files["audio"] else None
    upsampler = g.add("LatentUpscaleModelLoader", model_name=files["upsampler"])
    attention = g.add("LTX2QuantAttention", model=out(model), attention=ATTENTION)
    compiled = g.add("LTX2QuantCompile", model=out(attention), mode=COMPILE_MODE.get(mode, "blocks"))
    conditioning = _conditioning(g, clip)
    video = g.add("EmptyLTXVLatentVideo", width=width, height=height, length=frames, batch_size=1)
    latent = g.add("LTXVConcatAVLatent", video_latent=out(video), audio_latent=_audio_latent(g, audio_vae, frames))
    sigmas1 = g.add("ManualSigmas", sigmas=STAGE1_SIGMAS)
    sigmas2 = g.add("ManualSigmas", sigmas=STAGE2_SIGMAS)
    image = {"image": _image(g, width, height)} if i2v else {}
    sampled = g.add("LTX2QuantTwoStageSampler", model=out(compiled), positive=out(conditioning, 0),
                    negative=out(conditioning, 1), latent=out(latent), upscale_model=out(upsampler), vae=vae,
                    noise_seed=42, sampler="euler_ancestral_cfg_pp / euler_cfg_pp", ge_gamma=2.0, cfg=1.0,
                    sigmas_stage1=out(sigmas1), sigmas_stage2=out(sigmas2), **image)
    _decode(g, out(sampled), vae, audio_vae, pack=True)
    return g


def core_graph(mode: str, files: dict, width: int, height: int, frames: int, i2v: bool, tiny: bool) -> Graph:
    """ComfyUI's template: stage 1 on the half-size latent, LTXVLatentUpsampler on its video, stage 2 from
    the stage-2 sigmas with stage 1's audio, LTXVImgToVideoInplace at each stage for image-to-video."""
    g = Graph()
    checkpoint = files["checkpoint_fp8" if mode == "core fp8" else "checkpoint"]
    loaded = g.add("CheckpointLoaderSimple", ckpt_name=checkpoint)
    model, vae = out(loaded, 0), out(loaded, 2)
    clip = _text_encoder(g, {**files, "gemma": files["gemma_fp8" if mode == "core fp8" else "gemma"]}, None, tiny)
    audio_vae = out(g.add("LTXVAudioVAELoader", ckpt_name=checkpoint)) if files["audio"] else None
    upsampler = g.add("LatentUpscaleModelLoader", model_name=files["upsampler"])
    conditioning = _conditioning(g, clip)
    image = _image(g, width, height) if i2v else None

    def stage(video: list, audio: list, sampler: str, sigmas: str, seed: int) -> str:
        if image is not None:
            video = out(g.add("LTXVImgToVideoInplace", vae=vae, image=image, latent=video, strength=1.0,
                              bypass=False))
        latent = g.add("LTXVConcatAVLatent", video_latent=video, audio_latent=audio)
        guider = g.add("CFGGuider", model=model, positive=out(conditioning, 0), negative=out(conditioning, 1),
                       cfg=1.0)
        return g.add("SamplerCustomAdvanced", noise=out(g.add("RandomNoise", noise_seed=seed)), guider=out(guider),
                     sampler=out(g.add("KSamplerSelect", sampler_name=sampler)),
                     sigmas=out(g.add("ManualSigmas", sigmas=sigmas)), latent_image=out(latent))

    half = g.add("EmptyLTXVLatentVideo", width=width // 2, height=height // 2, length=frames, batch_size=1)
    first = g.add("LTXVSeparateAVLatent", av_latent=out(stage(out(half), _audio_latent(g, audio_vae, frames),
                                                               "euler_ancestral_cfg_pp", STAGE1_SIGMAS, 42)))
    upsampled = g.add("LTXVLatentUpsampler", samples=out(first, 0), upscale_model=out(upsampler), vae=vae)
    second = stage(out(upsampled), out(first, 1), "euler_cfg_pp", STAGE2_SIGMAS, 43)
    _decode(g, out(second), vae, audio_vae)
    return g
