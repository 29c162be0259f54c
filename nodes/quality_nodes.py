"""Calibrate and Quality report nodes (ComfyUI V3). The work is in quality_evaluation.py and quant/."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io, ui

from ..quant.calibration import outlier_ratio, save_amax
from ..quant.quality import format_layer_table, write_report
from ..quant.safetensors_io import check_output_path
from . import model_save, quality_evaluation
from .model_nodes import CALIBRATION_FOLDER, CATEGORY, register_folders
from .ops import quantized_layers


def refuse_existing(path: str, overwrite: bool) -> None:
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; enable overwrite to replace it")


def sampling_inputs() -> list:
    return [
        io.Conditioning.Input("positive"),
        io.Conditioning.Input("negative"),
        io.Latent.Input("latent", tooltip="The latent to sample from (e.g. an empty LTXV latent)"),
        io.Sigmas.Input("sigmas", tooltip="e.g. LTX-2 Sigmas 'distilled stage 1'; Euler steps are taken"),
        io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
    ]


class LTX2QuantCalibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        register_folders()
        return io.Schema(
            node_id="LTX2QuantCalibrate",
            display_name="LTX-2 Calibrate",
            category=CATEGORY,
            description="Samples the model on your inputs while recording every Linear's input amax (per tensor and "
                        "per channel); writes an amax JSON for the loader (its per-channel amax is what the "
                        "Loader's and Quantize node's smooth input needs) and returns the model with static "
                        "activation scales where it was quantized by this pack.",
            inputs=[
                io.Model.Input("model", tooltip="bf16 (recommended) or quantized LTX-2 model"),
                *sampling_inputs(),
                io.Combo.Input("folder", options=folder_paths.get_folder_paths(CALIBRATION_FOLDER),
                               tooltip="Which ltx2_calibration folder to write into (the Loader lists them)"),
                io.String.Input("filename", default="ltx2_amax.json", tooltip="Empty: do not write a file"),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace the file if it exists"),
            ],
            outputs=[io.Model.Output(tooltip="With static activation scales on the W8A8/NVFP4 layers of a model "
                                             "this pack quantized; otherwise the input model")],
            is_output_node=True,  # writing the file is reason enough to run
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, sigmas, cfg, seed, folder, filename,
                overwrite) -> io.NodeOutput:
        path = None
        if filename.strip():  # checked before sampling, which takes minutes
            if folder not in folder_paths.get_folder_paths(CALIBRATION_FOLDER):
                raise ValueError(f"{folder} is not one of ComfyUI's {CALIBRATION_FOLDER} folders")
            os.makedirs(folder, exist_ok=True)
            path = model_save.safe_output_path(folder, filename, ".json")
            refuse_existing(path, overwrite)
        recorder = quality_evaluation.calibrate(model, positive, negative, latent, sigmas, cfg, seed)
        amax = recorder.per_tensor()
        channels = recorder.per_channel()
        lines = [f"calibrated {len(amax)} Linear inputs over {len(sigmas) - 1} steps"]
        if path is not None:
            save_amax(path, amax, channels, overwrite=overwrite)
            lines.append(f"wrote {path}")
        out = model
        if quantized_layers(model.model.diffusion_model):
            out, count = quality_evaluation.with_static_scales(model, amax, channels)
            lines.append(f"static activation scales on {count} quantized layers")
        ratios = sorted(((outlier_ratio(channels[name]), name) for name in amax), reverse=True)[:5]
        lines.append("largest per-channel outliers (max/median channel amax): "
                     + ", ".join(f"{name} {ratio:.1f}x" for ratio, name in ratios))
        return io.NodeOutput(out, ui=ui.PreviewText("\n".join(lines)))


class LTX2QuantQualityReport(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LTX2QuantQualityReport",
            display_name="LTX-2 Quality Report",
            category=CATEGORY,
            description="Compares quantized models with their bf16 source on the same inputs: per-step velocity "
                        "error, final-latent error, per-layer weight error and output SNR; a table and a plot.",
            inputs=[
                io.Model.Input("reference", tooltip="The full-precision (bf16) model"),
                io.Model.Input("model", tooltip="A quantized model of the same weights"),
                io.Model.Input("model_b", optional=True, tooltip="Another quantized model to compare"),
                io.Model.Input("model_c", optional=True),
                *sampling_inputs(),
                io.Int.Input("worst_layers", default=15, min=0, max=10000, tooltip="Layers listed per model"),
                io.String.Input("report_name", default="", optional=True,
                                tooltip="If set: writes <name>.json and <name>.png into ComfyUI's output folder"),
                io.Boolean.Input("overwrite", default=False, optional=True,
                                 tooltip="Replace <name>.json and <name>.png if they exist"),
            ],
            outputs=[io.String.Output(display_name="table"), io.Image.Output(display_name="plot")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, reference, model, positive, negative, latent, sigmas, cfg, seed, worst_layers,
                model_b=None, model_c=None, report_name="", overwrite=False) -> io.NodeOutput:
        paths = None
        if report_name.strip():  # checked before the models sample
            path = model_save.safe_output_path(folder_paths.get_output_directory(), report_name, ".json")
            paths = (path, path[: -len(".json")] + ".png")
            check_output_path(paths[1])
            for target in paths:
                refuse_existing(target, overwrite)
        given = (("model", model), ("model_b", model_b), ("model_c", model_c))
        candidates = {label + (f" ({m.model.ltx2_quant_policy})" if getattr(m.model, "ltx2_quant_policy", None) else ""): m
                      for label, m in given if m is not None}
        report = quality_evaluation.compare_models(reference, candidates, positive, negative, latent, sigmas, cfg, seed)
        parts = [quality_evaluation.format_comparison(report)]
        for label, r in report["models"].items():
            if r["layers"] and worst_layers:
                parts += ["", f"{label}: worst layers", format_layer_table(r["layers"], worst_layers)]
        image = quality_evaluation.plot_comparison(report)
        if paths is not None:
            write_report(paths[0], report, overwrite=overwrite)
            quality_evaluation.save_png(image, paths[1], overwrite=overwrite)
            parts.append(f"wrote {paths[0]} and its .png")
        plot = quality_evaluation.image_tensor(image)
        text = "\n".join(parts)
        shown = {**ui.PreviewText(text).as_dict(), **ui.PreviewImage(plot, cls=cls).as_dict()}
        return io.NodeOutput(text, plot, ui=shown)
