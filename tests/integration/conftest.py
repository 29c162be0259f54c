"""Shared fixtures of the real-ComfyUI integration tests. Each module defines `base`, its own model
folder; `server` is a ComfyUI with the pack over it (modules that need another server override it).

With LTX2Q_REQUIRE_COMFYUI=1 (what scripts/test and scripts/test-comfyui set for a whole run on a
ComfyUI tree, as on CI) the integration tests may not skip wholesale: the run stops after collection if
this interpreter cannot run the ComfyUI at COMFYUI_PATH, and fails at the end if none of them passed.
Single tests that skip for a feature the tree lacks (LTX-2.5 on v0.20.1) are fine."""

import os

import pytest

from support.comfy_server import ComfyServer, missing_requirements

HERE = os.path.dirname(os.path.abspath(__file__))
_outcomes: dict[str, str] = {}  # node id -> passed / failed / skipped, integration tests only


def _required() -> bool:
    return os.environ.get("LTX2Q_REQUIRE_COMFYUI") == "1"


def _integration(path) -> bool:
    return os.path.abspath(str(path)).startswith(HERE + os.sep)


def pytest_collection_modifyitems(config, items):
    if _required() and any(_integration(item.path) for item in items):
        reason = missing_requirements()
        if reason:
            pytest.exit(f"LTX2Q_REQUIRE_COMFYUI=1, but the integration tests cannot run: {reason}", returncode=1)


def pytest_runtest_logreport(report):
    # A test's outcome is its call's, or its setup's when the setup skipped or failed it.
    if _integration(report.fspath) and (report.when == "call" or (report.when == "setup" and not report.passed)):
        _outcomes[report.nodeid] = report.outcome


def pytest_sessionfinish(session, exitstatus):
    if _required() and _outcomes and "passed" not in _outcomes.values():
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    if not _required() or not _outcomes:
        return
    outcomes = list(_outcomes.values())
    counts = ", ".join(f"{outcomes.count(o)} {o}" for o in ("passed", "failed", "skipped") if o in outcomes)
    terminalreporter.write_line(f"integration tests on {os.environ.get('COMFYUI_PATH')}: {counts}")
    if "passed" not in outcomes:
        terminalreporter.write_line("FAILED: no integration test passed (they skipped wholesale)", red=True)


@pytest.fixture(scope="module")
def server(base):
    s = ComfyServer(str(base), with_pack=True)
    yield s
    s.stop()
