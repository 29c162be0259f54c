"""The Attention and Compile Blocks nodes (ComfyUI V3): model patches; the work is patches.patch_attention (which
the loader shares) and patches.compile_blocks."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..quant.attention import AUTO, CHOICES
from .patches import COMPILE_MODES, compile_blocks, patch_attention

CATEGORY = "LTX-2 Quant"
KEEP = "comfyui default"  # the loader's choice that leaves attention alone
LOADER_CHOICES = [KEEP, *CHOICES]


class LTX2QuantAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LTX2QuantAttention",
            display_name="LTX-2 Quant Attention",
            category=CATEGORY,
            description="Runs this model's attention with the fastest kernel the GPU has (auto), or the one "
                        "named; it is probed at load and falls back with a reason if it fails.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("attention", options=CHOICES, default=AUTO,
                               tooltip="auto: fastest 16-bit kernel; auto-8bit: also INT8/FP8 kernels (faster, "
                                       "lossy); or one implementation"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, attention) -> io.NodeOutput:
        patched, text = patch_attention(model, attention)
        return io.NodeOutput(patched, ui=ui.PreviewText(text))


class LTX2QuantCompile(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LTX2QuantCompile",
            display_name="LTX-2 Compile Blocks",
            category=CATEGORY,
            description="torch.compile each transformer block (fuses norms, modulation, gating and activation "
                        "quantization around the quantized linears). The first step of each new size compiles.",
            inputs=[io.Model.Input("model"),
                    io.Combo.Input("mode", options=[m for m in COMPILE_MODES if m != "off"], default="blocks")],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, mode) -> io.NodeOutput:
        compiled, text = compile_blocks(model, mode)
        return io.NodeOutput(compiled, ui=ui.PreviewText(text))
