"""Shared fixtures of the real-ComfyUI integration tests. Each module defines `base`, its own model
folder; `server` is a ComfyUI with the pack over it (modules that need another server override it)."""

import pytest

from comfy_server import ComfyServer


@pytest.fixture(scope="module")
def server(base):
    s = ComfyServer(str(base), with_pack=True)
    yield s
    s.stop()
