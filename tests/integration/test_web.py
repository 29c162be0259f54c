"""The web extension in a real ComfyUI page: a headless Chromium opens the frontend of a real server
with the pack, adds EmptyLTXVLatentVideo, the loader and the two-stage sampler through the page's
own LiteGraph, edits their widgets as the canvas does (`widget.setValue`) or loads a workflow with
bad values, and reads what the extension shows. The numbers must be the Python estimator's, and bad sizes must be flagged.

Needs COMFYUI_PATH (with ComfyUI's requirements and its frontend package, `comfyui-frontend-package`),
the `playwright` Python package and a Chromium (`chromium` on PATH, e.g. Debian's `apt-get install
chromium`, or LTX2Q_CHROMIUM=/path/to/chrome); skips with the reason otherwise."""

from __future__ import annotations

import glob
import json
import os
import shutil
import urllib.error
import urllib.parse

import pytest

from support.comfy_server import REPO, ComfyServer, missing_requirements
from quant import memory
from quant.memory import GIB
from quant.capability import Capability
from quant.outliers import Outliers

CPU = Capability("cpu", None, False)  # the test server runs with --cpu


def browser_requirements() -> str | None:
    reason = missing_requirements()
    if reason:
        return reason
    try:
        import comfyui_frontend_package  # noqa: F401
    except ImportError:
        return "this interpreter lacks comfyui-frontend-package (ComfyUI's frontend)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install playwright)"
    if not chromium_path():
        return "no Chromium found (install Debian's chromium, or set LTX2Q_CHROMIUM)"
    return None


def chromium_path() -> str | None:
    return os.environ.get("LTX2Q_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


REASON = browser_requirements()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ComfyServer(str(tmp_path_factory.mktemp("comfy_web")), with_pack=True)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1800, "height": 1100})
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"http://127.0.0.1:{server.port}/")
        # Ready once the frontend has also opened its first workflow (a blank one on a fresh server, a few
        # hundred ms after the node types register): a graph edited before that load is replaced by it.
        page.wait_for_function(STARTED, timeout=120_000)
        page.wait_for_load_state("networkidle")
        page.evaluate("() => window.app.graph.clear()")
        page.errors = errors
        yield page
        browser.close()


STARTED = """() => window.app?.graph && window.LiteGraph?.registered_node_types?.LTX2QuantLoader
  && (window.app.extensionManager?.workflow === undefined || !!window.app.extensionManager.workflow.activeWorkflow)"""
ADD_NODE = """(type) => {
  const node = window.LiteGraph.createNode(type);
  window.app.graph.add(node);
  return node.id;
}"""
SET_WIDGET = """([id, name, value]) => {
  const node = window.app.graph.getNodeById(id);
  node.widgets.find((w) => w.name === name).setValue(value, { e: null, node, canvas: window.app.canvas });
}"""
# The canvas snaps typed numbers to the widget's step (frames to 8k+1, sizes to 32), so bad sizes
# reach the graph from workflow files and links: load the graph back with the values replaced.
# Node ids compared as strings: frontend 1.49 (ComfyUI v0.33) gives live nodes string ids and writes
# numbers when it serializes.
LOAD_WITH_VALUES = """async ([id, values]) => {
  const data = window.app.graph.serialize();
  data.nodes.find((n) => String(n.id) === String(id)).widgets_values = values;
  await window.app.loadGraphData(data);
}"""
STATUS = """(id) => {
  const widget = window.app.graph.getNodeById(id)?.widgets?.find((w) => w.name === "ltx2quant_vram");
  return widget ? { text: widget.element.textContent, error: widget.element.dataset.error === "true" } : null;
}"""


def set_widgets(page, node_id, **values):
    for name, value in values.items():
        page.evaluate(SET_WIDGET, [node_id, name, value])


def wait_status(page, node_id, needle: str) -> dict:
    """The status line of a node once it contains `needle` (the extension answers asynchronously)."""
    page.wait_for_function(f"(id) => ({STATUS})(id)?.text.includes({needle!r})", arg=node_id, timeout=20_000)
    return page.evaluate(STATUS, node_id)


def gib(value: int) -> str:
    return f"{value / GIB:.1f}"


def test_route_answers_like_the_estimator(server):
    query = {"policy": "nvfp4", "width": "768", "height": "512", "frames": "121", "two_stage": "false"}
    got = server.get("/ltx2_quant/estimate?" + urllib.parse.urlencode(query))
    video = {"width": 768, "height": 512, "frames": 121}

    def expected(policy, scope):
        return memory.estimate_answer(policy, video, scope=scope, capability=CPU, free_bytes=None,
                                      auto_headroom_bytes=6 * GIB)
    expected_scope = {"include": [], "exclude": [], "keep_first_blocks": 0, "keep_last_blocks": 0, "keep_audio": False}
    assert got == expected("nvfp4", expected_scope)
    # A preset's own patterns and the user's add up.
    preset = dict(query, policy="fp8-scaled-mm", scope="keep audio-to-video attention", exclude="*.ff.*")
    got = server.get("/ltx2_quant/estimate?" + urllib.parse.urlencode(preset))
    scope = {"include": [], "exclude": ["*.audio_to_video_attn.*", "*.ff.*"],
             "keep_first_blocks": 0, "keep_last_blocks": 0, "keep_audio": False}
    assert got == expected("fp8-scaled-mm", scope)
    every = dict(scope, exclude=["*.ff.*"], policy_scope=False)
    assert got["total_gib"] > expected("fp8-scaled-mm", every)["total_gib"]
    bad = server.get("/ltx2_quant/estimate?" + urllib.parse.urlencode(dict(query, frames="120", width="700")))
    assert bad["total_gib"] is None and len(bad["errors"]) == 2
    # The loader's outlier widgets: their tensors and temporaries count.
    got = server.get("/ltx2_quant/estimate?" + urllib.parse.urlencode(dict(query, smooth="0.5", low_rank="0.1")))
    with_outliers = memory.estimate_answer("nvfp4", video, scope=expected_scope, capability=CPU, free_bytes=None,
                                           auto_headroom_bytes=6 * GIB, handling=Outliers(0.5, 0.1))
    assert got == with_outliers and got["weights_gib"] > expected("nvfp4", expected_scope)["weights_gib"]
    with pytest.raises(urllib.error.HTTPError) as refused:
        server.get("/ltx2_quant/estimate?" + urllib.parse.urlencode(dict(query, low_rank="2")))
    assert refused.value.code == 400
    assert json.loads(refused.value.read())["errors"] == [
        "bad outlier parameters: low_rank must be a number from 0 to 1, got '2'"]


def test_loader_shows_the_estimate_and_latent_flags_bad_sizes(page):
    latent = page.evaluate(ADD_NODE, "EmptyLTXVLatentVideo")
    loader = page.evaluate(ADD_NODE, "LTX2QuantLoader")
    set_widgets(page, latent, width=768, height=512, length=121)
    set_widgets(page, loader, policy="fp8-scaled-mm")
    expected = memory.estimate_vram("fp8-scaled-mm", 768, 512, 121)
    status = wait_status(page, loader, f"VRAM ~ {gib(expected.total_bytes)} GiB (fp8-scaled-mm: weights "
                                       f"{gib(expected.weight_bytes)}")
    assert "768x512x121" in status["text"] and f"EmptyLTXVLatentVideo #{latent}" in status["text"]
    assert not status["error"]
    assert not wait_status(page, latent, "ok: 768x512x121, 6144 tokens")["error"]

    set_widgets(page, loader, policy="nvfp4", keep_first_blocks=2)  # the scope widgets count too
    expected = memory.estimate_vram("nvfp4", 768, 512, 121, scope={"keep_first_blocks": 2})
    wait_status(page, loader, f"VRAM ~ {gib(expected.total_bytes)} GiB (nvfp4: weights {gib(expected.weight_bytes)}")
    set_widgets(page, loader, low_rank=0.5)  # the outlier widgets too
    branched = memory.estimate_vram("nvfp4", 768, 512, 121, scope={"keep_first_blocks": 2},
                                    handling=Outliers(low_rank_bytes=0.5))
    assert gib(branched.weight_bytes) != gib(expected.weight_bytes)
    wait_status(page, loader, f"VRAM ~ {gib(branched.total_bytes)} GiB (nvfp4: weights {gib(branched.weight_bytes)}")
    set_widgets(page, loader, low_rank=0.0)

    page.evaluate(LOAD_WITH_VALUES, [latent, [768, 512, 120, 1]])
    status = wait_status(page, latent, "frames must be 8k+1 (e.g. 113 or 121), got 120")
    assert status["error"]
    assert wait_status(page, loader, "VRAM not estimated for 768x512x120: frames must be 8k+1")["error"]

    page.evaluate(LOAD_WITH_VALUES, [latent, [700, 512, 121, 1]])
    assert wait_status(page, latent, "width must be a multiple of 32, got 700 (e.g. 672 or 704)")["error"]
    assert wait_status(page, loader, "VRAM not estimated for 700x512x121: width must be")["error"]
    set_widgets(page, latent, width=1536, height=1024)
    set_widgets(page, loader, policy="auto", keep_first_blocks=0)
    expected = memory.estimate_vram("bf16", 1536, 1024, 121)  # auto on this CPU-only server picks bf16
    wait_status(page, loader, f"VRAM ~ {gib(expected.total_bytes)} GiB (auto -> bf16")
    # The status line is display only: neither in the prompt nor in the saved workflow.
    prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    assert prompt[str(loader)]["inputs"]["policy"] == "auto"
    assert not any("ltx2quant_vram" in node["inputs"] for node in prompt.values())
    saved = page.evaluate("(id) => window.app.graph.serialize().nodes.find((n) => String(n.id) === String(id))"
                          ".widgets_values", latent)
    assert saved == [1536, 1024, 121, 1]
    assert not page.errors


def test_two_stage_sampler_checks_multiples_of_64(page):
    if not page.evaluate("() => !!window.LiteGraph.registered_node_types.LTX2QuantTwoStageSampler"):
        pytest.skip("this pack has no LTX2QuantTwoStageSampler node")
    page.evaluate("() => window.app.graph.clear()")
    sampler = page.evaluate(ADD_NODE, "LTX2QuantTwoStageSampler")
    wait_status(page, sampler, "no EmptyLTXVLatentVideo in the graph")
    latent = page.evaluate(ADD_NODE, "EmptyLTXVLatentVideo")
    loader = page.evaluate(ADD_NODE, "LTX2QuantLoader")
    set_widgets(page, loader, policy="fp8-scaled-mm")
    set_widgets(page, latent, width=768, height=544, length=121)  # fine for one stage, not for two
    needle = "height must be a multiple of 64 for the two-stage flow, got 544 (e.g. 512 or 576)"
    assert wait_status(page, sampler, needle)["error"]
    assert wait_status(page, latent, needle)["error"]
    set_widgets(page, latent, height=512)
    assert not wait_status(page, sampler, "ok: 768x512x121")["error"]
    expected = memory.estimate_vram("fp8-scaled-mm", 768, 512, 121, two_stage=True)
    wait_status(page, loader, f"VRAM ~ {gib(expected.total_bytes)} GiB")
    assert "two-stage" in page.evaluate(STATUS, loader)["text"]
    assert not page.errors


WORKFLOWS = sorted(glob.glob(os.path.join(REPO, "example_workflows", "*.json")))
# Each node's box as the canvas draws it: its title bar sits above `pos`.
BOXES = """() => (window.app.graph._nodes ?? window.app.graph.nodes).map((n) => ({
  id: String(n.id), type: n.type,
  box: [n.pos[0], n.pos[1] - window.LiteGraph.NODE_TITLE_HEIGHT, n.size[0], n.size[1] + window.LiteGraph.NODE_TITLE_HEIGHT],
}))"""
GROUPS = """() => (window.app.graph._groups ?? window.app.graph.groups ?? []).map((g) => ({
  title: g.title, box: [...(g._bounding ?? g.bounding)],
}))"""


def intersect(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def overlaps(items) -> list[tuple[str, str]]:
    return [(f"{a.get('type', a.get('title'))} #{a.get('id', '')}", f"{b.get('type', b.get('title'))} #{b.get('id', '')}")
            for i, a in enumerate(items) for b in items[i + 1:] if intersect(a["box"], b["box"])]


def inside(inner, outer) -> bool:
    return (outer[0] <= inner[0] and inner[0] + inner[2] <= outer[0] + outer[2]
            and outer[1] <= inner[1] and inner[1] + inner[3] <= outer[1] + outer[3])


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_example_workflow_opens_without_overlapping_nodes(page, server, path):
    """Opened in the frontend, no two nodes of an example workflow overlap, neither as loaded nor once the
    extension's lines under the loader, the latent and the sampler have rendered; the groups read left
    to right in the order the graph runs, each node inside one."""
    from scripts.make_workflows import runs_on
    version = server.get("/system_stats")["system"]["comfyui_version"]
    stem = os.path.basename(path)[: -len(".json")]
    if not runs_on(stem, version):
        pytest.skip(f"needs a newer ComfyUI than {version}")
    with open(path) as f:
        workflow = json.load(f)
    page.evaluate("async (data) => { await window.app.loadGraphData(data); }", workflow)
    loaded = page.evaluate(BOXES)
    assert sorted(n["id"] for n in loaded) == sorted(str(n["id"]) for n in workflow["nodes"])
    assert overlaps(loaded) == []
    by_type = {n["type"]: n["id"] for n in workflow["nodes"]}
    wait_status(page, by_type["LTX2QuantLoader"], "VRAM ~")
    wait_status(page, by_type["EmptyLTXVLatentVideo"], "ok: 768x512x121")
    wait_status(page, by_type["LTX2QuantTwoStageSampler"], "ok: 768x512x121")
    rendered = page.evaluate(BOXES)
    assert overlaps(rendered) == []
    groups = page.evaluate(GROUPS)
    assert [g["title"] for g in sorted(groups, key=lambda g: g["box"][0])] == ["Load", "Condition", "Sample", "Decode"]
    assert overlaps(groups) == []
    for node in rendered:
        assert sum(inside(node["box"], g["box"]) for g in groups) == 1, node
    assert not page.errors
