"""Quantize-at-load time vs the time to read the file: writes a bf16 LTX-2.3-shaped checkpoint with
random weights (`--blocks 48` is the real 22B), evicts it from the page cache, reads every tensor
once (the floor any loader pays), evicts again, and times the Loader node's path (read + quantize +
ComfyUI model build) for each policy, also from a cold cache.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_load.py [--blocks 48] [--dir /tmp] [--policies fp8-scaled-mm,nvfp4]

`--profile 25` also prints, per policy, the 25 functions with the most own and the most cumulative
time under cProfile (host time: a blocking copy or a GPU sync shows as the call that waits), to see
where load time goes past the read.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import time

import torch

from bench_model import model_io, random_state  # the pack as ComfyUI imports it, and the same weights
from ltx2_quant.quant import ltx2
from ltx2_quant.quant.load_options import LoadOptions
from ltx2_quant.quant.safetensors_io import SafetensorsFile, save_tensors


def evict(path: str) -> None:
    """Drop the file's pages from the page cache so the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_all(path: str) -> int:
    total = 0
    with SafetensorsFile(path) as f:
        for key in f.keys():
            total += f.read(key).numel()
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=48)
    parser.add_argument("--dir", default="/tmp")
    parser.add_argument("--policies", default="fp8-scaled-mm,nvfp4")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the N functions with most own time")
    args = parser.parse_args()
    config = dict(ltx2.LTX23_CONFIG, num_layers=args.blocks, connector_num_layers=1)
    path = os.path.join(args.dir, f"ltx2q_bench_{args.blocks}.safetensors")
    state = random_state(config)
    save_tensors(path, state, ltx2.header_metadata(config), overwrite=True)
    size_gib = os.path.getsize(path) / 2 ** 30
    del state
    gc.collect()
    print(f"device {torch.cuda.get_device_name()}, {args.blocks} blocks, file {size_gib:.1f} GiB", flush=True)
    evict(path)
    start = time.perf_counter()
    read_all(path)
    read_s = time.perf_counter() - start
    print(f"{'what':<28}{'s':>8}{'GiB/s':>8}{'vs read':>9}")
    print(f"{'read every tensor (cold)':<28}{read_s:>8.1f}{size_gib / read_s:>8.2f}{1.0:>8.2f}x", flush=True)
    for policy in args.policies.split(","):
        evict(path)
        torch.cuda.synchronize()
        profiler = cProfile.Profile() if args.profile else None
        start = time.perf_counter()
        if profiler:
            profiler.enable()
        patcher, _ = model_io.load_and_quantize(path, LoadOptions(policy))
        torch.cuda.synchronize()
        if profiler:
            profiler.disable()
        seconds = time.perf_counter() - start
        print(f"{'load+quantize ' + policy:<28}{seconds:>8.1f}{size_gib / seconds:>8.2f}{seconds / read_s:>8.2f}x",
              flush=True)
        if profiler:
            for order in ("tottime", "cumulative"):
                pstats.Stats(profiler).sort_stats(order).print_stats(args.profile)
        del patcher
        gc.collect()
    os.remove(path)


if __name__ == "__main__":
    main()
