"""GET /ltx2_quant/estimate: the VRAM estimate and size checks the web extension shows, as JSON.
The formula and the rules live in quant/memory.py and quant/sampling.py; the frontend never repeats them."""

from __future__ import annotations

import asyncio

import comfy.model_management
from aiohttp import web
from server import PromptServer

from ..quant import memory
from ..quant.capability import capability
from .loader import scope_options
from .model_io import ACTIVATION_HEADROOM, connectors_stream
from .ops import compute_device

ESTIMATE_ROUTE = "/ltx2_quant/estimate"


# One estimate computes at a time: requests in parallel would each hold a thread contending for the
# GIL with the prompt being sampled (40 of them delayed a 0.56 s prompt to 25 s).
ESTIMATE_LOCK = asyncio.Lock()
MAX_KEPT_BLOCKS = 48  # the loader's keep_first_blocks / keep_last_blocks widgets' maximum


def _kept_blocks(query, name: str) -> int:
    raw = query.get(name) or "0"
    if not (len(raw) <= 2 and raw.isascii() and raw.isdigit()) or int(raw) > MAX_KEPT_BLOCKS:
        raise ValueError(f"{name} must be a whole number from 0 to {MAX_KEPT_BLOCKS}, got {raw[:20]!r}")
    return int(raw)


def query_scope(query) -> dict:
    """The loader's scope widgets, as the web extension sends them, as `get_policy` scope changes."""
    return scope_options(query.get("scope", "policy default"), query.get("include", ""), query.get("exclude", ""),
                         _kept_blocks(query, "keep_first_blocks"), _kept_blocks(query, "keep_last_blocks"),
                         query.get("keep_audio", "false").lower() == "true")


async def estimate(request: web.Request) -> web.Response:
    try:
        scope = query_scope(request.query)
    except (KeyError, ValueError) as e:
        return web.json_response({"errors": [f"bad scope parameters: {e}"]}, status=400)
    device = compute_device()
    free = comfy.model_management.get_free_memory(device) if device.type == "cuda" else None
    query = dict(request.query)
    # A GPU server where the loader would keep the text connectors resident (--gpu-only, --highvram,
    # unified memory): estimate that. A CPU-only server estimates for an FP8 GPU, where they stream.
    if device.type != "cpu" and not connectors_stream(device, True):
        query["text_connectors_on_cpu"] = "false"
    async with ESTIMATE_LOCK:
        answer = await asyncio.to_thread(memory.estimate_answer, query, scope, capability(device), free,
                                         ACTIVATION_HEADROOM)
    return web.json_response(answer)


def register() -> None:
    PromptServer.instance.routes.get(ESTIMATE_ROUTE)(estimate)
