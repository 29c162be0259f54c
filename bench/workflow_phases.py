"""Running an API-format graph through ComfyUI's node classes and splitting its time, peak VRAM and host RSS
into the phases of a video workflow (bench_workflow.py)."""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import time

import psutil  # a ComfyUI requirement
import torch

GIB = 2 ** 30
PHASES = ("load files", "text encode", "stage 1", "upsample", "stage 2", "video decode", "audio decode",
          "GPU loads/moves", "other")
# The phase each node type's own run belongs to; the pack's two-stage sampler is split inside (see hooks()).
NODE_PHASES = {
    "CheckpointLoaderSimple": "load files", "LTXAVTextEncoderLoader": "load files", "LTXVAudioVAELoader": "load files",
    "LatentUpscaleModelLoader": "load files", "LTX2QuantLoader": "load files", "LTX2QuantVAELoader": "load files",
    "LTX2QuantTextEncoderLoader": "load files", "UNETLoader": "load files", "VAELoader": "load files",
    "CLIPTextEncode": "text encode", "LTXVConditioning": "text encode",
    "LTXVLatentUpsampler": "upsample", "LTX2QuantLatentUpscale": "upsample",
    "VAEDecodeTiled": "video decode", "VAEDecode": "video decode", "LTX2QuantVAEDecode": "video decode",
    "LTXVAudioVAEDecode": "audio decode",
}


class BenchAudioLatent:
    """An empty audio latent of the audio VAE's shape (8 channels, 25 latents a second at 24 fps, 16 mel
    bins) for model sets without an audio VAE (the tiny one)."""

    FUNCTION = "make"

    def make(self, frames: int):
        return ({"samples": torch.zeros(1, 8, round(frames / 24 * 25), 16), "type": "audio"},)


def emulate_card(vram_gb: float | None, cpu: bool) -> None:
    """Set ComfyUI's arguments before its model management is imported: the CPU, or a card of `vram_gb`
    GiB on a bigger one (bench_workflow.py's doc says why both the reservation and the fraction)."""
    from comfy.cli_args import args
    if cpu or not torch.cuda.is_available():
        args.cpu = True
        return
    if vram_gb is None:
        return
    total = torch.cuda.get_device_properties(0).total_memory
    if vram_gb * GIB >= total:
        raise SystemExit(f"--vram-gb {vram_gb}: this card has only {total / GIB:.1f} GiB")
    args.reserve_vram = (total - vram_gb * GIB) / GIB
    torch.cuda.set_per_process_memory_fraction(vram_gb * GIB / total)


class Phases:
    """Seconds per phase (time inside a nested phase counts only there), peak VRAM and host RSS per phase."""

    def __init__(self):
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.peak_vram = dict.fromkeys(PHASES, 0.0)
        self.peak_rss = dict.fromkeys(PHASES, 0.0)
        self.stack: list[list] = []  # [phase, start, time spent in nested phases]
        self.process = psutil.Process()
        self.stage_runs = 0

    @contextlib.contextmanager
    def phase(self, name: str):
        self._sample()
        self.stack.append([name, time.perf_counter(), 0.0])
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._sample()
            phase, start, nested = self.stack.pop()
            spent = time.perf_counter() - start
            self.seconds[phase] += spent - nested
            if self.stack:
                self.stack[-1][2] += spent

    def _sample(self) -> None:
        """Peaks seen since the last sample go to the phase that was running."""
        if not self.stack:
            return
        name = self.stack[-1][0]
        self.peak_rss[name] = max(self.peak_rss[name], self.process.memory_info().rss / GIB)
        if torch.cuda.is_available():
            self.peak_vram[name] = max(self.peak_vram[name], torch.cuda.max_memory_allocated() / GIB)
            torch.cuda.reset_peak_memory_stats()


@contextlib.contextmanager
def hooks(phases: Phases, pack_pipeline):
    """Time ComfyUI's model loads/moves apart, and the pack's two-stage sampler by stage: its run_stage
    (stage 1, then stage 2) and upsample_video are looked up in its module when they run."""
    import comfy.model_management as mm
    originals = {(mm, "load_models_gpu"): mm.load_models_gpu}
    if pack_pipeline is not None:
        originals[(pack_pipeline, "run_stage")] = pack_pipeline.run_stage
        originals[(pack_pipeline, "upsample_video")] = pack_pipeline.upsample_video

    def timed(phase_of, function):
        def wrapper(*args, **kwargs):
            with phases.phase(phase_of()):
                return function(*args, **kwargs)
        return wrapper

    def next_stage() -> str:
        phases.stage_runs += 1
        return "stage 1" if phases.stage_runs % 2 else "stage 2"

    mm.load_models_gpu = timed(lambda: "GPU loads/moves", mm.load_models_gpu)
    if pack_pipeline is not None:
        pack_pipeline.run_stage = timed(next_stage, pack_pipeline.run_stage)
        pack_pipeline.upsample_video = timed(lambda: "upsample", pack_pipeline.upsample_video)
    try:
        yield
    finally:
        for (owner, name), function in originals.items():
            setattr(owner, name, function)


def call_node(cls, inputs: dict):
    """One node run as the executor runs it: a V3 node's classmethod `execute`, else the V1 node's FUNCTION."""
    if hasattr(cls, "define_schema"):
        out = cls.execute(**inputs)
        if inspect.isawaitable(out):
            out = asyncio_run(out)
        return tuple(out.result) if out.result is not None else ()
    out = getattr(cls(), cls.FUNCTION)(**inputs)
    if inspect.isawaitable(out):
        out = asyncio_run(out)
    return tuple(out["result"]) if isinstance(out, dict) else tuple(out)


def asyncio_run(awaitable):
    import asyncio
    return asyncio.run(awaitable)


def run_graph(graph: dict, node_classes: dict) -> dict:
    """Run `graph` ({id: {class_type, inputs}}, ids in dependency order; an input [id, slot] is a link)
    and return the seconds, peak VRAM and peak RSS per phase, and the total."""
    import comfy.model_management as mm
    pipeline = _pack_pipeline(node_classes)
    phases = Phases()
    outputs: dict[str, tuple] = {}
    stage_samplers = iter(("stage 1", "stage 2"))
    start = time.perf_counter()
    with hooks(phases, pipeline), torch.inference_mode():  # as ComfyUI's executor runs a prompt
        for node_id, node in graph.items():
            inputs = {k: outputs[v[0]][v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
            phase = NODE_PHASES.get(node["class_type"], "other")
            if node["class_type"] == "SamplerCustomAdvanced":
                phase = next(stage_samplers)
            with phases.phase(phase):
                outputs[node_id] = call_node(node_classes[node["class_type"]], inputs)
    total = time.perf_counter() - start
    del outputs
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()
    return {"seconds": phases.seconds, "peak_vram_gib": phases.peak_vram, "peak_rss_gib": phases.peak_rss,
            "total_s": total}


def _pack_pipeline(node_classes: dict):
    """The pack's pipeline module as ComfyUI imported it (its package is named after the pack's folder)."""
    import sys
    sampler = node_classes.get("LTX2QuantTwoStageSampler")
    if sampler is None:
        return None
    return sys.modules[sampler.__module__.rsplit(".", 1)[0] + ".sampling_pipeline"]


def print_rows(rows: list[dict]) -> None:
    header = f"{'mode':<18}{'size':<16}" + "".join(f"{p:>16}" for p in PHASES) + f"{'total s':>10}"
    print(header)
    for r in rows:
        cells = "".join(f"{r['seconds'][p]:>7.2f}s {r['peak_vram_gib'][p]:>5.1f}G " for p in PHASES)
        print(f"{r['mode']:<18}{r['size']:<16}{cells}{r['total_s']:>10.2f}")
    print("per phase: seconds and peak VRAM; peak host RSS (GiB): " + "; ".join(
        f"{r['mode']} {r['size']} {max(r['peak_rss_gib'].values()):.1f}" for r in rows), flush=True)


def write_rows(path: str, rows: list[dict]) -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    with open(path, "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "rows": rows}, f, indent=1)
