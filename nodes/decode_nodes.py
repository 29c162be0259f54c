"""LTX-2 Video Decode (ComfyUI V3): decode whole or tiled, whichever the free memory allows (nodes/decode.py)."""

from __future__ import annotations

from comfy_api.latest import io, ui

from . import decode
from .model_nodes import CATEGORY


class LTX2QuantVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LTX2QuantVAEDecode",
            display_name="LTX-2 Video Decode",
            category=CATEGORY,
            description=("Decodes a video or audio-video latent with the video VAE: whole when ComfyUI's memory "
                         "estimate fits the free memory, else in the largest tiles and frame chunks that fit "
                         "(core's tiled decode). Shows what it chose."),
            inputs=[io.Latent.Input("samples"), io.Vae.Input("vae", tooltip="The LTX-2 video VAE")],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples, vae) -> io.NodeOutput:
        images, text = decode.decode_video(vae, samples)
        return io.NodeOutput(images, ui=ui.PreviewText(text))
