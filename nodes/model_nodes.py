"""Loader, Quantize model and Save quantized nodes (ComfyUI V3). They translate ComfyUI inputs and
outputs; the work is in model_io and quant/."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io, ui

from ..quant import hub
from ..quant.load_options import LoadOptions, calibration_options
from ..quant.memory import GIB
from ..quant.outliers import Outliers
from ..quant.policies import POLICIES
from ..quant.scopes import SCOPE_PRESETS, scope_options
from ..quant.modes import NVFP4_MODES
from . import model_io, model_save
from .patch_nodes import KEEP, LOADER_CHOICES
from .patches import patch_attention

CATEGORY = "LTX-2 Quant"
CALIBRATION_FOLDER = "ltx2_calibration"
POLICY_CHOICES = ["auto", *POLICIES]
POLICY_TOOLTIP = ("auto picks the fastest policy your GPU runs that fits its free memory: fp8-scaled-mm on Ada/Hopper, "
                  "int8-convrot on Turing/Ampere, nvfp4 on Blackwell (nvfp4 when the 8-bit one does not fit). "
                  "int8-convrot: INT8 with ComfyUI's Hadamard rotation of the input (spreads outliers)")
NVFP4_MODE_TOOLTIP = ("fast = Blackwell: native W4A4; Ada/Hopper: 4-bit weights expanded to FP8 per layer (W8A8, ~1 "
                      "point more error); exact = expanded to 16 bits everywhere. The FP8 layers of an 8-bit scope "
                      "preset run W8A8 in both")
DOWNLOAD_MARK = " [download]"
CONNECTORS_ON_CPU_TOOLTIP = ("Keep the text connectors (~3.7 GiB in bf16) in host memory and stream them to the GPU "
                             "when they run: once per prompt, when the conditioning is encoded, never in a denoising "
                             "step. Peak VRAM drops by their size; streaming them cost 0.06-0.3 s per sampling run "
                             "on an H200. No effect when the model loads where it is offloaded (CPU, --gpu-only)")


CALIBRATION_TOOLTIP = ("amax JSON from models/ltx2_calibration (the Calibrate node writes one): static activation "
                       "scales for the FP8 W8A8 and NVFP4 layers, and the per-channel amax that smooth needs")
SMOOTH_TOOLTIP = ("SmoothQuant strength (alpha; 0 = off, 0.5 measured): moves each input channel's outliers into the "
                  "weight before it is quantized, from the calibration file's per-channel amax (a calibration file "
                  "without it is refused by name). Helps INT8 most: int8-convrot 0.99707 -> 0.99950 sentence cosine "
                  "on the real-weights proxy (docs/QUALITY.md); nvfp4 a little, FP8 and MXFP8 barely. Costs a bf16 "
                  "factor per input feature (KiB per layer) and, on the NVFP4 and 16-bit paths, one extra pass over "
                  "each layer's input (the INT8 and FP8 kernels fuse it). Saved files: stock ComfyUI applies it to "
                  "NVFP4 layers only (see the Save node's comfy_compatible)")
LOW_RANK_TOOLTIP = ("bf16 low-rank branch (0 = off, 0.1 measured): each block Linear's dominant singular directions "
                    "stay unquantized, at most this fraction of the layer's quantized bytes (an SVD per layer at "
                    "load). Helps nvfp4: 0.97323 -> 0.97922 sentence cosine on the real-weights proxy, 0.98282 with "
                    "smooth (docs/QUALITY.md). Costs up to that fraction more weight memory and two thin bf16 GEMMs "
                    "per layer call; stock ComfyUI cannot run it (see the Save node's comfy_compatible)")


def connectors_on_cpu_input():
    return io.Boolean.Input("text_connectors_on_cpu", default=True, optional=True, tooltip=CONNECTORS_ON_CPU_TOOLTIP)


def calibration_input():
    return io.Combo.Input("calibration", options=["none", *folder_paths.get_filename_list(CALIBRATION_FOLDER)],
                          default="none", optional=True, tooltip=CALIBRATION_TOOLTIP)


def outlier_inputs() -> list:
    """Last among the inputs: a workflow saved before them gives them their defaults (off)."""
    return [io.Float.Input("smooth", default=0.0, min=0.0, max=1.0, step=0.05, optional=True, tooltip=SMOOTH_TOOLTIP),
            io.Float.Input("low_rank", default=0.0, min=0.0, max=1.0, step=0.05, optional=True,
                           tooltip=LOW_RANK_TOOLTIP)]


def calibrated_options(calibration: str, smooth: float, low_rank: float) -> dict:
    """The calibration combo's file and the outlier inputs as LoadOptions fields."""
    path = None if calibration == "none" else folder_paths.get_full_path_or_raise(CALIBRATION_FOLDER, calibration)
    return calibration_options(path, Outliers(smooth_alpha=smooth, low_rank_bytes=low_rank))


def register_folders() -> None:
    folder = os.path.join(folder_paths.models_dir, CALIBRATION_FOLDER)
    folder_paths.add_model_folder_path(CALIBRATION_FOLDER, folder)
    folder_paths.folder_names_and_paths[CALIBRATION_FOLDER] = (folder_paths.get_folder_paths(CALIBRATION_FOLDER),
                                                              {".json"})


def checkpoint_choices() -> list[str]:
    local = folder_paths.get_filename_list("diffusion_models") + folder_paths.get_filename_list("checkpoints")
    missing = [f.filename + DOWNLOAD_MARK for f in hub.OFFICIAL_FILES
               if f.folder in hub.TRANSFORMER_FOLDERS and f.filename not in local]
    return sorted(set(local)) + missing


def scope_inputs() -> list:
    return [
        io.Combo.Input("scope", options=list(SCOPE_PRESETS), default="policy default",
                       tooltip="Which Linears are quantized (nvfp4 presets: which of them are FP8 instead); everything "
                               "else stays bf16. policy default: every block Linear except what the policy keeps "
                               "bf16 (fp8-scaled-mm: the audio-to-video attention's to_k, to_v and to_out.0, "
                               "measured 11-16% less video error for 0.7 GiB); all block linears: every one. The "
                               "other presets add to the policy default"),
        io.String.Input("exclude", default="", multiline=True, optional=True,
                        tooltip="Extra layers to keep bf16: fnmatch patterns, one per line, e.g. *.attn2.*"),
        io.String.Input("include", default="", multiline=True, optional=True,
                        tooltip="Extra layers to quantize besides the block Linears (patterns)"),
        io.Int.Input("keep_first_blocks", default=0, min=0, max=48, optional=True),
        io.Int.Input("keep_last_blocks", default=0, min=0, max=48, optional=True),
        io.Boolean.Input("keep_audio", default=False, optional=True, tooltip="Keep the audio-side Linears bf16"),
    ]


class LTX2QuantLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        register_folders()
        return io.Schema(
            node_id="LTX2QuantLoader",
            display_name="LTX-2 Quant Loader",
            category=CATEGORY,
            description="Loads an LTX-2 / LTX-2.3 / LTX-2.5 transformer and quantizes it while reading the file.",
            inputs=[
                io.Combo.Input("ckpt_name", options=checkpoint_choices(),
                               tooltip="From diffusion_models or checkpoints; [download] marks official files "
                                       "not on disk yet"),
                io.Combo.Input("policy", options=POLICY_CHOICES, default="auto", tooltip=POLICY_TOOLTIP),
                io.Combo.Input("nvfp4_mode", options=list(NVFP4_MODES), default="fast", tooltip=NVFP4_MODE_TOOLTIP),
                *scope_inputs(),
                calibration_input(),
                io.Boolean.Input("download_missing", default=False, optional=True,
                                 tooltip="Fetch a missing official file from Hugging Face into its model folder"),
                io.Combo.Input("attention", options=LOADER_CHOICES, default=KEEP, optional=True,
                               tooltip="Attention kernel for this model, as the LTX-2 Quant Attention node sets it"),
                connectors_on_cpu_input(),
                *outlier_inputs(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, ckpt_name, policy, nvfp4_mode, scope, exclude="", include="", keep_first_blocks=0,
                keep_last_blocks=0, keep_audio=False, calibration="none", download_missing=False,
                attention=KEEP, text_connectors_on_cpu=True, smooth=0.0, low_rank=0.0) -> io.NodeOutput:
        calibrated = calibrated_options(calibration, smooth, low_rank)  # a bad file is refused before the download
        path = resolve_checkpoint(ckpt_name, download_missing)
        options = LoadOptions(policy, nvfp4_mode,
                              scope_options(scope, include, exclude, keep_first_blocks, keep_last_blocks, keep_audio),
                              text_connectors_on_cpu=text_connectors_on_cpu, **calibrated)
        model, text = model_io.load_and_quantize(path, options)
        if attention != KEEP:
            model, attention_text = patch_attention(model, attention)
            text += "\n" + attention_text
        return io.NodeOutput(model, ui=ui.PreviewText(text))


def resolve_checkpoint(choice: str, download_missing: bool) -> str:
    name = choice[: -len(DOWNLOAD_MARK)] if choice.endswith(DOWNLOAD_MARK) else choice
    path, _ = model_io.official_or_local(name)
    if path is not None:
        return path
    official = hub.BY_NAME.get(name)
    if official is None:
        raise FileNotFoundError(f"{name} is in neither diffusion_models nor checkpoints")
    folder = folder_paths.get_folder_paths(official.folder)[0]
    return hub.fetch(official, folder, download_missing, model_io.progress_bar())


class LTX2QuantQuantizeModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        register_folders()
        return io.Schema(
            node_id="LTX2QuantQuantizeModel",
            display_name="LTX-2 Quantize Model",
            category=CATEGORY,
            description="Quantizes an LTX-2 MODEL loaded by any loader (its LoRA patches carry over).",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("policy", options=POLICY_CHOICES, default="auto", tooltip=POLICY_TOOLTIP),
                io.Combo.Input("nvfp4_mode", options=list(NVFP4_MODES), default="fast", tooltip=NVFP4_MODE_TOOLTIP),
                *scope_inputs(),
                connectors_on_cpu_input(),
                calibration_input(),
                *outlier_inputs(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, policy, nvfp4_mode, scope, exclude="", include="", keep_first_blocks=0,
                keep_last_blocks=0, keep_audio=False, text_connectors_on_cpu=True, calibration="none", smooth=0.0,
                low_rank=0.0) -> io.NodeOutput:
        options = LoadOptions(policy, nvfp4_mode,
                              scope_options(scope, include, exclude, keep_first_blocks, keep_last_blocks, keep_audio),
                              text_connectors_on_cpu=text_connectors_on_cpu,
                              **calibrated_options(calibration, smooth, low_rank))
        new, text = model_io.quantize_model(model, options)
        return io.NodeOutput(new, ui=ui.PreviewText(text))


class LTX2QuantSave(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LTX2QuantSave",
            display_name="LTX-2 Save Quantized",
            category=CATEGORY,
            description="Writes the model as a ComfyUI-native quantized file into diffusion_models.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("folder", options=folder_paths.get_folder_paths("diffusion_models"),
                               tooltip="Which diffusion_models folder to write into"),
                io.String.Input("filename", default="ltx-2.3-quantized.safetensors"),
                io.Boolean.Input("comfy_compatible", default=True,
                                 tooltip="Per-tensor FP8 scales, so stock ComfyUI loads it without this pack. A "
                                         "model loaded with low_rank, or with smooth on layers other than NVFP4, "
                                         "is refused before anything is written (stock ComfyUI would drop those "
                                         "tensors and compute wrongly): turn this off to keep them in a file only "
                                         "this pack loads, or load the model with them at 0"),
                io.Boolean.Input("overwrite", default=False),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")  # a save runs every time it is queued (the file on disk may have changed)

    @classmethod
    def execute(cls, model, folder, filename, comfy_compatible, overwrite) -> io.NodeOutput:
        path = model_save.save_model(model, folder, filename, comfy_compatible, overwrite)
        return io.NodeOutput(ui=ui.PreviewText(f"saved {path} ({os.path.getsize(path) / GIB:.2f} GiB)"))


class LTX2QuantVAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LTX2QuantVAELoader",
            display_name="LTX-2 VAE from Checkpoint",
            category=CATEGORY,
            description="Loads the video VAE from a full LTX-2 checkpoint without reading its transformer "
                        "(CheckpointLoaderSimple would load all 22B weights too).",
            inputs=[io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints"))],
            outputs=[io.Vae.Output()],
        )

    @classmethod
    def execute(cls, ckpt_name) -> io.NodeOutput:
        return io.NodeOutput(model_io.load_vae(folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)))
