"""The Compile Blocks node (ComfyUI V3); the work is patches.compile_blocks."""

from __future__ import annotations

from comfy_api.latest import io, ui

from .patches import COMPILE_MODES, compile_blocks


class LTX2QuantCompile(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LTX2QuantCompile",
            display_name="LTX-2 Compile Blocks",
            category="LTX-2 Quant",
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
