"""LTX-2 Quant Text Encoder Loader (ComfyUI V3): the LTX-2 text encoder quantized at load. The work is in
nodes/text_encoder.py and quant/text_encoder.py."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io, ui

from ..quant.policies import POLICIES
from . import text_encoder as loading
from .model_nodes import CATEGORY

DEFAULT_POLICY = "fp8-scaled-mm"
POLICY_TOOLTIP = ("Gemma's Linears and the LTX projection in this format, its embedding table in FP8 per row; "
                  "norms and the vision tower as stored. bf16 keeps the file as it is (an fp8_scaled file stays FP8). "
                  "fp8-cast runs weight-only (any GPU); the others as for the transformer")
COMPARE_TOOLTIP = ("Also load the files as stored first, encode a fixed prompt with both and show the cosine of "
                   "the conditioning the LTX connectors receive (costs one more load of the text encoder)")
SAVE_TOOLTIP = ("If set, write the quantized Gemma into text_encoders under this name (never replacing a file): "
                "it then loads without re-quantizing")


class LTX2QuantTextEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LTX2QuantTextEncoderLoader",
            display_name="LTX-2 Quant Text Encoder Loader",
            category=CATEGORY,
            description=("Loads the LTX-2 text encoder (Gemma 3 12B from text_encoders + the LTX text projection "
                         "from a checkpoint), as LTXAVTextEncoderLoader does, quantizing it while it is read."),
            inputs=[
                io.Combo.Input("text_encoder", options=folder_paths.get_filename_list("text_encoders")),
                io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints"),
                               tooltip="The LTX-2 checkpoint whose text projection to use"),
                io.Combo.Input("policy", options=list(POLICIES), default=DEFAULT_POLICY, tooltip=POLICY_TOOLTIP),
                io.Combo.Input("device", options=["default", "cpu"], default="default", advanced=True),
                io.Boolean.Input("compare_to_bf16", default=False, optional=True, tooltip=COMPARE_TOOLTIP),
                io.String.Input("save_as", default="", optional=True, tooltip=SAVE_TOOLTIP),
            ],
            outputs=[io.Clip.Output()],
        )

    @classmethod
    def execute(cls, text_encoder, ckpt_name, policy, device="default", compare_to_bf16=False,
                save_as="") -> io.NodeOutput:
        gemma_path = folder_paths.get_full_path_or_raise("text_encoders", text_encoder)
        checkpoint_path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        path = loading.save_path(save_as.strip()) if save_as.strip() else None
        clip, text, _, loaded = loading.load_text_encoder(gemma_path, checkpoint_path, policy, device,
                                                              compare_to_bf16)
        if path is not None:
            text += f"\nsaved {loading.save_text_encoder(loaded, path)}"
        return io.NodeOutput(clip, ui=ui.PreviewText(text))
