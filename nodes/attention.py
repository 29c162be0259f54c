"""Attention patch node (ComfyUI V3) and the plain function it shares with the loader: the chosen
implementation goes into a clone's transformer_options, so only that model runs it."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..quant import runtime
from ..quant.attention import AUTO, CHOICES, choose_attention, comfy_override

CATEGORY = "LTX-2 Quant"
KEEP = "comfyui default"  # the loader's choice that leaves attention alone
LOADER_CHOICES = [KEEP, *CHOICES]


def patch_attention(model, requested: str):
    """(a clone of `model` whose attention runs the implementation chosen for `requested`, report line).
    The choice is probed on the model's device in its compute dtype; ComfyUI's own attention still
    takes the calls the implementation cannot (masks, other dtypes or head sizes)."""
    device = model.load_device
    name, reason = choose_attention(runtime.capability(device), requested, device,
                                              model.model.get_dtype_inference())
    patched = model.clone()
    options = patched.model_options["transformer_options"]
    replaced = options.get("optimized_attention_override")
    options["optimized_attention_override"] = comfy_override(name)
    text = f"attention: {name} ({reason})"
    if replaced is not None:
        text += f"; replaces an earlier attention override ({getattr(replaced, 'attention', replaced)})"
    return patched, text


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
