"""The example workflows against a real ComfyUI's /object_info (core's and this pack's node schemas),
and the schema snapshot the CPU test uses equal to it. Skips when COMFYUI_PATH is unset."""

from __future__ import annotations

import glob
import json
import os
import re
import sys

import pytest

from support.comfy_server import REPO, ComfyServer, missing_requirements

sys.path.insert(0, os.path.join(REPO, "tests"))
from scripts.make_workflows import runs_on, schemas_path  # noqa: E402
from workflow_check import check_workflow, without_user_files  # noqa: E402

REASON = missing_requirements()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")
WORKFLOWS = sorted(glob.glob(os.path.join(REPO, "example_workflows", "*.json")))


@pytest.fixture(scope="module")
def object_info(tmp_path_factory):
    server = ComfyServer(str(tmp_path_factory.mktemp("comfy_workflows")), with_pack=True)
    try:
        yield server.get("/object_info"), server.get("/workflow_templates"), server.get("/system_stats")
    finally:
        server.stop()


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_workflow_is_valid_in_real_comfyui(object_info, path):
    version = object_info[2]["system"]["comfyui_version"]
    if not runs_on(os.path.basename(path)[: -len(".json")], version):
        pytest.skip(f"needs a newer ComfyUI than {version}")
    with open(path) as f:
        assert check_workflow(json.load(f), object_info[0]) == []


def test_schema_snapshot_matches_real_comfyui(object_info):
    """The snapshot of this ComfyUI's version, which the CPU test checks the workflows against."""
    version = object_info[2]["system"]["comfyui_version"]
    path = schemas_path(version)
    assert os.path.exists(path), (f"no node schema snapshot for ComfyUI {version}: make one with "
                                  f"scripts/make_workflows.py --schemas-from <object_info.json> --comfyui {version}")
    with open(path) as f:
        snapshot = json.load(f)
    for node_type, schema in snapshot.items():
        assert without_user_files(object_info[0][node_type]) == without_user_files(schema), (
            f"{node_type} changed: refresh with scripts/make_workflows.py --schemas-from <object_info.json> "
            f"--comfyui {version}")


def test_comfyui_lists_the_workflows_as_templates(object_info):
    templates = object_info[1]
    listed = next(names for pack, names in templates.items() if pack in ("ltx2-quant",))
    assert sorted(listed) == sorted(os.path.basename(p)[: -len(".json")] for p in WORKFLOWS)


def test_every_node_and_input_of_the_pack_is_in_the_nodes_doc(object_info):
    """docs/NODES.md has a section per node of the pack that names the node class and each of its inputs."""
    with open(os.path.join(REPO, "docs", "NODES.md")) as f:
        sections = re.split(r"^## ", f.read(), flags=re.M)[1:]
    ours = {name: schema for name, schema in object_info[0].items() if name.startswith("LTX2Quant")}
    assert ours
    for name, schema in ours.items():
        section = next((s for s in sections if f"(`{name}`)" in s.splitlines()[0]), None)
        assert section is not None, f"docs/NODES.md has no section for {name}"
        inputs = [i for part in ("required", "optional") for i in schema["input"].get(part, {})]
        missing = [i for i in inputs if f"`{i}`" not in section]
        assert missing == [], f"docs/NODES.md's {name} section does not name {missing}"
