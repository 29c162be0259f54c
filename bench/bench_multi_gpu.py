"""Multi-GPU benchmark (LTX-2 Multi-GPU node, nodes/multi_gpu.py) through ComfyUI: seconds per denoising
step on 1 GPU and on N GPUs of this host, the speed-up, peak VRAM per GPU, and the final latent's relative
error (norm of the difference over the norm) against the 1-GPU run, all in one run on one host. The model
has the real LTX-2.3 widths and random weights, as in bench/bench_model.py, whose builders it uses.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_multi_gpu.py --gpus 1,2,4,8 \\
        --mode fp8-scaled-mm+compile+attn=cudnn-fp8 --sizes 1536x1024x121,768x512x121

Targets (issue 26), per step vs 1 GPU with the same policy and patches: at 1536x1024x121 2 GPUs >= 1.85x,
4 >= 3.4x, 8 >= 6x; at 768x512x121 2 GPUs >= 1.6x; peak VRAM per GPU no higher than 1 GPU's; final latent
relative error <= 1e-2. Compiled modes are timed after a full warm-up run (each worker compiles its blocks).
`--tiny` uses a tiny model: a dry run of this script on the CPU (CPU worker processes over gloo).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_model  # noqa: E402  (ComfyUI and the pack as ComfyUI imports it)
import comfy.model_management  # noqa: E402
import torch  # noqa: E402
from ltx2_quant.nodes import model_io, multi_gpu  # noqa: E402
from ltx2_quant.quant import conversion, ltx2  # noqa: E402
from ltx2_quant.quant.load_options import LoadOptions  # noqa: E402
from ltx2_quant.quant.policies import get_policy  # noqa: E402
from ltx2_quant.quant.sequence_parallel import MODES  # noqa: E402
from ltx2_quant.quant.safetensors_io import MemoryTensors  # noqa: E402

TARGETS = {("1536x1024x121", 2): 1.85, ("1536x1024x121", 4): 3.4, ("1536x1024x121", 8): 6.0,
           ("768x512x121", 2): 1.6}


def timed_run(patcher, latent, positive, sigmas, warm_all: bool):
    """(s/step, output, warm-up s): a warm-up (the whole run when compiling), then the timed run."""
    start = time.perf_counter()
    bench_model.sample(patcher, latent, positive, sigmas if warm_all else sigmas[:2])
    warm_s = time.perf_counter() - start
    start = time.perf_counter()
    out = bench_model.sample(patcher, latent, positive, sigmas)
    return (time.perf_counter() - start) / (len(sigmas) - 1), out.unbind(), warm_s


def build(mode: str, state: dict, metadata: dict):
    """bench_model's builder on a GPU; on the CPU (a dry run) the pack's loader on the CPU."""
    if torch.cuda.is_available():
        return bench_model.build(mode, state, metadata)
    policy, _, scope, handling = bench_model.parse_mode(mode)
    if handling.active:
        raise ValueError(f"{mode!r}: outlier handling runs in bench_model.py; this bench times the split")
    loaded = conversion.load_converted(MemoryTensors(state, metadata), get_policy(policy, **scope))
    return model_io.build_model(loaded, LoadOptions(policy, text_connectors_on_cpu=False))[0]


def relative_error(got, reference) -> float:
    return float((got.float() - reference.float()).norm() / reference.float().norm())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpus", default="1,2,4,8", help="GPU counts; 1 (the baseline) always runs first")
    parser.add_argument("--mode", default="fp8-scaled-mm+compile+attn=cudnn-fp8",
                        help="a bench_model.py mode: policy and patches")
    parser.add_argument("--sp-mode", default="ulysses", choices=MODES)
    parser.add_argument("--sizes", default="1536x1024x121,768x512x121")
    parser.add_argument("--blocks", type=int, default=48)
    parser.add_argument("--tiny", action="store_true", help="a tiny model (CPU dry run)")
    parser.add_argument("--out")
    args = parser.parse_args()
    counts = sorted({1, *(int(n) for n in args.gpus.split(","))})
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    config = (ltx2.tiny_config(num_layers=2, heads=4, head_dim=16, audio_heads=4, audio_head_dim=8) if args.tiny
              else dict(ltx2.LTX23_CONFIG, num_layers=args.blocks, connector_num_layers=1))
    on_gpu = torch.cuda.is_available()
    state = bench_model.random_state(config, device="cuda" if on_gpu else "cpu")
    base, patches = bench_model.split_patches(args.mode)
    patcher = bench_model.apply_patches(build(base, state, ltx2.header_metadata(config)), patches)
    print(f"device {torch.cuda.get_device_name() if on_gpu else 'cpu'} x {torch.cuda.device_count()}, "
          f"torch {torch.__version__}, mode {args.mode}, {config['num_layers']} blocks", flush=True)
    rows, reference = [], {}
    for gpus in counts:
        model = patcher if gpus == 1 else multi_gpu.patch_multi_gpu(patcher, gpus, args.sp_mode)[0]
        for width, height, frames in sizes:
            size = f"{width}x{height}x{frames}"
            latent, positive = bench_model.inputs(model, width, height, frames)
            if gpus == 1 and on_gpu:
                comfy.model_management.load_models_gpu([model])
                torch.cuda.reset_peak_memory_stats()
            seconds, out, warm_s = timed_run(model, latent, positive, bench_model.STAGE1, bool(patches))
            if gpus == 1:
                peaks = [torch.cuda.max_memory_allocated() if on_gpu else 0]
                reference[size] = (seconds, out)
            else:
                peaks = multi_gpu.runner_of(model).run("peak_memory", None)
            ref_seconds, ref_out = reference[size]
            row = {"gpus": gpus, "size": size, "s_per_step": seconds, "speedup": ref_seconds / seconds,
                   "target": TARGETS.get((size, gpus)), "peak_gib_per_gpu": [p / 2 ** 30 for p in peaks],
                   "warm_s": warm_s, "err_video": relative_error(out[0], ref_out[0]),
                   "err_audio": relative_error(out[1], ref_out[1])}
            rows.append(row)
            print(json.dumps(row), flush=True)
        if gpus == 1:
            comfy.model_management.unload_all_models()
        else:
            multi_gpu.runner_of(model).close()
        del model
        gc.collect()
    print(f"{'GPUs':>5} {'size':<16}{'s/step':>8}{'speed-up':>10}{'target':>8}{'peak GiB/GPU':>14}"
          f"{'err v':>9}{'err a':>9}")
    for r in rows:
        target = f"{r['target']:.2f}x" if r["target"] else "-"
        print(f"{r['gpus']:>5} {r['size']:<16}{r['s_per_step']:>8.3f}{r['speedup']:>9.2f}x{target:>8}"
              f"{max(r['peak_gib_per_gpu']):>14.1f}{r['err_video']:>9.2e}{r['err_audio']:>9.2e}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if on_gpu else "cpu", "mode": args.mode,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
