"""Write the example workflows (example_workflows/*.json, ComfyUI's UI format) from compact graph
specs below and a node schema snapshot (tests/data/node_schemas_v<ComfyUI version>.json, a trimmed
/object_info of that ComfyUI with the pack), which gives each node's widget order, input and output
types. The workflows are written from the newest ComfyUI's snapshot (what users run) and the tests
check them against every snapshot.

    python scripts/make_workflows.py                      # rewrite example_workflows/
    python scripts/make_workflows.py --schemas-from object_info.json --comfyui 0.33.0
        # refresh that ComfyUI's snapshot first (GET /object_info of a ComfyUI with the pack)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import NamedTuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from quant.safetensors_io import write_text  # noqa: E402

OUT = os.path.join(REPO, "example_workflows")


def schemas_path(comfyui_version: str) -> str:
    return os.path.join(REPO, "tests", "data", f"node_schemas_v{comfyui_version}.json")


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def snapshot_versions() -> list[str]:
    """The ComfyUI versions with a schema snapshot, oldest first."""
    names = glob.glob(schemas_path("*"))
    versions = [os.path.basename(n)[len("node_schemas_v"):-len(".json")] for n in names]
    return sorted(versions, key=version_key)


DISTILLED = "ltx-2.3-22b-distilled-1.1.safetensors"
DEV = "ltx-2.3-22b-dev.safetensors"
# ComfyUI's mixed NVFP4/FP8 Gemma: the pack's text-encoder loader keeps its quantized layers as stored
# (no policy format is smaller than NVFP4, none but NVFP4 than FP8) and stores the embedding table FP8.
GEMMA = "gemma_3_12B_it_fp4_mixed.safetensors"
UPSCALER = "ltx-2.3-spatial-upscaler-x2-1.1.safetensors"
DISTILLED_LORA = "ltx-2.3-22b-distilled-lora-384-1.1.safetensors"
# LTX-2.5: one file per component, as ComfyUI's LTX-2.5 templates load them (the text encoder with its
# projection through CLIPLoader type ltxv, both VAEs through VAELoader).
DISTILLED_25 = "ltx-2.5-22b-distilled-transformer-comfy-int8-convrot.safetensors"
DEV_25 = "ltx-2.5-22b-dev-transformer-bf16.safetensors"
GEMMA4_25 = "gemma4-12b-with-proj-ltx-2.5-comfy-int8-convrot.safetensors"
VIDEO_VAE_25 = "ltx-2.5-video-vae-bf16.safetensors"
AUDIO_VAE_25 = "ltx-2.5-audio-vae-bf16.safetensors"
UPSCALER_25 = "ltx-2.5-latent-spatial-upscaler-x2-bf16-1.0.safetensors"
DISTILLED_LORA_25 = "ltx-2.5-22b-distilled-lora-450-bf16.safetensors"
PROMPT = ("A red fox trots across a snowy forest clearing at dawn, breath steaming, soft golden light through "
          "the pines; the crunch of snow underfoot and distant birdsong.")
NEGATIVE = "blurry, low quality, still frame, watermark, text"


def component_loaders(checkpoint: str, policy: str) -> list[dict]:
    """Nodes 2-4: the text encoder, the video VAE and the audio VAE. LTX-2.3's come out of its
    single-file checkpoint (the video VAE without reading the transformer), the text encoder quantized
    at the transformer's policy; LTX-2.5 ships each as a file of its own."""
    if checkpoint.startswith("ltx-2.5"):
        return [
            {"id": 2, "type": "CLIPLoader",
             "widgets": {"clip_name": GEMMA4_25, "type": "ltxv", "device": "default"}},
            {"id": 3, "type": "VAELoader", "widgets": {"vae_name": VIDEO_VAE_25}},
            {"id": 4, "type": "VAELoader", "widgets": {"vae_name": AUDIO_VAE_25}},
        ]
    return [
        {"id": 2, "type": "LTX2QuantTextEncoderLoader",
         "widgets": {"text_encoder": GEMMA, "ckpt_name": checkpoint, "policy": policy, "device": "default",
                     "compare_to_bf16": False, "save_as": ""}},
        {"id": 3, "type": "LTX2QuantVAELoader", "widgets": {"ckpt_name": checkpoint}},
        {"id": 4, "type": "LTXVAudioVAELoader", "widgets": {"ckpt_name": checkpoint}},
    ]


# Where each node of two_stage_graph sits: groups left to right in the order the graph runs, each group
# one or more columns of node ids, top to bottom. The Loader has a column of its own (its widgets, the
# VRAM line and, after a run, its report make it the tallest node); the LoRA and Compile Blocks follow it
# down the model's path.
LAYOUT = (
    ("Load", ((1, 22, 23), (2, 3, 4, 5))),
    ("Condition", ((6, 7, 8), (9, 10, 11, 21, 20))),
    ("Sample", ((14, 12, 13),)),
    ("Decode", ((15, 16, 17, 18, 19),)),
)


def two_stage_graph(checkpoint: str, policy: str, sampler: str, stage2_preset: str, compile_mode: str,
                    image: bool = False, lora: str | None = None) -> list[dict]:
    """Nodes as {id, type, widgets: {input: value}, links: {input: (node id, output slot)}}; LAYOUT places them."""
    model = (1, 0)
    ltx25 = checkpoint.startswith("ltx-2.5")
    nodes = [
        {"id": 1, "type": "LTX2QuantLoader",
         "widgets": {"ckpt_name": checkpoint, "policy": policy, "nvfp4_mode": "fast", "scope": "policy default",
                     "exclude": "", "include": "", "keep_first_blocks": 0, "keep_last_blocks": 0,
                     "keep_audio": False, "calibration": "none", "download_missing": False,
                     "attention": "comfyui default", "text_connectors_on_cpu": True}},
        *component_loaders(checkpoint, policy),
        {"id": 5, "type": "LatentUpscaleModelLoader",
         "widgets": {"model_name": UPSCALER_25 if ltx25 else UPSCALER}},
        {"id": 6, "type": "CLIPTextEncode", "widgets": {"text": PROMPT}, "links": {"clip": (2, 0)}},
        {"id": 7, "type": "CLIPTextEncode", "widgets": {"text": NEGATIVE},
         "links": {"clip": (2, 0)}},
        {"id": 8, "type": "LTXVConditioning", "widgets": {"frame_rate": 24.0},
         "links": {"positive": (6, 0), "negative": (7, 0)}},
        {"id": 9, "type": "EmptyLTXVLatentVideo",
         "widgets": {"width": 768, "height": 512, "length": 121, "batch_size": 1}},
        {"id": 10, "type": "LTXVEmptyLatentAudio",
         "widgets": {"frames_number": 121, "frame_rate": 24, "batch_size": 1}, "links": {"audio_vae": (4, 0)}},
        {"id": 11, "type": "LTXVConcatAVLatent",
         "links": {"video_latent": (9, 0), "audio_latent": (10, 0)}},
        {"id": 12, "type": "LTX2QuantSigmas",
         "widgets": {"preset": "distilled stage 1", "steps": 30, "terminal": 0.1}},
        {"id": 13, "type": "LTX2QuantSigmas",
         "widgets": {"preset": stage2_preset, "steps": 30, "terminal": 0.1}},
        {"id": 14, "type": "LTX2QuantTwoStageSampler",
         "widgets": {"noise_seed": 42, "sampler": sampler, "ge_gamma": 2.0, "cfg": 1.0, "image_strength": 1.0,
                     "upscale_weights": "as loaded"},
         "links": {"model": model, "positive": (8, 0), "negative": (8, 1), "latent": (11, 0), "upscale_model": (5, 0),
                   "vae": (3, 0), "sigmas_stage1": (12, 0), "sigmas_stage2": (13, 0)}},
        {"id": 15, "type": "LTXVSeparateAVLatent", "links": {"av_latent": (14, 0)}},
        # LTX-2.5's templates decode its diffusion VAE in smaller tiles; LTX-2.3's decode is sized to the free
        # memory (whole, or the largest tiles that fit).
        {"id": 16, "type": "VAEDecodeTiled",
         "widgets": {"tile_size": 512, "overlap": 64, "temporal_size": 64, "temporal_overlap": 16},
         "links": {"samples": (15, 0), "vae": (3, 0)}} if ltx25 else
        {"id": 16, "type": "LTX2QuantVAEDecode", "links": {"samples": (15, 0), "vae": (3, 0)}},
        {"id": 17, "type": "LTXVAudioVAEDecode", "links": {"samples": (15, 1), "audio_vae": (4, 0)}},
        {"id": 18, "type": "CreateVideo", "widgets": {"fps": 24.0},
         "links": {"images": (16, 0), "audio": (17, 0)}},
        {"id": 19, "type": "SaveVideo",
         "widgets": {"filename_prefix": f"video/LTX-{'2.5' if ltx25 else '2.3'}_quant", "format": "auto",
                     "codec": "auto"},
         "links": {"video": (18, 0)}},
    ]
    if image:
        nodes += [
            {"id": 20, "type": "LoadImage", "widgets": {"image": "example.png", "upload": "image"}},
            {"id": 21, "type": "LTXVPreprocess", "widgets": {"img_compression": 18},
             "links": {"image": (20, 0)}},
        ]
        nodes[13]["links"]["image"] = (21, 0)
    if lora:
        nodes.append({"id": 22, "type": "LoraLoaderModelOnly",
                      "widgets": {"lora_name": lora, "strength_model": 0.5}, "links": {"model": model}})
        nodes[13]["links"]["model"] = (22, 0)
    # Compile Blocks last, on the model the sampler gets (the measured speed comes with it: BENCHMARKS.md).
    nodes.append({"id": 23, "type": "LTX2QuantCompile", "widgets": {"mode": compile_mode},
                  "links": {"model": nodes[13]["links"]["model"]}})
    nodes[13]["links"]["model"] = (23, 0)
    return nodes


class Workflow(NamedTuple):
    title: str
    graph: list[dict]
    comfyui: str = "0.20.1"  # the oldest ComfyUI it runs on (LTX-2.5 came with 0.33)


# file stem -> workflow
WORKFLOWS = {
    "ltx2.3_t2v_two_stage_fp8_scaled_mm": Workflow(
        "LTX-2.3 text-to-video, two-stage distilled, fp8-scaled-mm",
        two_stage_graph(DISTILLED, "fp8-scaled-mm", "euler", "distilled stage 2 (Lightricks)", "blocks")),
    "ltx2.3_i2v_two_stage_nvfp4": Workflow(
        "LTX-2.3 image-to-video, two-stage distilled, nvfp4",
        two_stage_graph(DISTILLED, "nvfp4", "euler", "distilled stage 2 (Lightricks)", "blocks, cuda graphs",
                        image=True)),
    "ltx2.3_dev_distilled_lora_fp8_scaled_mm": Workflow(
        "LTX-2.3 dev + distilled LoRA 0.5 on fp8-scaled-mm, two-stage",
        two_stage_graph(DEV, "fp8-scaled-mm", "euler_ancestral_cfg_pp / euler_cfg_pp",
                        "distilled stage 2 (ComfyUI templates)", "blocks", lora=DISTILLED_LORA)),
    # The official INT8 ConvRot file read as it is, on this pack's INT8 path (every GPU from Turing on);
    # stage 1 ancestral and stage 2 Euler as Lightricks' LTX-2.5 distilled pipeline, ComfyUI's stage-2 sigmas.
    "ltx2.5_t2v_two_stage_int8_convrot": Workflow(
        "LTX-2.5 text-to-video, two-stage distilled (official int8-convrot file), int8-convrot",
        two_stage_graph(DISTILLED_25, "int8-convrot", "euler_ancestral_cfg_pp / euler_cfg_pp",
                        "distilled stage 2 (ComfyUI templates)", "blocks"), comfyui="0.33.0"),
    "ltx2.5_dev_distilled_lora_fp8_scaled_mm": Workflow(
        "LTX-2.5 dev + distilled LoRA 0.5 on fp8-scaled-mm, two-stage",
        two_stage_graph(DEV_25, "fp8-scaled-mm", "euler_ancestral_cfg_pp / euler_cfg_pp",
                        "distilled stage 2 (ComfyUI templates)", "blocks", lora=DISTILLED_LORA_25),
        comfyui="0.33.0"),
}


def runs_on(stem: str, comfyui_version: str) -> bool:
    """Whether the workflow `stem` runs on that ComfyUI version (its nodes and models exist there)."""
    return version_key(comfyui_version) >= version_key(WORKFLOWS[stem].comfyui)


WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
# A combo whose chosen option brings inputs of its own (newer ComfyUI's SaveVideo format/codec): the UI
# serializes its value, then the chosen option's widgets.
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"


def widget_type(spec: list) -> str | None:
    """The widget the UI shows for an /object_info input spec ("COMBO" for an option list, one of
    WIDGET_TYPES or DYNAMIC_COMBO), or None for a link slot. An input that accepts several types
    ("FLOAT,INT") shows the widget its `widgetType` names."""
    if isinstance(spec[0], list):
        return "COMBO"
    kind = spec[0]
    if "," in kind:
        kind = spec[1].get("widgetType") if len(spec) > 1 else None
    return kind if kind in WIDGET_TYPES or kind == DYNAMIC_COMBO else None


def is_widget(spec: list) -> bool:
    """Whether the UI shows an input of this /object_info spec as a widget (not a link slot)."""
    return widget_type(spec) is not None


def is_hidden(spec: list) -> bool:
    """An input the UI shows neither as a widget nor as a slot (kept for API prompts, e.g. newer
    ComfyUI's top-level SaveVideo codec)."""
    return len(spec) > 1 and bool(spec[1].get("hidden"))


def walk_widgets(inputs: dict, take, input_order: dict | None = None) -> None:
    """Call take(name, spec, optional) for each widget input in the order the UI serializes them
    (`inputs`: an /object_info "input" dict). take returns the value the widget holds: a dynamic
    combo's value picks the option whose widgets follow it."""
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        for name in (input_order or {}).get(section, list(specs)):
            spec = specs[name]
            if not is_widget(spec) or is_hidden(spec):
                continue
            value = take(name, spec, section == "optional")
            if widget_type(spec) == DYNAMIC_COMBO:
                option = next((o for o in spec[1]["options"] if o["key"] == value), None)
                if option is not None:
                    walk_widgets(option["inputs"], take)


def walk_node_widgets(schema: dict, take) -> None:
    walk_widgets(schema["input"], take, schema.get("input_order"))


def link_inputs(schema: dict) -> list[tuple[str, str, bool]]:
    """(name, type, optional) of the inputs that take a link (not widgets)."""
    out = []
    for section in ("required", "optional"):
        inputs = schema["input"].get(section, {})
        for name in schema.get("input_order", {}).get(section, list(inputs)):
            if not is_widget(inputs[name]) and not is_hidden(inputs[name]):
                out.append((name, inputs[name][0], section == "optional"))
    return out


def widgets_values(node_type: str, schema: dict, widgets: dict) -> list:
    """The node's widgets_values. An optional widget the spec leaves out keeps its default, which
    only works at the end (the UI fills values in order): so a workflow also loads in a ComfyUI
    that predates that input (CreateVideo's bit_depth)."""
    values, left_out = [], []

    def take(name, spec, optional):
        options = spec[1] if len(spec) > 1 else {}
        if name not in widgets:
            if not optional:
                raise ValueError(f"{node_type}.{name}: the graph spec gives no value")
            left_out.append(name)
            return options.get("default")
        if left_out:
            raise ValueError(f"{node_type}.{name}: follows {left_out}, which the graph spec leaves out")
        values.append(widgets[name])
        if options.get("control_after_generate"):
            values.append("fixed")
        if options.get("image_upload"):
            values.append(widgets.get("upload", "image"))
        return widgets[name]

    walk_node_widgets(schema, take)
    return values


# LiteGraph's metrics as the ComfyUI frontend lays a node out (LiteGraphNode.computeSize): a title bar
# above the node's position, one row per input or output slot, one line per widget, more for a
# multiline text box; this pack's extension adds a VRAM or size line under the nodes it checks.
TITLE_HEIGHT = 30
SLOT_HEIGHT = 20
WIDGET_HEIGHT = 24
MULTILINE_HEIGHT = 54
STATUS_HEIGHT = 38
STATUS_NODES = ("LTX2QuantLoader", "LTX2QuantQuantizeModel", "LTX2QuantTwoStageSampler", "EmptyLTXVLatentVideo")
# Room for the report a node shows after it runs (web/ltx2_quant.js, a multiline box at the bottom), and
# for the prompt's text to be read without scrolling.
ROOM = {"LTX2QuantLoader": 120, "LTX2QuantCompile": 60, "CLIPTextEncode": 60}
NODE_WIDTH = 380
NODE_GAP = 40      # between a node's bottom and the next one's title bar
COLUMN_GAP = 60    # between columns of one group
GROUP_PAD = 20     # group border to its nodes
GROUP_TITLE = 40   # a group's title bar (font size 24)
GROUP_GAP = 60     # between groups
# The template opens scaled to fit this window, clear of the frontend's side bar and top menu (screen pixels).
VIEW = (1800, 1100)
VIEW_MARGIN = (80, 100, 20, 20)  # left, top, right, bottom


def node_height(schema: dict, widgets: dict) -> int:
    """The height the frontend gives a node of this schema (without its title bar), and room for what
    this pack's extension adds to it."""
    lines = multiline = 0

    def take(name, spec, optional):
        nonlocal lines, multiline
        options = spec[1] if len(spec) > 1 else {}
        if widget_type(spec) == "STRING" and options.get("multiline"):
            multiline += 1
        else:
            lines += 1 + bool(options.get("control_after_generate")) + bool(options.get("image_upload"))
        return widgets.get(name, options.get("default"))

    walk_node_widgets(schema, take)
    rows = max(len(link_inputs(schema)), len(schema["output"]))
    height = 6 + SLOT_HEIGHT * rows
    if lines or multiline:
        height += 8 + WIDGET_HEIGHT * lines + MULTILINE_HEIGHT * multiline
    return height


def layout(spec: list[dict], schemas: dict) -> tuple[dict, list[dict], dict]:
    """Each node's position and size, the groups (LAYOUT, left to right) and the view that shows them."""
    by_id = {n["id"]: n for n in spec}
    placed, groups = {}, []
    group_x = 0  # the next group's left edge
    bottom = 0
    for title, columns in LAYOUT:
        columns = [[i for i in column if i in by_id] for column in columns]
        columns = [column for column in columns if column]
        if not columns:
            continue
        x = group_x + GROUP_PAD
        group_bottom = 0
        for column in columns:
            y = GROUP_TITLE + GROUP_PAD + TITLE_HEIGHT
            for node_id in column:
                node = by_id[node_id]
                height = node_height(schemas[node["type"]], node.get("widgets", {}))
                height += STATUS_HEIGHT if node["type"] in STATUS_NODES else 0
                height += ROOM.get(node["type"], 0)
                placed[node_id] = ([x, y], [NODE_WIDTH, height])
                group_bottom = max(group_bottom, y + height + GROUP_PAD)
                y += height + NODE_GAP + TITLE_HEIGHT
            x += NODE_WIDTH + COLUMN_GAP
        group_width = x - COLUMN_GAP + GROUP_PAD - group_x
        groups.append({"title": title, "bounding": [group_x, 0, group_width, group_bottom],
                       "color": "#3f789e", "font_size": 24, "flags": {}})
        bottom = max(bottom, group_bottom)
        group_x += group_width + GROUP_GAP
    missing = sorted(set(by_id) - set(placed))
    if missing:
        raise ValueError(f"LAYOUT places no node {missing}")
    width = group_x - GROUP_GAP
    left, top, right, below = VIEW_MARGIN
    scale = int(min((VIEW[0] - left - right) / width, (VIEW[1] - top - below) / bottom, 1.0) * 100) / 100
    # The canvas draws a point at (position + offset) * scale.
    return placed, groups, {"scale": scale, "offset": [round(left / scale), round(top / scale)]}


def build(title: str, spec: list[dict], schemas: dict) -> dict:
    links, nodes = [], []
    outputs = {n["id"]: [[] for _ in schemas[n["type"]]["output"]] for n in spec}
    link_id = 0
    link_of = {}
    for node in spec:
        schema = schemas[node["type"]]
        for name, (source, slot) in node.get("links", {}).items():
            link_id += 1
            source_type = schemas[next(n["type"] for n in spec if n["id"] == source)]["output"][slot]
            links.append([link_id, source, slot, node["id"], [n for n, _, _ in link_inputs(schema)].index(name),
                          source_type])
            outputs[source][slot].append(link_id)
            link_of[(node["id"], name)] = link_id
    placed, groups, view = layout(spec, schemas)
    for order, node in enumerate(spec):
        schema = schemas[node["type"]]
        pos, size = placed[node["id"]]
        nodes.append({
            "id": node["id"], "type": node["type"], "pos": pos, "size": size, "flags": {}, "order": order, "mode": 0,
            "inputs": [{"name": name, "type": kind, "link": link_of.get((node["id"], name)), **({"shape": 7} if optional else {})}
                       for name, kind, optional in link_inputs(schema)],
            "outputs": [{"name": name, "type": kind, "links": outputs[node["id"]][slot] or None, "slot_index": slot}
                        for slot, (name, kind) in enumerate(zip(schema["output_name"], schema["output"]))],
            "properties": {"Node name for S&R": node["type"]},
            "widgets_values": widgets_values(node["type"], schema, node.get("widgets", {})),
        })
    return {"last_node_id": max(n["id"] for n in spec), "last_link_id": link_id, "nodes": nodes, "links": links,
            "groups": groups, "config": {}, "extra": {"title": title, "ds": view},
            "version": 0.4}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--schemas-from", help="a full /object_info JSON to take the used node schemas from")
    parser.add_argument("--comfyui", help="the version of the ComfyUI that --schemas-from came from (e.g. 0.33.0)")
    args = parser.parse_args()
    if args.schemas_from:
        if not args.comfyui:
            parser.error("--schemas-from needs --comfyui (the snapshot is kept per ComfyUI version)")
        used = sorted({n["type"] for stem, workflow in WORKFLOWS.items() if runs_on(stem, args.comfyui)
                       for n in workflow.graph})
        with open(args.schemas_from) as f:
            info = json.load(f)
        write_text(schemas_path(args.comfyui), json.dumps({t: info[t] for t in used}, indent=1, sort_keys=True) + "\n",
                   overwrite=True)
    with open(schemas_path(snapshot_versions()[-1])) as f:
        schemas = json.load(f)
    os.makedirs(OUT, exist_ok=True)
    for stem, workflow in WORKFLOWS.items():
        write_text(os.path.join(OUT, stem + ".json"),
                   json.dumps(build(workflow.title, workflow.graph, schemas), indent=1) + "\n",
                   overwrite=True)
        print(os.path.join("example_workflows", stem + ".json"))


if __name__ == "__main__":
    main()
