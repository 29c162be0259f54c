"""One rank of multi-GPU sampling, in its own process (started by nodes/multi_gpu_entry.py): it joins the
process group (NCCL on GPUs, gloo on the CPU), takes the model the coordinator ships once, and runs the
sequence-parallel forward for every step it is sent. Rank 0 sends the whole output back."""

from __future__ import annotations

import datetime
import io
import pickle

import torch
import torch.distributed as dist

from ..quant.attention import IMPLEMENTATIONS
from ..quant.sequence_parallel import SequenceGroup
from ..quant.worker_pool import serve
from . import ops
from .attention_override import comfy_override
from .sequence_parallel_ltx import SequenceParallelAttention, sharded_forward

OPS_CLASS = "ltx2_quant-ops"
# Built by make_ops inside a function, so pickle cannot name them: they travel as persistent ids.
LOCAL_PREFIX = "make_ops.<locals>."
TEXT_CONNECTORS = ("video_embeddings_connector", "audio_embeddings_connector")
IDENTITY = "ltx2_quant-identity"
# ComfyUI's caption projections where the model has none: `lambda a: a`, which pickle cannot name.
IDENTITY_LAMBDAS = ("LTXBaseModel._init_common_components.<locals>.<lambda>",
                    "LTXAVModel._init_model_components.<locals>.<lambda>")


def identity(value):
    return value


class ModelUnpickler(pickle.Unpickler):
    """Reads the coordinator's messages; the model's op classes resolve to `namespace` (make_ops here)."""

    def __init__(self, data: bytes, namespace: type):
        super().__init__(io.BytesIO(data))
        self.namespace = namespace

    def persistent_load(self, pid):
        kind, qualname = pid
        if kind == IDENTITY:
            return identity
        if kind != OPS_CLASS:
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        target = self.namespace
        for part in qualname[len(LOCAL_PREFIX):].split(".")[1:]:
            target = getattr(target, part)
        return target


def place_model(model: torch.nn.Module, device: torch.device, compile_kwargs: dict | None):
    """The shipped model on this rank's device. The text connectors stay behind: they run in the
    coordinator when the prompt is encoded, never in the transformer's forward."""
    for name in TEXT_CONNECTORS:
        if hasattr(model, name):
            setattr(model, name, torch.nn.Module())
    model.to(device)
    if compile_kwargs:
        # As Compile Blocks does on one GPU: each block compiled alone, the same options.
        for index, block in enumerate(model.transformer_blocks):
            model.transformer_blocks[index] = torch.compile(block, **compile_kwargs)
    return model


def to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, list):
        return [to_cpu(v) for v in value]
    return value


def main(rank: int, world: int, conn, device: str, rendezvous: str, timeout_s: float) -> None:
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=rendezvous, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    state = {}

    def handle(kind, value):
        if kind == "model":
            model, compile_kwargs, mode = value
            state["model"] = place_model(model, device, compile_kwargs)
            state["attention"] = SequenceParallelAttention(SequenceGroup(None, rank, world, mode))
            return None
        if kind == "step":
            args, kwargs, attention_name = value
            options = kwargs.get("transformer_options", {})
            if attention_name is not None:
                options["optimized_attention_override"] = comfy_override(IMPLEMENTATIONS[attention_name])
            with torch.inference_mode():
                out = sharded_forward(state["model"], state["attention"], *to_device(args, device),
                                      **to_device(kwargs, device))
            return to_cpu(out) if rank == 0 else None
        if kind == "peak_memory":  # bytes allocated at most since the last ask (bench/bench_multi_gpu.py)
            if device.type != "cuda":
                return 0
            peak = torch.cuda.max_memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            return peak
        raise ValueError(f"unknown message {kind!r}")

    namespace = ops.make_ops(device)
    try:
        serve(conn, handle, lambda data: ModelUnpickler(data, namespace).load())
    finally:
        dist.destroy_process_group()
