"""Test-side helpers for the fault-injection routes of comfy_fault_nodes.py: install it next to the
pack before a server starts, queue a graph without waiting, press Cancel at a known point."""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
import uuid

from .comfy_server import HERE, ComfyServer


def start_server(base: str) -> ComfyServer:
    """A server with the pack and the fault-injection routes."""
    nodes = os.path.join(base, "custom_nodes_pack")
    os.makedirs(nodes, exist_ok=True)
    shutil.copy(os.path.join(HERE, "comfy_fault_nodes.py"), os.path.join(nodes, "ltx2q_fault_nodes.py"))
    return ComfyServer(base, with_pack=True)


def post(server: ComfyServer, route: str, body: dict) -> bytes:
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{route}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return r.read()


def queue(server: ComfyServer, graph: dict) -> str:
    body = {"prompt": graph, "client_id": uuid.uuid4().hex}
    return json.loads(post(server, "/prompt", body))["prompt_id"]


def wait(server: ComfyServer, prompt_id: str, timeout: float = 300.0) -> dict:
    """The prompt's history entry once it has finished, successfully or not."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = server.get(f"/history/{prompt_id}")
        if prompt_id in history:
            return history[prompt_id]
        time.sleep(0.2)
    raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s\n{server.tail()}")


def error_message(server: ComfyServer, graph: dict) -> str:
    """Run a graph that must fail: the exception type and message ComfyUI reports to the user."""
    entry = wait(server, queue(server, graph))
    for kind, data in entry["status"]["messages"]:
        if kind == "execution_error":
            return f"{data['exception_type']}: {data['exception_message']}"
    raise AssertionError(f"the graph did not fail: {entry['status']}")


def cancel_at(server: ComfyServer, graph: dict, node: str, step: int) -> dict:
    """Run `graph`, press Cancel (POST /interrupt) while `node` is at progress `step`, and return
    the prompt's history entry."""
    post(server, "/ltx2_quant_test/pause", {"node": node, "at": step})
    prompt_id = queue(server, graph)
    deadline = time.time() + 300
    while not server.get("/ltx2_quant_test/pause")["reached"]:
        if time.time() > deadline or prompt_id in server.get(f"/history/{prompt_id}"):
            raise AssertionError(f"node {node} never reached progress {step}\n{server.tail()}")
        time.sleep(0.1)
    post(server, "/interrupt", {})
    return wait(server, prompt_id)


def interrupted(entry: dict) -> bool:
    return any(kind == "execution_interrupted" for kind, _ in entry["status"]["messages"])


def free(server: ComfyServer, timeout: float = 60.0) -> None:
    """ComfyUI's "Unload models" + "Free cache" (POST /free). The prompt worker acts on it when it
    is next idle: wait until it has unloaded the models, then for the cache reset that follows."""
    post(server, "/free", {"unload_models": True, "free_memory": True})
    deadline = time.time() + timeout
    while server.get("/ltx2_quant_test/memory")["loaded_models"]:
        if time.time() > deadline:
            raise TimeoutError(f"ComfyUI did not unload its models within {timeout} s\n{server.tail()}")
        time.sleep(0.2)
    time.sleep(0.5)
