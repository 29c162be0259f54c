"""The pack as ComfyUI imports it, for benches and checks that run outside a ComfyUI server.

ComfyUI imports a custom node folder as a package named after the folder, so the pack's relative
imports (`from ..quant import ...`) work only inside one. `import_pack()` puts ComfyUI's source tree
(COMFYUI_PATH) on sys.path, runs it on the CPU when asked (ComfyUI otherwise looks for a CUDA
device), and imports this repository as the package PACKAGE. Put this folder on sys.path to import
this module, not the repository root: `quant` imported as a top-level package too would register its
torch custom ops twice.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "ltx2_quant"


def import_pack(comfyui_path: str | None = None, cpu: bool = False) -> ModuleType:
    """The pack's package (imported once per process), with ComfyUI importable; `cpu` sets ComfyUI's --cpu."""
    path = comfyui_path or os.environ.get("COMFYUI_PATH")
    if not path:
        raise RuntimeError("set COMFYUI_PATH to a ComfyUI source tree")
    if path not in sys.path:
        sys.path.insert(0, path)
    if cpu:
        from comfy.cli_args import args
        args.cpu = True
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, os.path.join(REPO, "__init__.py"),
                                                      submodule_search_locations=[REPO])
        pack = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = pack
        spec.loader.exec_module(pack)
    return sys.modules[PACKAGE]
