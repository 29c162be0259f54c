"""Test-only fault injection inside a real ComfyUI server (copied into its custom_nodes by
tests/integration/faults.py; it defines no nodes, only routes):

- POST /ltx2_quant_test/pause {"node": id, "at": step}: the next time node `id` reports progress `step`,
  hold it there until someone presses Cancel (POST /interrupt); GET /ltx2_quant_test/pause says whether
  it got there. Cancel thus lands at a known point, in the middle of the node's work.
- POST /ltx2_quant_test/oom {"where": "sampling" | "quantizing"}: the next model layer call, or the next
  layer quantization, raises torch.OutOfMemoryError once (a CPU has no GPU memory to run out of).
- GET /ltx2_quant_test/memory: the server's resident memory and how many models ComfyUI keeps loaded;
  with ?tensors=1 also the tensors Python still holds.
"""

from __future__ import annotations

import gc
import sys
import time

import torch
from aiohttp import web

import comfy.model_management
import comfy.ops
import comfy.utils
from comfy_execution.utils import get_executing_context
from server import PromptServer

PAUSE_LIMIT_S = 120
_pause: dict = {"node": None, "at": None, "reached": False}
_oom: dict = {"where": None}


def _fake_oom(where: str) -> None:
    if _oom["where"] == where:
        _oom["where"] = None
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by the test)")


_update_absolute = comfy.utils.ProgressBar.update_absolute


def update_absolute(self, value, total=None, preview=None):
    context = get_executing_context()
    if _pause["node"] is not None and context is not None and context.node_id == _pause["node"] \
            and value == _pause["at"]:
        _pause.update(node=None, reached=True)
        deadline = time.monotonic() + PAUSE_LIMIT_S
        while not comfy.model_management.processing_interrupted() and time.monotonic() < deadline:
            time.sleep(0.02)
    return _update_absolute(self, value, total, preview)


comfy.utils.ProgressBar.update_absolute = update_absolute

_run_every_op = comfy.ops.run_every_op


def run_every_op():  # called by every layer of the pack's quantized Linear, in the model's forward
    _fake_oom("sampling")
    return _run_every_op()


comfy.ops.run_every_op = run_every_op


def _pack_weights_modules():
    return [m for name, m in list(sys.modules.items())
            if name.endswith(".quant.weights") and hasattr(m, "quantize_weight")]


def _arm_quantizing_oom() -> None:
    for module in _pack_weights_modules():
        if not getattr(module.quantize_weight, "ltx2_quant_fault", False):
            original = module.quantize_weight

            def quantize_weight(*args, original=original, **kwargs):
                _fake_oom("quantizing")
                return original(*args, **kwargs)
            quantize_weight.ltx2_quant_fault = True
            module.quantize_weight = quantize_weight


routes = PromptServer.instance.routes


@routes.post("/ltx2_quant_test/pause")
async def arm_pause(request):
    body = await request.json()
    _pause.update(node=str(body["node"]), at=int(body["at"]), reached=False)
    return web.json_response({})


@routes.get("/ltx2_quant_test/pause")
async def pause_state(request):
    return web.json_response({"reached": _pause["reached"]})


@routes.post("/ltx2_quant_test/oom")
async def arm_oom(request):
    body = await request.json()
    if body["where"] == "quantizing":
        _arm_quantizing_oom()
    _oom["where"] = body["where"]
    return web.json_response({})


@routes.get("/ltx2_quant_test/memory")
async def memory(request):
    with open("/proc/self/status") as f:
        rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    answer = {"rss_bytes": rss_kib * 1024, "loaded_models": len(comfy.model_management.current_loaded_models)}
    if request.query.get("tensors"):
        gc.collect()
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
        answer.update(tensors=len(tensors), tensor_bytes=sum(_nbytes(t) for t in tensors))
    return web.json_response(answer)


def _nbytes(tensor: torch.Tensor) -> int:
    try:
        return 0 if tensor.is_meta else tensor.nelement() * tensor.element_size()
    except RuntimeError:  # a tensor subclass without storage of its own (e.g. a nested latent)
        return 0


NODE_CLASS_MAPPINGS: dict = {}
