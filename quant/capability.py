"""What a device can run: its type, CUDA compute capability and whether Triton is there.

Every kernel choice in the pack (quant.runtime's linear paths, quant.attention's implementations,
the `auto` policy) is decided from a Capability up front, so tests can ask what any GPU would run
(sm_75 Turing to sm_120 Blackwell) on a CPU machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels

TURING, AMPERE, ADA, HOPPER, BLACKWELL = (7, 5), (8, 0), (8, 9), (9, 0), (10, 0)


@dataclass(frozen=True)
class Capability:
    device_type: str
    compute_capability: tuple[int, int] | None
    triton: bool

    def at_least(self, version: tuple[int, int]) -> bool:
        return self.device_type == "cuda" and self.compute_capability >= version

    @property
    def int8_tensor_cores(self) -> bool:  # Turing sm_75 and newer (IMMA)
        return self.at_least(TURING)

    @property
    def bf16(self) -> bool:  # Ampere sm_80 and newer; Turing computes in fp16
        return self.at_least(AMPERE)

    @property
    def fp8_tensor_cores(self) -> bool:  # Ada sm_89, Hopper sm_90, Blackwell
        return self.at_least(ADA)

    @property
    def native_block_scaled(self) -> bool:  # Blackwell MXFP8/NVFP4 GEMMs
        return self.at_least(BLACKWELL) and hasattr(torch.nn.functional, "scaled_mm")

    @property
    def generation(self) -> str:
        """The GPU family a user would name (for reports and the `auto` policy)."""
        if self.device_type != "cuda":
            return self.device_type
        for version, name in ((BLACKWELL, "blackwell"), (HOPPER, "hopper"), (ADA, "ada"), (AMPERE, "ampere"),
                              (TURING, "turing")):
            if self.at_least(version):
                return name
        return "pre-turing"

    @property
    def compute_dtype(self) -> torch.dtype:
        """The 16-bit float a weight is expanded to for a 16-bit GEMM: bf16, or fp16 before Ampere."""
        return torch.bfloat16 if self.bf16 or self.device_type != "cuda" else torch.float16

    def describe(self) -> str:
        if self.device_type != "cuda":
            return self.device_type
        major, minor = self.compute_capability
        return f"cuda sm_{major}{minor}"


def capability(device: torch.device | str) -> Capability:
    device = torch.device(device)
    if device.type != "cuda":
        return Capability(device.type, None, False)
    return Capability("cuda", torch.cuda.get_device_capability(device), kernels.AVAILABLE)
