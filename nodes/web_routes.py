"""GET /ltx2_quant/estimate: the VRAM estimate and size checks the web extension shows, as JSON.
The formula and the rules live in quant/memory.py and quant/sampling.py; the frontend never repeats them."""

from __future__ import annotations

import asyncio
import math

import comfy.model_management
from aiohttp import web
from server import PromptServer

from ..quant import memory
from ..quant.capability import capability
from ..quant.outliers import Outliers
from ..quant.scopes import scope_options
from .model_memory import ACTIVATION_HEADROOM, connectors_stream
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


def query_outliers(query) -> Outliers:
    """The loader's smooth and low_rank widgets (fractions from 0 to 1, as the widgets allow)."""
    values = {}
    for name in ("smooth", "low_rank"):
        raw = query.get(name) or "0"
        try:
            value = float(raw) if len(raw) <= 20 else math.nan
        except ValueError:
            value = math.nan
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a number from 0 to 1, got {raw[:20]!r}")
        values[name] = value
    return Outliers(smooth_alpha=values["smooth"], low_rank_bytes=values["low_rank"])


def query_video_size(query) -> tuple[dict[str, int], list[str]]:
    """The width, height and frames of a query that are whole numbers, and why each other one is not.
    Told from the text: a size of thousands of digits never reaches int() or the arithmetic."""
    video, errors = {}, []
    for name in memory.VIDEO_SIZE_NAMES:
        raw = query.get(name, "")
        if len(raw) <= len(str(memory.MAX_VIDEO_SIZE)) and raw.isascii() and raw.isdigit():
            video[name] = int(raw)
        else:
            shown = repr(raw) if len(raw) <= 20 else repr(raw[:20]) + f"... ({len(raw):,} characters)"
            errors.append(f"{name} must be a whole number from 1 to {memory.MAX_VIDEO_SIZE:,}, got {shown}")
    return video, errors


def query_flag(query, name: str, default: bool) -> bool:
    return query.get(name, str(default)).lower() in ("1", "true", "yes", "on")


async def estimate(request: web.Request) -> web.Response:
    query = request.query
    try:
        scope = query_scope(query)
    except (KeyError, ValueError) as e:
        return web.json_response({"errors": [f"bad scope parameters: {e}"]}, status=400)
    try:
        handling = query_outliers(query)
    except ValueError as e:
        return web.json_response({"errors": [f"bad outlier parameters: {e}"]}, status=400)
    device = compute_device()
    free = comfy.model_management.get_free_memory(device) if device.type == "cuda" else None
    # A GPU server where the loader would keep the text connectors resident (--gpu-only, --highvram,
    # unified memory): estimate that. A CPU-only server estimates for an FP8 GPU, where they stream.
    connectors_on_cpu = query_flag(query, "text_connectors_on_cpu", True)
    if device.type != "cpu" and not connectors_stream(device, True):
        connectors_on_cpu = False
    video, read_errors = query_video_size(query)
    async with ESTIMATE_LOCK:
        answer = await asyncio.to_thread(
            memory.estimate_answer, query.get("policy", "auto"), video, two_stage=query_flag(query, "two_stage", False),
            nvfp4_mode=query.get("nvfp4_mode", "fast"), text_connectors_on_cpu=connectors_on_cpu, scope=scope,
            capability=capability(device), free_bytes=free, auto_headroom_bytes=ACTIVATION_HEADROOM,
            read_errors=read_errors, handling=handling)
    return web.json_response(answer)


def register() -> None:
    PromptServer.instance.routes.get(ESTIMATE_ROUTE)(estimate)
