"""Test-only ComfyUI nodes: deterministic text conditioning and an AV latent for a tiny LTX-2.3 model
(a real run would use the Gemma text encoder and the audio VAE, far too big for CPU tests), and a
node that writes the sampled latent to the output folder for the test to compare."""

import os

import torch
from safetensors.torch import save_file

import comfy.nested_tensor
import folder_paths


class LTX2QTestInputs:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "seed": ("INT", {"default": 1}),
                             "frames": ("INT", {"default": 9}), "height": ("INT", {"default": 64}),
                             "width": ("INT", {"default": 96})},
                "optional": {"unprocessed": ("BOOLEAN", {"default": False})}}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, model, seed, frames, height, width, unprocessed=False):
        dm = model.model.diffusion_model
        width_ctx = dm.cross_attention_dim + dm.audio_cross_attention_dim
        g = torch.Generator().manual_seed(seed)
        # unprocessed: the text encoder's raw output, so the model's text connectors run on it.
        extra = {"unprocessed_ltxav_embeds": True} if unprocessed else {}
        positive = [[torch.randn(1, 16, width_ctx, generator=g), {"frame_rate": 24.0, **extra}]]
        negative = [[torch.randn(1, 16, width_ctx, generator=g), {"frame_rate": 24.0, **extra}]]
        video = torch.zeros(1, 128, (frames - 1) // 8 + 1, height // 32, width // 32)
        audio = torch.zeros(1, 8, 10, 16)
        return positive, negative, {"samples": comfy.nested_tensor.NestedTensor((video, audio))}


class LTX2QTestSaveLatent:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "name": ("STRING", {"default": "latent"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def save(self, samples, name):
        latent = samples["samples"]
        tensors = dict(zip(("video", "audio"), latent.unbind())) if latent.is_nested else {"video": latent}
        folder = os.path.join(folder_paths.get_output_directory(), "latents")
        os.makedirs(folder, exist_ok=True)
        save_file({k: v.float().contiguous() for k, v in tensors.items()}, os.path.join(folder, name + ".safetensors"))
        return {}


NODE_CLASS_MAPPINGS = {"LTX2QTestInputs": LTX2QTestInputs, "LTX2QTestSaveLatent": LTX2QTestSaveLatent}
