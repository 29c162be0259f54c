"""bench/forced_capability.py: the simulated capability reaches the path choices; code generation
(Triton's driver, Inductor's device interface) keeps the card's own."""

import importlib.util
import os
import types

import torch
import triton.runtime.driver
from torch._dynamo.device_interface import CudaInterface

_spec = importlib.util.spec_from_file_location(
    "forced_capability", os.path.join(os.path.dirname(__file__), "..", "bench", "forced_capability.py"))
forced_capability = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(forced_capability)


def test_parse_reads_both_spellings():
    assert forced_capability.parse(["bench.py", "--capability", "8.6"]) == (8, 6)
    assert forced_capability.parse(["bench.py", "--capability=7.5", "--blocks", "2"]) == (7, 5)
    assert forced_capability.parse(["bench.py", "--blocks", "2"]) is None


def test_force_answers_the_forced_capability_and_compiles_for_the_real_one(monkeypatch):
    hopper = types.SimpleNamespace(major=9, minor=0, name="H100", multi_processor_count=132)
    driver = types.SimpleNamespace()  # stands in for Triton's CUDA driver (none starts without a GPU)
    # Registered first, so that the test restores what force() replaces.
    monkeypatch.setattr(torch.cuda, "get_device_capability", torch.cuda.get_device_capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: hopper)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(CudaInterface, "get_compute_capability", CudaInterface.get_compute_capability)
    monkeypatch.setattr(triton.runtime.driver, "_active", driver)

    forced_capability.force((8, 0))

    assert torch.cuda.get_device_capability() == (8, 0)
    properties = torch.cuda.get_device_properties()
    assert (properties.major, properties.minor) == (8, 0)
    assert (properties.name, properties.multi_processor_count) == ("H100", 132)
    # torch.cuda.get_device_capability reads get_device_properties when called, so a "real" function
    # taken from it would answer sm_80 too, and Triton would build sm_80 cubins the H100 cannot load.
    assert driver.get_device_capability() == (9, 0)
    assert CudaInterface.get_compute_capability() == 90
