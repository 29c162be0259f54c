"""Multi-GPU sampling as a model patch (plain functions; the node is nodes/multi_gpu_nodes.py).

ComfyUI runs one process. The patched model stays in host memory there (its load device becomes the CPU,
so ComfyUI never puts the 20 GB transformer on a GPU) and the process only coordinates: at each denoising
call a DIFFUSION_MODEL wrapper hands the inputs to N worker processes, one per GPU (quant/worker_pool.py,
nodes/multi_gpu_worker.py), which run the sequence-parallel forward (nodes/sequence_parallel_ltx.py) over
NCCL and return the output. ComfyUI's own process never joins the process group, so a worker that hangs
or dies cannot take the server with it: every wait here is bounded and the pool is stopped on any failure.

The weights travel once, from shared host memory, when the first step runs (again only when they change:
a LoRA patched in, another model); the workers keep them between prompts. Compile Blocks and the
Attention patch are read from the model when this patch is applied (so connect it after them), and
each worker compiles its own blocks with the same options."""

from __future__ import annotations

import inspect
import logging
from multiprocessing.reduction import ForkingPickler
import os
import shutil
import sys
import tempfile
import weakref

import torch

import comfy.cli_args
import comfy.model_management
from comfy.patcher_extension import WrappersMP
from comfy_api.torch_helpers.torch_compile import COMPILE_KEY, TORCH_COMPILE_KWARGS

from ..quant.sequence_parallel import MODES, ULYSSES
from ..quant.worker_pool import WorkerFailed, WorkerPool
from .multi_gpu_worker import IDENTITY, IDENTITY_LAMBDAS, LOCAL_PREFIX, OPS_CLASS
from .sequence_parallel_ltx import attention_role_patches, check_model

log = logging.getLogger("ltx2_quant")
MULTI_GPU = "ltx2_quant_multi_gpu"  # model_options key: the patch's settings (the other patches refuse to follow it)
WRAPPER_KEY = "ltx2_quant_multi_gpu"
ENTRY_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multi_gpu_entry.py")
CANCEL_GRACE_S = 10.0  # Cancel lets the step in flight finish this long (the workers keep the model), then kills
# transformer_options entries that stay in the coordinator: ComfyUI's callables and bookkeeping.
LOCAL_OPTIONS = {"wrappers", "callbacks", "patches", "patches_replace", "optimized_attention_override"}
_active = None  # the one runner whose pool holds the GPUs (a new one stops the old pool)


def worker_devices(gpus: int, device: torch.device) -> list[str]:
    """One device per rank, ComfyUI's own first. A CPU ComfyUI (--cpu) gets CPU ranks over gloo: the same
    code path, for tests; it gains no speed."""
    if gpus < 1:
        raise ValueError(f"GPUs must be at least 1, got {gpus}")
    if device.type != "cuda":
        return ["cpu"] * gpus
    visible = torch.cuda.device_count()
    if visible < gpus:
        raise ValueError(f"LTX-2 Multi-GPU asks for {gpus} GPUs but this ComfyUI sees {visible} "
                         f"(CUDA_VISIBLE_DEVICES / --cuda-device limit what it sees)")
    first = device.index or 0
    return [f"cuda:{(first + r) % visible}" for r in range(gpus)]


def pack_identity() -> tuple[str, str]:
    """(the module name ComfyUI gave this pack, its folder): the workers register the pack the same way."""
    name = __package__.rsplit(".", 1)[0]
    return name, os.path.dirname(os.path.abspath(sys.modules[name].__file__))


class ModelPickler(ForkingPickler):
    """Pickles the diffusion model for the workers: the op classes make_ops builds go as persistent ids
    (the worker builds its own), tensors by shared memory."""

    def persistent_id(self, obj):
        if isinstance(obj, type) and obj.__qualname__.startswith(LOCAL_PREFIX):
            return OPS_CLASS, obj.__qualname__
        if callable(obj) and getattr(obj, "__qualname__", None) in IDENTITY_LAMBDAS:
            return IDENTITY, obj.__qualname__
        return None


def plain(value) -> bool:
    """Whether a value can be sent to the workers as data."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.dtype, torch.device)):
        return True
    if isinstance(value, (list, tuple)):
        return all(plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int, tuple)) and plain(v) for k, v in value.items())
    return False


def step_inputs(arguments: dict) -> dict:
    """The forward's arguments as data for the workers (CPU tensors). Anything the workers cannot run
    the same way is refused by name rather than dropped."""
    options = dict(arguments.get("transformer_options") or {})
    if (options.get("patches_replace") or {}).get("dit"):
        raise ValueError("LTX-2 Multi-GPU cannot run another node's transformer-block replacement "
                         "(patches_replace 'dit') in its workers; remove that patch or sample on one GPU")
    sent = {k: v for k, v in options.items() if k not in LOCAL_OPTIONS and plain(v)}
    arguments = {**arguments, "transformer_options": sent}
    for key, value in arguments.items():
        if not plain(value):
            raise ValueError(f"LTX-2 Multi-GPU cannot send the model input {key!r} ({type(value).__name__}) "
                             f"to its workers")
    return arguments


class MultiGPURunner:
    """The coordinator of one patched model: its worker pool and what the workers hold."""

    def __init__(self, base_model, gpus: int, mode: str, devices: list[str], compile_kwargs: dict | None,
                 attention_name: str | None, timeout_s: float):
        self.base_model = weakref.ref(base_model)  # the patcher holds this runner: no cycle through it
        self.gpus, self.mode, self.devices = gpus, mode, devices
        self.compile_kwargs, self.attention_name, self.timeout_s = compile_kwargs, attention_name, timeout_s
        self.pool: WorkerPool | None = None
        self.shipped = None  # which weights the workers hold
        weakref.finalize(self, MultiGPURunner._stop_pool, self.__dict__)

    @staticmethod
    def _stop_pool(state: dict) -> None:
        if state.get("pool") is not None:
            state["pool"].stop()
            state["pool"] = None
        if state.get("rendezvous_dir"):
            shutil.rmtree(state.pop("rendezvous_dir"), ignore_errors=True)

    def close(self) -> None:
        MultiGPURunner._stop_pool(self.__dict__)
        self.shipped = None

    def start(self) -> None:
        global _active
        if _active is not None and _active is not self:
            _active.close()
        _active = self
        name, folder = pack_identity()
        self.rendezvous_dir = tempfile.mkdtemp(prefix="ltx2_quant-rendezvous-")
        rendezvous = "file://" + os.path.join(self.rendezvous_dir, "store")
        setup = {"pack_name": name, "pack_dir": folder, "comfy_args": vars(comfy.cli_args.args),
                 "rendezvous": rendezvous, "timeout_s": self.timeout_s}
        self.pool = WorkerPool(ENTRY_SCRIPT, [{**setup, "device": device} for device in self.devices],
                               start_timeout_s=self.timeout_s)
        self.shipped = None

    def weights_version(self, diffusion_model) -> tuple:
        """Which weights the coordinator's model has: the model object and the id ComfyUI gives the set of
        weight patches it applied (a LoRA added, removed or re-weighted gives another). Read per step, so
        it must cost nothing next to one (no walk over the model's thousands of tensors)."""
        return id(diffusion_model), getattr(self.base_model(), "current_weight_patches_uuid", None)

    def ensure(self, diffusion_model) -> None:
        if self.pool is not None and not self.pool.alive():
            dead = [r for r, p in enumerate(self.pool.processes) if not p.is_alive()]
            codes = [self.pool.processes[r].exitcode for r in dead]
            self.close()
            raise WorkerFailed(f"GPU worker(s) {dead} of {self.gpus} exited (codes {codes}); the other workers "
                               f"were stopped, and the next run starts them again")
        if self.pool is None:
            self.start()
        version = self.weights_version(diffusion_model)
        if version != self.shipped:
            self.run("model", (diffusion_model, self.compile_kwargs, self.mode), ModelPickler)
            self.shipped = version

    def run(self, kind: str, value, pickler: type | None = None):
        """Send one message to every worker and wait for all of them (bounded); the pool is stopped on any
        failure, and on a Cancel that the step in flight does not finish within CANCEL_GRACE_S."""
        try:
            self.pool.send_all(kind, value, pickler)
            values = self.pool.receive_all(self.timeout_s, "done", comfy.model_management.processing_interrupted,
                                           CANCEL_GRACE_S)
        except BaseException:
            self.close()
            comfy.model_management.throw_exception_if_processing_interrupted()
            raise
        comfy.model_management.throw_exception_if_processing_interrupted()
        return values

    def __call__(self, executor, *args, **kwargs):
        """The DIFFUSION_MODEL wrapper: the forward of executor.class_obj, run by the workers."""
        model = executor.class_obj
        check_model(model)
        bound = inspect.signature(type(model)._forward).bind(model, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop("self")
        arguments.update(arguments.pop("kwargs", {}))
        comfy.model_management.throw_exception_if_processing_interrupted()
        inputs = step_inputs(arguments)
        self.ensure(model)
        out = self.run("step", ((), inputs, self.attention_name))[0]
        like = args[0][0] if isinstance(args[0], list) else args[0]
        return [t.to(like.device) for t in out] if isinstance(out, list) else out.to(like.device)


def runner_of(patcher) -> MultiGPURunner:
    """The coordinator of a model patched by patch_multi_gpu (the bench and tests reach its pool)."""
    runners = patcher.get_wrappers(WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    if not runners:
        raise ValueError("This model is not patched for multi-GPU sampling")
    return runners[0]


def patch_multi_gpu(patcher, gpus: int, mode: str = ULYSSES, timeout_s: float = 900.0):
    """(a clone of `patcher` that samples on `gpus` workers, report line)."""
    if mode not in MODES:
        raise ValueError(f"Unknown multi-GPU mode {mode!r}; choose one of {MODES}")
    check_model(patcher.model.diffusion_model)
    if MULTI_GPU in patcher.model_options:
        raise ValueError("This model is already patched for multi-GPU sampling")
    devices = worker_devices(gpus, torch.device(patcher.load_device))
    override = patcher.model_options.get("transformer_options", {}).get("optimized_attention_override")
    attention_name = getattr(override, "attention", None)
    if override is not None and attention_name is None:
        raise ValueError("LTX-2 Multi-GPU runs the pack's attention kernels in its workers; this model has "
                         "another attention override, which they cannot run")
    clone = patcher.clone()
    compile_kwargs = clone.model_options.get(TORCH_COMPILE_KWARGS)
    clone.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, COMPILE_KEY)  # the workers compile instead
    clone.model_options.pop(TORCH_COMPILE_KWARGS, None)
    for key, forward in attention_role_patches(clone.model.diffusion_model).items():
        clone.add_object_patch(key, forward)
    runner = MultiGPURunner(clone.model, gpus, mode, devices, compile_kwargs, attention_name, timeout_s)
    clone.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, runner)
    clone.model_options[MULTI_GPU] = {"gpus": gpus, "mode": mode, "devices": devices}
    clone.load_device = torch.device("cpu")  # ComfyUI keeps the transformer in host memory; the workers hold it
    text = (f"multi-GPU: {gpus} x {devices[0].split(':')[0]} ({', '.join(devices)}), {mode}"
            + (", blocks compiled in each worker" if compile_kwargs else "")
            + (f", attention {attention_name}" if attention_name else ""))
    log.info("LTX-2 Quant: %s", text)
    return clone, text
