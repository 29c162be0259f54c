"""`--capability M.m` of the benchmarks: an older GPU's dispatch simulated on the card at hand.

Every CUDA capability query that picks a path (ComfyUI's `supports_fp8_compute`, the pack's
quant.capability and tile lists, Inductor's feature checks) answers the forced value, so both take the
paths of, e.g., an Ampere card; the kernels still run at this card's speed, so this times the paths,
not that card. Code generation keeps the real capability: Triton's driver and Inductor's device
interface compile for the card that runs the code, since a cubin built for sm_80 does not load on
sm_90 ("no kernel image is available for execution on the device"). A benchmark switch only.
"""

from __future__ import annotations

import torch


def parse(argv: list[str]) -> tuple[int, int] | None:
    """`--capability M.m` (or `--capability=M.m`) from a command line, read before anything asks the GPU."""
    for index, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--capability=") else (
            argv[index + 1] if arg == "--capability" and index + 1 < len(argv) else None)
        if value is not None:
            major, minor = value.split(".")
            return int(major), int(minor)
    return None


class _ForcedProperties:
    def __init__(self, real, capability: tuple[int, int]):
        self._real = real
        self.major, self.minor = capability

    def __getattr__(self, name):
        return getattr(self._real, name)


def force(capability: tuple[int, int]) -> None:
    real_properties = torch.cuda.get_device_properties

    def real_capability(device=None) -> tuple[int, int]:
        # Not torch.cuda.get_device_capability itself: it reads torch.cuda.get_device_properties when
        # called, which answers the forced value once patched.
        properties = real_properties(device)
        return properties.major, properties.minor

    if torch.cuda.is_available():
        import triton.runtime.driver
        from torch._dynamo.device_interface import CudaInterface

        def real_compute_capability(device=None) -> int:
            major, minor = real_capability(device)
            return major * 10 + minor
        # The driver binds torch.cuda.get_device_capability when it starts: give it the real one.
        triton.runtime.driver.active.get_device_capability = real_capability
        CudaInterface.get_compute_capability = staticmethod(real_compute_capability)
    torch.cuda.get_device_capability = lambda device=None: capability
    torch.cuda.get_device_properties = lambda device=None: _ForcedProperties(real_properties(device), capability)
