"""Static checks of a UI-format workflow against node schemas (/object_info entries): every node type
exists, every link joins an output to an input of the same type, every widget value is valid for its
input. Model-file combos list whatever the user has, so their values are checked against the official
LTX-2.3 / LTX-2.5 file names instead. Optional widgets at the end may have no value: the UI gives them their
defaults (a workflow saved before ComfyUI added such an input, as ComfyUI's own templates are)."""

from __future__ import annotations

import json

from quant import hub
from scripts.make_workflows import DYNAMIC_COMBO, is_widget, walk_node_widgets, widget_type

# Widget inputs whose options are the user's files: (node input name) -> model folders it lists.
FILE_INPUTS = {"ckpt_name": hub.TRANSFORMER_FOLDERS, "model_name": ("latent_upscale_models",),
               "lora_name": ("loras",), "clip_name": ("text_encoders",), "vae_name": ("vae",)}
USER_FILE_INPUTS = (*FILE_INPUTS, "text_encoder", "image", "calibration")
TEXT_ENCODERS = {"gemma_3_12B_it_fp4_mixed.safetensors"}  # ComfyUI's LTX-2.3 text encoder file (ltx2.md)


def check_value(node_type: str, name: str, spec: list, value) -> str | None:
    kind, options = widget_type(spec), (spec[1] if len(spec) > 1 else {})
    where = f"{node_type}.{name} = {value!r}"
    if kind == DYNAMIC_COMBO:
        choices = [option["key"] for option in options["options"]]
        return None if value in choices else f"{where}: not one of {choices}"
    if kind == "COMBO":
        choices = spec[0] if isinstance(spec[0], list) else options.get("options", [])
        if name in FILE_INPUTS:
            official = hub.BY_NAME.get(value)
            if official is None or official.folder not in FILE_INPUTS[name]:
                return f"{where}: not an official LTX file name for {' or '.join(FILE_INPUTS[name])}"
            return None
        if name == "text_encoder":
            return None if value in TEXT_ENCODERS else f"{where}: not the LTX-2.3 text encoder file"
        if name == "image" and options.get("image_upload"):
            return None if isinstance(value, str) and value else f"{where}: no image file name"
        return None if value in choices else f"{where}: not one of {choices}"
    if kind == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{where}: not an integer"
    elif kind == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"{where}: not a number"
    elif kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{where}: not a boolean"
    elif kind == "STRING":
        return None if isinstance(value, str) else f"{where}: not a string"
    if "min" in options and value < options["min"] or "max" in options and value > options["max"]:
        return f"{where}: outside [{options.get('min')}, {options.get('max')}]"
    return None


def widget_problems(node: dict, schema: dict) -> list[str]:
    """The node's widgets_values against its schema's widgets, in the order the UI serializes them."""
    node_type, values, problems = node["type"], list(node.get("widgets_values", [])), []
    missing_required = []

    def take(name, spec, optional):
        options = spec[1] if len(spec) > 1 else {}
        if not values:
            if not optional:
                if not missing_required:  # the first one says it; the rest follow from it
                    problems.append(f"{node_type}.{name}: no widget value")
                missing_required.append(name)
            return options.get("default")
        value = values.pop(0)
        problem = check_value(node_type, name, spec, value)
        if problem:
            problems.append(problem)
        if options.get("control_after_generate") or options.get("image_upload"):
            values.pop(0)  # the UI's extra widget (seed control, upload button)
        return value

    walk_node_widgets(schema, take)
    if values:
        problems.append(f"{node_type}: {len(values)} widget values too many: {values}")
    return problems


def check_workflow(workflow: dict, schemas: dict) -> list[str]:
    """Every problem found, as text naming the node and input; empty when the workflow is valid."""
    problems = []
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for node in workflow["nodes"]:
        schema = schemas.get(node["type"])
        if schema is None:
            problems.append(f"node {node['id']}: unknown node type {node['type']}")
            continue
        problems += widget_problems(node, schema)
        declared = {**schema["input"].get("required", {}), **schema["input"].get("optional", {})}
        for slot in node.get("inputs", []):
            if slot["name"] not in declared:
                problems.append(f"{node['type']}: no input named {slot['name']}")
        required_links = [name for name, spec in schema["input"].get("required", {}).items()
                          if not is_widget(spec)]
        linked = {slot["name"] for slot in node.get("inputs", []) if slot.get("link") is not None}
        for name in required_links:
            if name not in linked:
                problems.append(f"{node['type']} (node {node['id']}): required input {name} is not connected")
    for link_id, source, source_slot, target, target_slot, link_type in workflow["links"]:
        if source not in nodes or target not in nodes:
            problems.append(f"link {link_id}: joins a missing node")
            continue
        source_schema, target_schema = schemas.get(nodes[source]["type"]), schemas.get(nodes[target]["type"])
        if source_schema is None or target_schema is None:
            continue
        out_type = source_schema["output"][source_slot]
        slot = nodes[target]["inputs"][target_slot]
        declared = {**target_schema["input"].get("required", {}), **target_schema["input"].get("optional", {})}
        in_type = declared.get(slot["name"], [None])[0]
        if slot.get("link") != link_id:
            problems.append(f"link {link_id}: target slot {nodes[target]['type']}.{slot['name']} does not point back")
        if not (out_type == in_type == link_type or in_type == "*"):
            problems.append(f"link {link_id}: {nodes[source]['type']} output {out_type} -> "
                            f"{nodes[target]['type']}.{slot['name']} ({in_type}), link says {link_type}")
    return problems


def without_user_files(schema: dict) -> dict:
    """A schema with the option lists that depend on the user's files emptied (for comparing snapshots)."""
    schema = json.loads(json.dumps(schema))
    for section in schema["input"].values():
        if not isinstance(section, dict):
            continue
        for name, spec in section.items():
            if name in USER_FILE_INPUTS:
                if isinstance(spec[0], list):
                    spec[0] = []
                elif len(spec) > 1 and "options" in spec[1]:
                    spec[1]["options"] = []
    return schema
