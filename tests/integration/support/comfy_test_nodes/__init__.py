"""Test-only ComfyUI nodes: deterministic text conditioning and an AV latent for a tiny LTX-2.3 model
(a real run would use the Gemma text encoder and the audio VAE, far too big for CPU tests), a node
that writes the sampled latent to the output folder for the test to compare, and the pack's Compile
Blocks on Dynamo's eager backend with a node reporting Dynamo's graph count."""

import os
import sys

import torch
import torch._dynamo.utils
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


class LTX2QTestCompileEager:
    """The pack's Compile Blocks (nodes.patches.compile_blocks) with Dynamo's eager backend, which runs on
    the CPU: the blocks run through Dynamo's captured graphs and guards, without Inductor."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "compile"
    CATEGORY = "testing"

    def compile(self, model):
        patches = next(m for name, m in list(sys.modules.items())
                       if name.endswith(".nodes.patches") and hasattr(m, "compile_blocks"))
        return (patches.compile_blocks(model, "blocks", backend="eager")[0],)


class LTX2QTestDynamoStats:
    """After `samples` exist: the number of graphs Dynamo has captured in this server process."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    RETURN_TYPES = ()
    FUNCTION = "stats"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def stats(self, samples):
        return {"ui": {"text": [str(torch._dynamo.utils.counters["stats"]["unique_graphs"])]}}


NODE_CLASS_MAPPINGS = {"LTX2QTestInputs": LTX2QTestInputs, "LTX2QTestSaveLatent": LTX2QTestSaveLatent,
                       "LTX2QTestCompileEager": LTX2QTestCompileEager, "LTX2QTestDynamoStats": LTX2QTestDynamoStats}
