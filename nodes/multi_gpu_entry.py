"""What each multi-GPU worker process runs first (by path, through runpy: nothing of the pack is
importable in a fresh process yet). The coordinator's globals arrive as init_globals: rank, world, conn,
pack_name, pack_dir, comfy_args, device. It sets ComfyUI's arguments and the GPU before anything imports
comfy.model_management (which picks its device at import), registers the pack under the name ComfyUI gave
it (so pickled classes of the pack resolve), then serves (nodes/multi_gpu_worker.py)."""

import importlib
import importlib.util
import os
import sys

import torch

globals_ = globals()
if globals_["device"].startswith("cuda"):
    torch.cuda.set_device(torch.device(globals_["device"]))
import comfy.cli_args  # noqa: E402

for _key, _value in globals_["comfy_args"].items():
    setattr(comfy.cli_args.args, _key, _value)
if globals_["pack_name"] not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        globals_["pack_name"], os.path.join(globals_["pack_dir"], "__init__.py"),
        submodule_search_locations=[globals_["pack_dir"]])
    _pack = importlib.util.module_from_spec(_spec)
    sys.modules[globals_["pack_name"]] = _pack
    _spec.loader.exec_module(_pack)
importlib.import_module(globals_["pack_name"] + ".nodes.multi_gpu_worker").main(
    globals_["rank"], globals_["world"], globals_["conn"], globals_["device"], globals_["rendezvous"],
    globals_["timeout_s"])
