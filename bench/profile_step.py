"""Where one denoising step's time goes, per mode and attention choice: the full-size random LTX-2.3
model built through ComfyUI as bench_model.py builds it, one step (euler, cfg 1) under torch.profiler,
kernel time split into GEMMs, attention, this pack's activation-quant/dequant kernels, copies and the
rest (elementwise, norms, RoPE, AdaLN, gating, casts), plus the top kernels of attention, copies and rest.

    COMFYUI_PATH=/path/to/ComfyUI python bench/profile_step.py [--blocks 48] [--size 1536x1024x121]
        [--modes "core bf16,fp8-scaled-mm,nvfp4"] [--attention "none,auto,auto-8bit"]

A mode is bench_model.py's mode string (patches after '+', e.g. `fp8-scaled-mm+compile`); each is run
with every --attention choice ("none" leaves ComfyUI's attention). The model is built once per mode.
Dry run on the CPU at tiny sizes: --device cpu --blocks 1 --size 64x64x9 --modes "core bf16".
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from comfyui_pack import import_pack  # noqa: E402

CATEGORIES = ["gemm", "attention", "act quant", "copies", "rest"]
LISTED = ["attention", "copies", "rest"]  # categories whose top kernels are printed
# Matched in this order on lower-cased kernel (GPU) or op (CPU) names. Inductor's fused kernels name
# every op they fused, including the attention or _scaled_mm they feed (RMSNorm + RoPE of q/k reads
# "..._scaled_dot_product_cudnn_attention_..."): they are elementwise work, so they match first.
# cuDNN's attention kernels contain "sm90"/"wgmma" too, so attention goes before GEMM.
PATTERNS = [
    ("rest", ("triton_poi_", "triton_red_", "triton_per_")),
    ("attention", ("attn", "attention", "fmha", "flash", "sdpa", "softmax")),
    ("act quant", ("_quantize_fp8_rows_kernel", "_nvfp4_rows_kernel", "_fp8_rows_to_bf16_kernel")),
    ("copies", ("memcpy", "memset", "aten::copy_", "aten::to", "aten::_to_copy")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "wgmma", "cublas", "aten::mm", "aten::addmm", "aten::bmm",
              "aten::_scaled_mm", "aten::matmul")),
]


def category(name: str) -> str:
    lower = name.lower()
    for cat, keys in PATTERNS:
        if any(k in lower for k in keys):
            return cat
    return "rest"


def breakdown(prof, device: str) -> tuple[dict[str, float], dict[str, list[tuple[str, float, int]]]]:
    """ms per category and, per LISTED category, its entries (name, ms, calls) largest first, from GPU
    kernels on CUDA, or from the CPU ops' self time on the CPU."""
    totals: dict[str, float] = defaultdict(float)
    entries: dict[str, list] = {cat: [] for cat in LISTED}
    for evt in prof.key_averages():
        if device == "cuda":
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
            ms = evt.self_device_time_total / 1e3
        else:
            ms = evt.self_cpu_time_total / 1e3
        if ms <= 0:
            continue
        cat = category(evt.key)
        totals[cat] += ms
        if cat in entries:
            entries[cat].append((evt.key, ms, evt.count))
    return dict(totals), {cat: sorted(rows, key=lambda r: -r[1]) for cat, rows in entries.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=48)
    parser.add_argument("--size", default="1536x1024x121", help="WxHxF of the video (one size per run)")
    parser.add_argument("--modes", default="core bf16,fp8-scaled-mm,nvfp4,mxfp8,fp8-cast")
    parser.add_argument("--attention", default="none,auto,auto-8bit",
                        help="attention choices per mode: none (ComfyUI's), auto, auto-8bit or an implementation")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", help="JSON with every row")
    args = parser.parse_args()
    import_pack(cpu=args.device == "cpu")  # before comfy.model_management is imported (by bench_model)
    import bench_model  # noqa: E402  (imports ComfyUI and the pack)
    import comfy.model_management  # noqa: E402
    from ltx2_quant.quant import ltx2  # noqa: E402

    width, height, frames = (int(v) for v in args.size.split("x"))
    config = dict(ltx2.LTX23_CONFIG, num_layers=args.blocks, connector_num_layers=1)
    metadata = ltx2.header_metadata(config)
    state = bench_model.random_state(config, args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, {args.blocks} blocks, {width}x{height}x{frames} "
          f"({(frames - 1) // 8 + 1} x {height // 32} x {width // 32} video tokens)", flush=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    one_step = bench_model.STAGE1[:2]
    rows = []
    for mode in args.modes.split(","):
        base, patches = bench_model.split_patches(mode)
        try:
            built = bench_model.build(base, state, metadata)
            comfy.model_management.load_models_gpu([built])
        except Exception as e:  # a mode that fails is reported, the others still run
            print(f"{mode}: FAILED to build: {type(e).__name__}: {e}", flush=True)
            continue
        for choice in args.attention.split(","):
            label = mode if choice == "none" else f"{mode}+attn={choice}"
            try:
                patcher = bench_model.apply_patches(built, patches + ([] if choice == "none" else [f"attn={choice}"]))
                latent, positive = bench_model.inputs(patcher, width, height, frames)
                bench_model.sample(patcher, latent, positive, one_step)  # warm-up (and compile, autotune)
                bench_model.sample(patcher, latent, positive, one_step)
                start = time.perf_counter()
                bench_model.sample(patcher, latent, positive, one_step)
                wall_ms = (time.perf_counter() - start) * 1e3
                with profile(activities=activities) as prof:
                    bench_model.sample(patcher, latent, positive, one_step)
            except Exception as e:
                print(f"{label}: FAILED {type(e).__name__}: {e}", flush=True)
                continue
            totals, entries = breakdown(prof, args.device)
            rows.append({"mode": label, "wall_ms": wall_ms, **{c: totals.get(c, 0.0) for c in CATEGORIES},
                         **{f"top_{c}": entries[c][:args.top] for c in LISTED}})
            print(f"{label}: done", flush=True)
            del patcher
        del built
        torch._dynamo.reset()  # compiled graphs of this mode must not serve the next
        comfy.model_management.unload_all_models()
        gc.collect()
        comfy.model_management.soft_empty_cache()

    unit = "GPU kernel" if args.device == "cuda" else "CPU op self"
    print(f"\nms per step ({unit} time; 'idle' = wall minus all of it: host-bound gaps)")
    print(f"{'mode':<44}{'wall':>8}{'kernels':>9}" + "".join(f"{c:>10}" for c in CATEGORIES) + f"{'idle':>8}")
    for r in rows:
        busy = sum(r[c] for c in CATEGORIES)
        print(f"{r['mode']:<44}{r['wall_ms']:>8.1f}{busy:>9.1f}" + "".join(f"{r[c]:>10.1f}" for c in CATEGORIES)
              + f"{max(r['wall_ms'] - busy, 0.0):>8.1f}")
    for cat in LISTED:
        for r in rows:
            print(f"\ntop {args.top} '{cat}' in {r['mode']} (ms, calls)")
            for key, ms, calls in r[f"top_{cat}"]:
                print(f"  {ms:>8.2f} {calls:>6}  {key[:100]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "blocks": args.blocks, "size": args.size, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
