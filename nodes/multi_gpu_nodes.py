"""The Multi-GPU node (ComfyUI V3); the work is multi_gpu.patch_multi_gpu."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..quant.sequence_parallel import MODES, ULYSSES
from .multi_gpu import patch_multi_gpu


class LTX2QuantMultiGPU(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LTX2QuantMultiGPU",
            display_name="LTX-2 Multi-GPU",
            category="LTX-2 Quant",
            description="Samples this model on several GPUs of this machine (sequence parallel: each GPU takes "
                        "a share of the video and audio tokens). Connect it last, after Compile Blocks and "
                        "Quant Attention; any sampler, the Two-Stage Sampler included, then uses the GPUs.",
            inputs=[
                io.Model.Input("model"),
                io.Int.Input("gpus", default=2, min=1, max=64,
                             tooltip="GPUs to use, ComfyUI's own first; refused if fewer are visible"),
                io.Combo.Input("mode", options=list(MODES), default=ULYSSES,
                               tooltip="ulysses: all-to-all over attention heads (heads must divide by the GPU "
                                       "count; LTX-2 has 32); ring: K/V passed round the GPUs (any count)"),
                io.Int.Input("timeout_s", default=900, min=30, max=86400, optional=True,
                             tooltip="The longest a step (and the first step's model transfer and compile) may "
                                     "take before the workers are stopped"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, gpus, mode, timeout_s=900) -> io.NodeOutput:
        patched, text = patch_multi_gpu(model, gpus, mode, float(timeout_s))
        return io.NodeOutput(patched, ui=ui.PreviewText(text))
