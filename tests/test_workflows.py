"""The example workflows are valid against each ComfyUI's node schema snapshot
(tests/data/node_schemas_v<version>.json; tests/integration/test_workflows_live.py keeps each equal to
that ComfyUI's /object_info)."""

from __future__ import annotations

import copy
import glob
import json
import os

import pytest

from scripts.make_workflows import WORKFLOWS as SPECS
from scripts.make_workflows import runs_on, schemas_path, snapshot_versions
from workflow_check import check_workflow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = sorted(glob.glob(os.path.join(REPO, "example_workflows", "*.json")))
VERSIONS = snapshot_versions()


def stem(path: str) -> str:
    return os.path.basename(path)[: -len(".json")]


# Each workflow against the snapshot of every ComfyUI it runs on (LTX-2.5's from 0.33 on).
CHECKS = [(path, version) for path in WORKFLOWS for version in VERSIONS if runs_on(stem(path), version)]


def schemas(version: str) -> dict:
    with open(schemas_path(version)) as f:
        return json.load(f)


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def test_the_promised_workflows_exist():
    names = {os.path.basename(p) for p in WORKFLOWS}
    assert {"ltx2.3_t2v_two_stage_fp8_scaled_mm.json", "ltx2.3_i2v_two_stage_nvfp4.json",
            "ltx2.3_dev_distilled_lora_fp8_scaled_mm.json", "ltx2.5_t2v_two_stage_int8_convrot.json",
            "ltx2.5_dev_distilled_lora_fp8_scaled_mm.json"} <= names
    assert {stem(p) for p in WORKFLOWS} == set(SPECS)  # every file is made by scripts/make_workflows.py


def test_both_tested_comfyui_versions_have_a_snapshot():
    assert {"0.20.1", "0.33.0"} <= set(VERSIONS)


def test_ltx25_workflows_need_comfyui_033():
    assert {SPECS[stem(p)].comfyui for p in WORKFLOWS if stem(p).startswith("ltx2.5")} == {"0.33.0"}
    assert not any(runs_on(stem(p), "0.20.1") for p in WORKFLOWS if stem(p).startswith("ltx2.5"))


@pytest.mark.parametrize("path, version", CHECKS, ids=lambda v: os.path.basename(v))
def test_workflow_is_valid(path, version):
    workflow = load(path)
    assert check_workflow(workflow, schemas(version)) == []
    types = {n["type"] for n in workflow["nodes"]}
    assert "LTX2QuantLoader" in types and "LTX2QuantTwoStageSampler" in types
    assert all(t.startswith("LTX2Quant") or not t.startswith("LTX2Q") for t in types)  # no test-only nodes


def test_workflows_use_the_promised_policies_and_models():
    loaders = {os.path.basename(p): [n["widgets_values"][:2] for n in load(p)["nodes"] if n["type"] == "LTX2QuantLoader"]
               for p in WORKFLOWS}
    assert loaders["ltx2.3_t2v_two_stage_fp8_scaled_mm.json"] == [["ltx-2.3-22b-distilled-1.1.safetensors", "fp8-scaled-mm"]]
    assert loaders["ltx2.3_i2v_two_stage_nvfp4.json"] == [["ltx-2.3-22b-distilled-1.1.safetensors", "nvfp4"]]
    assert loaders["ltx2.3_dev_distilled_lora_fp8_scaled_mm.json"] == [["ltx-2.3-22b-dev.safetensors", "fp8-scaled-mm"]]
    assert loaders["ltx2.5_t2v_two_stage_int8_convrot.json"] == [
        ["ltx-2.5-22b-distilled-transformer-comfy-int8-convrot.safetensors", "int8-convrot"]]
    assert loaders["ltx2.5_dev_distilled_lora_fp8_scaled_mm.json"] == [
        ["ltx-2.5-22b-dev-transformer-bf16.safetensors", "fp8-scaled-mm"]]
    for name, lora_file in (("ltx2.3_dev_distilled_lora_fp8_scaled_mm.json", "ltx-2.3-22b-distilled-lora-384-1.1"),
                            ("ltx2.5_dev_distilled_lora_fp8_scaled_mm.json", "ltx-2.5-22b-distilled-lora-450-bf16")):
        lora = [n for n in load(os.path.join(REPO, "example_workflows", name))["nodes"]
                if n["type"] == "LoraLoaderModelOnly"]
        assert lora[0]["widgets_values"] == [lora_file + ".safetensors", 0.5]
    # LTX-2.5's components as its release ships them, loaded by ComfyUI's own loaders.
    for name in ("ltx2.5_t2v_two_stage_int8_convrot.json", "ltx2.5_dev_distilled_lora_fp8_scaled_mm.json"):
        values = {n["type"]: n["widgets_values"] for n in load(os.path.join(REPO, "example_workflows", name))["nodes"]}
        assert values["CLIPLoader"] == ["gemma4-12b-with-proj-ltx-2.5-comfy-int8-convrot.safetensors", "ltxv",
                                        "default"]
        assert values["LatentUpscaleModelLoader"] == ["ltx-2.5-latent-spatial-upscaler-x2-bf16-1.0.safetensors"]
        assert sorted(n["widgets_values"][0] for n in load(os.path.join(REPO, "example_workflows", name))["nodes"]
                      if n["type"] == "VAELoader") == ["ltx-2.5-audio-vae-bf16.safetensors",
                                                       "ltx-2.5-video-vae-bf16.safetensors"]


def broken(mutate, version: str = VERSIONS[-1]) -> list[str]:
    workflow = copy.deepcopy(load(WORKFLOWS[0]))
    mutate(workflow)
    return check_workflow(workflow, schemas(version))


def node(workflow: dict, node_type: str) -> dict:
    return next(n for n in workflow["nodes"] if n["type"] == node_type)


@pytest.mark.parametrize("mutate, needle", [
    (lambda w: node(w, "LTX2QuantLoader").update(type="LTX2QuantLoaderX"), "unknown node type LTX2QuantLoaderX"),
    (lambda w: node(w, "LTX2QuantLoader")["widgets_values"].__setitem__(1, "int3"), "LTX2QuantLoader.policy = 'int3'"),
    (lambda w: node(w, "LTX2QuantLoader")["widgets_values"].__setitem__(0, "my.safetensors"), "not an official"),
    (lambda w: node(w, "EmptyLTXVLatentVideo")["widgets_values"].__setitem__(0, 99999), "outside"),
    (lambda w: node(w, "EmptyLTXVLatentVideo")["widgets_values"].pop(), "no widget value"),
    (lambda w: w["links"][0].__setitem__(5, "MODEL"), "link says MODEL"),
    (lambda w: node(w, "LTX2QuantVAEDecode")["inputs"][1].update(link=None), "required input vae is not connected"),
])
def test_the_check_catches_broken_workflows(mutate, needle):
    assert any(needle in p for p in broken(mutate)), broken(mutate)


@pytest.mark.parametrize("version, mutate, needle", [
    # 0.33's SaveVideo: format is a dynamic combo whose chosen option brings the codec widget.
    ("0.33.0", lambda w: node(w, "SaveVideo")["widgets_values"].__setitem__(1, "mov"), "SaveVideo.format = 'mov'"),
    ("0.33.0", lambda w: node(w, "SaveVideo")["widgets_values"].__setitem__(2, "vp9"), "SaveVideo.codec = 'vp9'"),
    # 0.33's audio frame_rate takes FLOAT or INT and shows a FLOAT widget.
    ("0.33.0", lambda w: node(w, "LTXVEmptyLatentAudio")["widgets_values"].__setitem__(1, "24"),
     "LTXVEmptyLatentAudio.frame_rate = '24': not a number"),
    # CreateVideo's optional bit_depth (0.33) may be left out, but a value given is checked ...
    ("0.33.0", lambda w: node(w, "CreateVideo")["widgets_values"].append(12), "CreateVideo.bit_depth = 12: outside"),
    # ... and 0.20.1 has no such widget.
    ("0.20.1", lambda w: node(w, "CreateVideo")["widgets_values"].append(8), "CreateVideo: 1 widget values too many"),
])
def test_the_check_follows_each_comfyuis_widgets(version, mutate, needle):
    assert any(needle in p for p in broken(mutate, version)), broken(mutate, version)


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_nodes_as_written_do_not_overlap_and_groups_read_left_to_right(path):
    """The layout make_workflows writes (title bars included); test_web.py checks the same in the
    frontend, after it sized the nodes and the pack's lines rendered."""
    from scripts.make_workflows import TITLE_HEIGHT
    workflow = load(path)
    boxes = [(n["id"], (n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["size"][0], n["size"][1] + TITLE_HEIGHT))
             for n in workflow["nodes"]]

    def intersect(a, b):
        return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]

    assert [(i, j) for k, (i, a) in enumerate(boxes) for j, b in boxes[k + 1:] if intersect(a, b)] == []
    groups = workflow["groups"]
    assert [g["title"] for g in sorted(groups, key=lambda g: g["bounding"][0])] == [
        "Load", "Condition", "Sample", "Decode"]
    for node_id, box in boxes:
        inside = [g["title"] for g in groups if g["bounding"][0] <= box[0] and box[0] + box[2] <= g["bounding"][0]
                  + g["bounding"][2] and g["bounding"][1] <= box[1] and box[1] + box[3] <= g["bounding"][1]
                  + g["bounding"][3]]
        assert len(inside) == 1, (node_id, inside)
