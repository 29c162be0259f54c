"""Full-model benchmark through ComfyUI: seconds per denoising step, peak VRAM, load(+quantize) time
and final-latent error vs bf16, for ComfyUI core's modes and this pack's policies, on one card in one
run. The transformer has the real LTX-2.3 widths and random weights (`--blocks 48` is the real depth).

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_model.py [--blocks 48] [--sizes 768x512x121,1536x1024x121]

A mode may carry model patches after '+': `fp8-scaled-mm+compile` (the Compile Blocks node; `+graphs`:
its CUDA-graph mode, `+tuned`: its tuned-kernels mode),
`nvfp4+compile+attn=sdpa-cudnn` (and an attention implementation). Compiled modes are timed after a
full warm-up run, so compile time is reported apart (`warm s`), not in s/step. A policy may carry a
scope after ':' (see parse_mode), added to the policy's own: `fp8-cast:connectors+compile`,
`nvfp4:first=1,last=1`, `nvfp4:audio8,8bit=*.attn1.*` (those layers FP8, the rest NVFP4),
`fp8-scaled-mm:all` (every block Linear, without the policy's default bf16 layers).
Outlier handling (quant.outliers) after '+', before or after the scope: `+smooth[=ALPHA]` (SmoothQuant,
alpha 0.5 if bare) and `+lowrank[=FRACTION]` (the bf16 low-rank branch, at most 0.1 of each layer's
quantized bytes if bare): `int8-convrot+smooth+compile`, `nvfp4+smooth+lowrank+compile`. The random
weights come without a calibration file: smoothing takes synthetic per-channel amax drawn by
bench/quality_outliers.py's recipe (its outlier ratios measured on the real-weights proxy: 8x on the
attention inputs, 7x on the attention output, 25x / 42x on the FFN's), and the run prints so with the
number of smoothed layers and of branches. The branch's rank follows the weights' spectrum: on random
weights only smoothing's scaled outlier columns give it directions (`+lowrank` alone keeps none).
`--connector-layers 8` builds the release's text connectors (default 1: they run once per prompt,
so they only matter for memory); the pack's modes stream them from host memory unless the scope says
`gpu-connectors`; `--unprocessed` makes them run in each sampling run. `--seed` draws other weights.

`--width 256` builds a small model (that video width, heads of 64) instead of LTX-2.3's widths; without a
GPU the run is a CPU dry run (`--blocks 2 --width 256 --sizes 64x64x9`): no peak VRAM, times of the CPU.
Its errors do not compare core's pre-quantized modes with the pack's: ComfyUI has no FP8 compute on the CPU,
so its quantized layers run weight-only there (`_full_precision_mm`), while the pack's W8A8 policies still
quantize activations (its CPU path is the reference of what a GPU runs).

`--capability 8.0` makes every CUDA capability query answer sm_80 before ComfyUI or the pack look, so
both take the paths of a GPU without FP8 tensor cores (an Ampere card simulated on Hopper: the kernels
still run at Hopper's speed, so this times the paths, not an Ampere card). A benchmark switch only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import replace

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
from comfyui_pack import import_pack  # noqa: E402
import forced_capability  # noqa: E402  (bench/, beside this file)

FORCED_CAPABILITY = forced_capability.parse(sys.argv)
if FORCED_CAPABILITY is not None:
    forced_capability.force(FORCED_CAPABILITY)

import_pack(cpu=not torch.cuda.is_available())  # CPU dry runs of the benches that import this bootstrap
import comfy.model_management  # noqa: E402
import comfy.nested_tensor  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.sd  # noqa: E402

from ltx2_quant.nodes import model_io  # noqa: E402
from ltx2_quant.nodes.patches import compile_blocks, patch_attention  # noqa: E402
from ltx2_quant.quant import conversion, formats, ltx2  # noqa: E402
from ltx2_quant.quant.load_options import LoadOptions  # noqa: E402
from ltx2_quant.quant.outliers import Outliers  # noqa: E402
from ltx2_quant.quant.weights import FP8_TENSOR, NVFP4  # noqa: E402
from ltx2_quant.quant.policies import get_policy  # noqa: E402
from ltx2_quant.quant.safetensors_io import MemoryTensors  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STAGE1 = [1.0, 0.99375, 0.9875, 0.98125, 0.975, 0.909375, 0.725, 0.421875, 0.0]
CORE_MODES = ["core bf16", "core fp8_e4m3fn", "core fp8_e4m3fn_fast", "core prequant fp8", "core prequant nvfp4",
              "core prequant mxfp8"]
OUR_MODES = ["fp8-cast", "fp8-scaled-mm", "int8-scaled-mm", "int8-convrot", "mxfp8", "nvfp4"]


def random_state(config: dict, device: str = DEVICE, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random bf16 weights of the config's shapes (std 1/sqrt(in)), drawn on `device` (fast on a GPU),
    kept on the CPU like a loaded file."""
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for key, shape in ltx2.model_shapes(config).items():
        std = shape[1] ** -0.5 if len(shape) == 2 else 0.02
        state[key] = (torch.randn(shape, generator=gen, device=device) * std).to(torch.bfloat16).cpu()
    return state


# Bare `+smooth` / `+lowrank`: the strengths measured best on the real-weights proxy (docs/QUALITY.md).
OUTLIER_DEFAULTS = {"smooth": 0.5, "lowrank": 0.1}


def parse_mode(mode: str) -> tuple[str, bool, dict, Outliers]:
    """'nvfp4+static+smooth:first=1,last=1,audio+lowrank=0.2' -> ('nvfp4', True, scope options,
    Outliers(0.5, 0.2)): the `+` items go with the policy or after the scope."""
    head, _, tail = mode.partition(":")
    policy, *items = head.split("+")
    scope_text, *more = tail.split("+")
    static, amounts = False, {}
    for item in (*items, *more):
        key, _, value = item.partition("=")
        if item == "static":
            static = True
        elif key in OUTLIER_DEFAULTS:
            amounts[key] = float(value) if value else OUTLIER_DEFAULTS[key]
        else:
            raise ValueError(f"unknown item {item!r} in mode {mode!r}")
    handling = Outliers(smooth_alpha=amounts.get("smooth", 0.0), low_rank_bytes=amounts.get("lowrank", 0.0))
    scope: dict = {}
    for item in filter(None, scope_text.split(",")):
        key, _, value = item.partition("=")
        if key == "first":
            scope["keep_first_blocks"] = int(value)
        elif key == "last":
            scope["keep_last_blocks"] = int(value)
        elif key == "audio":
            scope["keep_audio"] = True
        elif key == "connectors":
            scope["connectors"] = True
        elif key == "all":  # every block Linear: without the policy's own bf16 layers
            scope["policy_scope"] = False
        elif key == "exclude":
            scope.setdefault("exclude", []).append(value)
        elif key == "wo":  # run these (quantized) layers weight-only
            scope.setdefault("weight_only", []).append(value)
        elif key == "gpu-connectors":  # keep the text connectors resident (text_connectors_on_cpu off)
            scope["gpu_connectors"] = True
        elif key == "audio8":  # NVFP4 policies: the audio-side Linears in FP8
            scope["audio_8bit"] = True
        elif key == "8bit":  # NVFP4 policies: these block Linears in FP8
            scope.setdefault("eight_bit", []).append(value)
        elif key == "per-tensor":  # FP8 policies: one weight scale per tensor, as core's files
            scope["fp8_per_tensor"] = True
        else:
            raise ValueError(f"unknown scope item {item!r} in mode {mode!r}")
    return policy, static, scope, handling


# The recipe's largest / median per-channel amax of each block Linear's input, by what the Linear reads
# (bench/quality_outliers.py: the real-weights proxy's measured ratios).
SYNTHETIC_RATIOS = (("ff.net.2", 42.0), ("ff.net.0.proj", 25.0), ("to_out.0", 7.0), ("", 8.0))


def synthetic_channel_amax(state: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-channel amax for every 2-D weight's input, drawn by bench/quality_outliers.py's recipe."""
    from quality_outliers import outlier_gains  # the recipe alone: pure torch
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, tensor in state.items():
        if key.endswith(".weight") and tensor.dim() == 2:
            layer = key[: -len(".weight")]
            ratio = next(r for part, r in SYNTHETIC_RATIOS if layer.endswith(part))
            out[layer] = outlier_gains(tensor.shape[1], ratio, g)
    return out


def load_with_outliers(state: dict, metadata: dict, policy, handling: Outliers, device: str):
    """conversion.load_converted with `handling` (smoothing from synthetic per-channel amax), and
    what it did, printed."""
    channels = synthetic_channel_amax(state) if handling.smooth_alpha else None
    loaded = conversion.load_converted(MemoryTensors(state, metadata), replace(policy, outliers=handling), device=device,
                                       channel_amax=channels, calibration="synthetic per-channel amax")
    if handling.active:
        source = ("; smoothing from synthetic per-channel amax (bench/quality_outliers.py recipe), not a calibration "
                  "pass" if channels else "")
        print(model_io.outlier_report(loaded) + source, flush=True)
    return loaded


def prequantized_file(mode: str, state: dict, metadata: dict, device: str, amax: dict | None = None):
    """The pre-quantized file a 'core prequant X' mode loads, as other tools write it: per-tensor FP8,
    and NVFP4 with amax/6 block scales (comfy-kitchen's quantizer; this pack's scale search is not in
    the files users have). FP8 files come in three kinds: `core prequant fp8` has no `input_scale`
    (ComfyUI then casts each call's activation with scale 1.0: comfy/quant_ops.py, v0.20.1 and v0.33), `core prequant fp8 scale1` has `input_scale` 1.0
    on every W8A8 layer (the anchors' measurement), `core prequant fp8+static` calibrated per-tensor
    `input_scale`s from `amax`, as Lightricks' files carry (bench_quality only). `core prequant int8` and
    `core prequant int8-convrot` are ComfyUI's int8_tensorwise files (per-row scales; with ConvRot), which
    ComfyUI from v0.33 on runs natively and v0.20.1 cannot read."""
    words = mode.removesuffix("+static").split()
    policy = {"fp8": "fp8-scaled-mm", "nvfp4": "nvfp4", "mxfp8": "mxfp8", "int8": "int8-scaled-mm",
              "int8-convrot": "int8-convrot"}[words[2]]
    loaded = conversion.load_converted(MemoryTensors(state, metadata), get_policy(policy, fp8_per_tensor=True),
                                       device=device)
    for d in loaded.decisions:
        if d.changed and d.target_format == NVFP4:
            tensors = formats.quantize_nvfp4(state[d.layer + ".weight"].to(device).float())
            for suffix, tensor in zip(("weight", "weight_scale", "weight_scale_2"), tensors):
                loaded.state_dict[f"{d.layer}.{suffix}"] = tensor.cpu()
    if words[3:] == ["scale1"]:
        for d in loaded.decisions:
            if d.changed and d.target_format == FP8_TENSOR and not d.weight_only:
                loaded.state_dict[f"{d.layer}.input_scale"] = torch.tensor(1.0)
    elif words[3:]:
        raise ValueError(f"unknown core mode {mode!r}")
    if mode.endswith("+static"):
        model_io.apply_calibration(loaded, amax)
    return loaded


def build(mode: str, state: dict, metadata: dict):
    if mode == "core bf16":
        return comfy.sd.load_diffusion_model_state_dict(dict(state), {"dtype": torch.bfloat16}, metadata=metadata)
    if mode == "core fp8_e4m3fn":
        return comfy.sd.load_diffusion_model_state_dict(dict(state), {"dtype": torch.float8_e4m3fn}, metadata=metadata)
    if mode == "core fp8_e4m3fn_fast":
        return comfy.sd.load_diffusion_model_state_dict(dict(state), {"dtype": torch.float8_e4m3fn,
                                                                      "fp8_optimizations": True}, metadata=metadata)
    if mode.startswith("core prequant"):
        loaded = prequantized_file(mode, state, metadata, DEVICE)
        return comfy.sd.load_diffusion_model_state_dict(loaded.state_dict, {}, metadata=loaded.metadata)
    policy_name, static, scope, handling = parse_mode(mode)
    if static:
        raise ValueError(f"{mode!r}: calibrated static scales are measured by bench_quality.py")
    on_cpu = not scope.pop("gpu_connectors", False)
    loaded = load_with_outliers(state, metadata, get_policy(policy_name, **scope), handling, DEVICE)
    return model_io.build_model(loaded, LoadOptions(policy_name, text_connectors_on_cpu=on_cpu))[0]


def inputs(patcher, width: int, height: int, frames: int, unprocessed: bool = False):
    """Conditioning and an empty AV latent; `unprocessed` marks the context raw, so the text
    connectors run in every sampling run (their cost lands in s/step)."""
    dm = patcher.model.diffusion_model
    context = dm.cross_attention_dim + dm.audio_cross_attention_dim
    g = torch.Generator().manual_seed(1)
    extra = {"unprocessed_ltxav_embeds": True} if unprocessed else {}
    positive = [[torch.randn(1, 1024, context, generator=g) * 0.5, {"frame_rate": 24.0, **extra}]]
    video = torch.zeros(1, 128, (frames - 1) // 8 + 1, height // 32, width // 32)
    audio = torch.zeros(1, 8, round(frames / 24 * 25), 16)
    return comfy.nested_tensor.NestedTensor((video, audio)), positive


def sample(patcher, latent, positive, sigmas):
    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds(positive, positive)
    guider.set_cfg(1.0)
    noise = comfy.sample.prepare_noise(latent, 42)
    out = guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), torch.tensor(sigmas),
                        disable_pbar=True, seed=42)
    synchronize()
    return out


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    """Peak VRAM since reset_peak (nan on a CPU dry run)."""
    return torch.cuda.max_memory_allocated() / 2 ** 30 if DEVICE == "cuda" else float("nan")


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"


# Mode patches -> the Compile Blocks node's modes.
COMPILE_PATCHES = {"compile": "blocks", "graphs": "blocks, cuda graphs", "tuned": "blocks, tuned kernels"}


def split_patches(mode: str) -> tuple[str, list[str]]:
    """'fp8-scaled-mm+static+compile+attn=triton-int8' -> ('fp8-scaled-mm+static', ['compile', 'attn=triton-int8'])."""
    parts = mode.split("+")
    patches = [p for p in parts[1:] if p in COMPILE_PATCHES or p.startswith("attn=")]
    return "+".join(p for p in parts if p not in patches), patches


def apply_patches(patcher, patches: list[str]):
    for patch in patches:
        if patch in COMPILE_PATCHES:
            patcher, text = compile_blocks(patcher, COMPILE_PATCHES[patch])
            print(f"{patch}: {text}", flush=True)
        elif patch.startswith("attn="):
            patcher, text = patch_attention(patcher, patch[len("attn="):])
            print(f"{patch}: {text}", flush=True)
        else:
            raise ValueError(f"unknown patch {patch!r}")
    return patcher


def run_mode(mode: str, state: dict, metadata: dict, sizes: list[tuple[int, int, int]],
             unprocessed: bool = False) -> dict:
    reset_peak()
    start = time.perf_counter()
    base, patches = split_patches(mode)
    patcher = apply_patches(build(base, state, metadata), patches)
    comfy.model_management.load_models_gpu([patcher])
    synchronize()
    row = {"mode": mode, "load_s": time.perf_counter() - start, "sizes": {}}
    for width, height, frames in sizes:
        latent, positive = inputs(patcher, width, height, frames, unprocessed)
        start = time.perf_counter()
        # Warm-up: two steps, or the whole run when compiling (each sigma must not trigger a recompile).
        sample(patcher, latent, positive, STAGE1 if patches else STAGE1[:2])
        warm_s = time.perf_counter() - start
        reset_peak()
        start = time.perf_counter()
        out = sample(patcher, latent, positive, STAGE1)
        seconds = (time.perf_counter() - start) / (len(STAGE1) - 1)
        video, audio = out.unbind()
        row["sizes"][f"{width}x{height}x{frames}"] = {
            "s_per_step": seconds, "peak_gib": peak_gib(), "warm_s": warm_s,
            "video": video.float().cpu(), "audio": audio.float().cpu()}
    del patcher
    torch._dynamo.reset()  # compiled graphs of this mode must not serve the next
    comfy.model_management.unload_all_models()
    gc.collect()
    comfy.model_management.soft_empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=48)
    parser.add_argument("--width", type=int, help="video width (heads x 64) of a small model; default: LTX-2.3's")
    parser.add_argument("--sizes", default="768x512x121,1536x1024x121")
    parser.add_argument("--modes", default=",".join(CORE_MODES + OUR_MODES),
                        help="separated by ',' (or by ';' when a scope has commas)")
    parser.add_argument("--connector-layers", type=int, default=1)
    parser.add_argument("--unprocessed", action="store_true",
                        help="raw text context: the text connectors run in every sampling run")
    parser.add_argument("--seed", type=int, default=0, help="the random weights' seed")
    parser.add_argument("--capability", help="answer every CUDA capability query with this (e.g. 8.0)")
    parser.add_argument("--out")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    if args.width:
        heads = args.width // 64
        config = ltx2.tiny_config(num_layers=args.blocks, heads=heads, head_dim=64, audio_heads=heads, audio_head_dim=32)
    else:
        config = dict(ltx2.LTX23_CONFIG, num_layers=args.blocks, connector_num_layers=args.connector_layers)
    metadata = ltx2.header_metadata(config)
    state = random_state(config, seed=args.seed)
    forced = f", capability forced to sm_{FORCED_CAPABILITY[0]}{FORCED_CAPABILITY[1]}" if FORCED_CAPABILITY else ""
    print(f"device {device_name()}, torch {torch.__version__}, {args.blocks} blocks, "
          f"{sum(t.numel() for t in state.values()) / 1e9:.2f} B params, weight seed {args.seed}{forced}", flush=True)
    rows = []
    for mode in args.modes.split(";" if ";" in args.modes else ","):
        try:
            rows.append(run_mode(mode, state, metadata, sizes, args.unprocessed))
        except Exception as e:  # a mode that fails is reported, the others still run
            print(f"{mode}: FAILED {type(e).__name__}: {e}", flush=True)
            comfy.model_management.unload_all_models()
            gc.collect()
            continue
        print(f"{mode}: done", flush=True)
        print_table(rows[-1:], next((r for r in rows if r["mode"] == "core bf16"), None))  # kept if the run dies later
    table = print_table(rows, next((r for r in rows if r["mode"] == "core bf16"), None))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device_name(), "blocks": args.blocks, "rows": table}, f, indent=1)


def print_table(rows: list[dict], reference: dict | None) -> list[dict]:
    table = []
    for r in rows:
        for size, m in r["sizes"].items():
            ref = reference["sizes"][size] if reference else None
            err_v = float((m["video"] - ref["video"]).norm() / ref["video"].norm()) if ref else float("nan")
            err_a = float((m["audio"] - ref["audio"]).norm() / ref["audio"].norm()) if ref else float("nan")
            speed = ref["s_per_step"] / m["s_per_step"] if ref else float("nan")
            table.append({"mode": r["mode"], "size": size, "s_per_step": m["s_per_step"], "vs_core_bf16": speed,
                          "peak_gib": m["peak_gib"], "load_s": r["load_s"], "warm_s": m["warm_s"],
                          "err_video": err_v, "err_audio": err_a})
    print(f"{'mode':<40}{'size':<16}{'s/step':>8}{'vs bf16':>9}{'peak GiB':>10}{'load s':>8}{'warm s':>8}"
          f"{'err v':>8}{'err a':>8}")
    for t in table:
        print(f"{t['mode']:<40}{t['size']:<16}{t['s_per_step']:>8.3f}{t['vs_core_bf16']:>8.2f}x{t['peak_gib']:>10.1f}"
              f"{t['load_s']:>8.1f}{t['warm_s']:>8.1f}{t['err_video']:>8.4f}{t['err_audio']:>8.4f}", flush=True)
    return table


if __name__ == "__main__":
    main()
