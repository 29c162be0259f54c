"""Advice for the user: which policy `auto` picks on a GPU, and what to do after running out of memory.

Plain text and plain numbers (no ComfyUI): the loader and the CLI show it as it is.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

from .capability import Capability

T = TypeVar("T")
GIB = 2 ** 30

# Preference order per GPU generation: fastest first, then smaller. Blackwell runs NVFP4 natively (W4A4);
# Ada and Hopper run W8A8 FP8; Turing and Ampere have INT8 tensor cores (2x bf16 on Ampere) but no FP8
# ones, and take INT8 with ConvRot, whose rotation keeps outlier channels from stretching INT8's uniform
# grid (per Linear with outliers: 0.013 error against 0.069 unrotated; bench/bench_int8.py,
# docs/BENCHMARKS.md "Linear layers"); older GPUs only expand weights per call.
AUTO_ORDER = {
    "blackwell": ("nvfp4",),
    "hopper": ("fp8-scaled-mm", "nvfp4"), "ada": ("fp8-scaled-mm", "nvfp4"),
    "ampere": ("int8-convrot", "nvfp4"), "turing": ("int8-convrot", "nvfp4"),
    "pre-turing": ("bf16", "fp8-cast", "nvfp4"),
    "cpu": ("bf16",),
}


def choose_auto_policy(cap: Capability, free_bytes: int | None, weight_bytes: dict[str, int],
                       headroom_bytes: int) -> tuple[str, str]:
    """The first policy in the device's preference order whose weights plus `headroom_bytes` (for
    activations) fit `free_bytes`, and why; the smallest one (relying on offload) if none fits."""
    order = AUTO_ORDER.get(cap.generation, AUTO_ORDER["cpu"])
    if free_bytes is None:
        return order[0], f"{cap.describe()}: {order[0]} is the fastest correct path here"
    gib = GIB
    for name in order:
        need = weight_bytes[name] + headroom_bytes
        if need <= free_bytes:
            return name, (f"{cap.describe()}: {name} is the fastest path that fits ({need / gib:.1f} GiB incl. "
                          f"{headroom_bytes / gib:.1f} GiB activations <= {free_bytes / gib:.1f} GiB free)")
    smallest = min(order, key=lambda name: weight_bytes[name])
    return smallest, (f"{cap.describe()}: nothing fits {free_bytes / gib:.1f} GiB free; {smallest} is the smallest "
                      f"({weight_bytes[smallest] / gib:.1f} GiB), ComfyUI will offload part of it")


def out_of_memory_advice(stage: str, policy: str, need_bytes: dict[str, int], total_bytes: int | None,
                         basis: str) -> str:
    """What to do after running out of GPU memory while `stage` with `policy`: the smaller policies
    whose need (`need_bytes`, per policy, computed as `basis` says) fits a GPU of `total_bytes`,
    best quality first, else the smallest one with offloading; and a smaller video."""
    gib = GIB
    current = need_bytes[policy]
    smaller = sorted((name for name in need_bytes if need_bytes[name] < current), key=need_bytes.get, reverse=True)
    fits = [name for name in smaller if total_bytes is None or need_bytes[name] <= total_bytes]
    gpu = f" on this {total_bytes / gib:.1f} GiB GPU" if total_bytes else ""
    lines = [f"LTX-2 Quant: out of GPU memory while {stage} with policy {policy}: it needs about "
             f"{current / gib:.1f} GiB ({basis}){gpu}."]
    if fits:
        lines.append("Policies that fit: " + ", ".join(f"{name} (about {need_bytes[name] / gib:.1f} GiB)"
                                                       for name in fits) + ".")
    elif smaller:
        lines.append(f"{smaller[-1]} needs the least (about {need_bytes[smaller[-1]] / gib:.1f} GiB); with it "
                     "ComfyUI keeps part of the model in system memory (slower, but it runs).")
    lines.append("A smaller video (fewer frames, lower resolution) needs less memory at any policy. "
                 "The memory of the failed run was released; the next prompt can run.")
    return " ".join(lines)


def call_or_advise_on_oom(call: Callable[[], T], advice: Callable[[], str], release: Callable[[], None]) -> T:
    """call(); if it runs out of GPU memory: release(), then torch.OutOfMemoryError(advice()). The
    original error is dropped first: its traceback holds the failed call's frames and with them
    every tensor it allocated, which release() could not free while it lives."""
    try:
        return call()
    except torch.OutOfMemoryError:
        pass
    release()
    raise torch.OutOfMemoryError(advice())


def text_encoder_out_of_memory_advice(policy: str, weight_bytes: dict[str, int], total_bytes: int | None) -> str:
    """What to do after the text encoder ran out of GPU memory encoding a prompt at `policy`: the smaller
    text-encoder policies (`weight_bytes`: the encoder's weights per policy) that fit a GPU of `total_bytes`,
    and the CPU."""
    current = weight_bytes[policy]
    smaller = sorted((name for name in weight_bytes if weight_bytes[name] < current), key=weight_bytes.get,
                     reverse=True)
    fits = [name for name in smaller if total_bytes is None or weight_bytes[name] < total_bytes]
    gpu = f" on this {total_bytes / GIB:.1f} GiB GPU" if total_bytes else ""
    lines = [f"LTX-2 Quant: out of GPU memory encoding the prompt with the text encoder at policy {policy} "
             f"({current / GIB:.1f} GiB of weights){gpu}."]
    if fits:
        lines.append("Smaller text encoders (the Text Encoder Loader's policy): " + ", ".join(
            f"{name} ({weight_bytes[name] / GIB:.1f} GiB)" for name in fits) + ".")
    lines.append("Or set its device to cpu: slower, and no GPU memory. The memory of the failed encode was "
                 "released; the next prompt can run.")
    return " ".join(lines)
