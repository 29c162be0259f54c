"""Attention benchmark at LTX-2.3's shapes: every implementation of quant/attention.py vs bf16 SDPA with
torch's own backend choice (what ComfyUI core runs), one card, one run: ms, TFLOP/s, speed-up, and
relative error vs an fp32 reference (on a sample of query rows) for unit-normal inputs, plus the
attention ms of a whole step (one of each call per block, --blocks blocks).

    python bench/bench_attention.py [--tokens 6144,24576] [--impls sdpa,triton-int8,...]
        [--tiles 64x64x4x2,128x64x4x3]   (the Triton kernels' BLOCK_MxBLOCK_Nxwarpsxstages, each timed)
        [--all-lengths]   (also the calls shorter than attention.MIN_8BIT_TOKENS, which a model sends to SDPA)

Inputs are (B, S, heads*D) tensors viewed as (B, heads, S, D), as ComfyUI hands them over.
Dry run on the CPU: --device cpu --tokens 96 --text-tokens 16 --audio-tokens 12 --heads 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from quant import attention, attention_8bit  # noqa: E402
from quant.runtime import capability  # noqa: E402

BASELINE = "sdpa"


def calls(video: int, audio: int, text: int) -> list[tuple[str, int, int, int]]:
    """(name, Sq, Skv, head_dim) of the attention calls in one LTX-2.3 block (32 heads each)."""
    return [("video self", video, video, 128), ("video-text", video, text, 128), ("audio self", audio, audio, 64),
            ("audio-text", audio, text, 64), ("audio->video", video, audio, 64), ("video->audio", audio, video, 64)]


def timed(fn, device: str, iters: int) -> float:
    """Median ms of fn() after a warm-up call."""
    fn()
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=max(1, iters // 4), rep=iters * 10, return_mode="median")
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def reference_rows(q, k, v, rows: torch.Tensor) -> torch.Tensor:
    """fp32 attention of the sampled query rows, a few heads at a time (bounded memory)."""
    out = []
    for h in range(0, q.shape[1], 4):
        out.append(attention.reference_attention(q[:, h:h + 4, rows], k[:, h:h + 4], v[:, h:h + 4]))
    return torch.cat(out, dim=1)


def measure(impl, q, k, v, sample, ref, device: str, iters: int) -> tuple[float, float]:
    """(relative error of the sampled rows vs fp32, median ms)."""
    def run():
        return impl.run(q, k, v, None, None)
    return attention.relative_error(run()[:, :, sample], ref), timed(run, device, iters)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="6144,24576", help="video token counts")
    parser.add_argument("--audio-tokens", type=int, default=126, help="121 frames at 25 audio latents/s")
    parser.add_argument("--text-tokens", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=48, help="blocks per step, for the per-step column")
    parser.add_argument("--impls", default=",".join(attention.ORDER))
    parser.add_argument("--tiles", help="Triton tile shapes to sweep, MxNxWARPSxSTAGES,... (default: the committed)")
    parser.add_argument("--all-lengths", action="store_true",
                        help="time the 8-bit kernels on every call, also those shorter than they take in a model")
    parser.add_argument("--rows", type=int, default=512, help="query rows checked against fp32")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = args.device
    cap = capability(device)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device {name} ({cap.describe()}), torch {torch.__version__}, {args.heads} heads, batch 1, bf16")
    impls = args.impls.split(",")
    if BASELINE not in impls:
        impls.insert(0, BASELINE)
    tiles = [dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), map(int, t.split("x"))))
             for t in (args.tiles.split(",") if args.tiles else [])]
    usable = {}
    for impl_name in impls:
        impl = attention.IMPLEMENTATIONS[impl_name]
        why = impl.requires(cap) or attention.probe(impl, device, torch.bfloat16)
        if why is None:
            usable[impl_name] = dataclasses.replace(impl, min_tokens=0) if args.all_lengths else impl
        else:
            print(f"{impl_name}: skipped: {why}")
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for video in (int(t) for t in args.tokens.split(",")):
        for call, sq, skv, dim in calls(video, args.audio_tokens, args.text_tokens):
            q, k, v = (torch.randn(1, n, args.heads * dim, generator=g, device=device, dtype=torch.bfloat16)
                       .view(1, n, args.heads, dim).transpose(1, 2) for n in (sq, skv, skv))
            sample = torch.linspace(0, sq - 1, min(args.rows, sq), device=device).long()
            ref = reference_rows(q, k, v, sample)
            flops = 4 * args.heads * sq * skv * dim
            base_ms = None
            for impl_name, impl in usable.items():
                if not impl.takes(q, k, None, True):
                    continue
                swept = impl_name.startswith("triton") and tiles
                for tile in tiles if swept else [{}]:
                    label = impl_name + ("@" + "x".join(str(x) for x in tile.values()) if swept else "")
                    attention_8bit._TILE.update(tile)
                    err, ms = measure(impl, q, k, v, sample, ref, device, args.iters)
                    base_ms = ms if impl_name == BASELINE else base_ms
                    rows.append({"tokens": video, "call": call, "sq": sq, "skv": skv, "head_dim": dim,
                                 "impl": label, "ms": ms, "tflops": flops / ms / 1e9,
                                 "speedup": base_ms / ms if base_ms else float("nan"), "rel_err": err})
    print(f"\n{'tokens':>7} {'call':<13}{'Sq':>7}{'Skv':>7}{'D':>5}  {'impl':<16}{'ms':>9}{'TFLOP/s':>9}"
          f"{'vs sdpa':>9}{'rel err':>9}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['call']:<13}{r['sq']:>7}{r['skv']:>7}{r['head_dim']:>5}  {r['impl']:<16}"
              f"{r['ms']:>9.3f}{r['tflops']:>9.1f}{r['speedup']:>8.2f}x{r['rel_err']:>9.4f}")
    print(f"\nattention ms per step ({args.blocks} blocks; calls an implementation cannot take counted at sdpa's time)")
    for video in sorted({r["tokens"] for r in rows}):
        base = {r["call"]: r["ms"] for r in rows if r["tokens"] == video and r["impl"] == BASELINE}
        for impl_name in dict.fromkeys(r["impl"] for r in rows):  # the swept tiles each get a line
            mine = {r["call"]: r["ms"] for r in rows if r["tokens"] == video and r["impl"] == impl_name}
            step = args.blocks * sum(mine.get(call, ms) for call, ms in base.items())
            print(f"{video:>7} {impl_name:<16}{step:>9.1f} ms{args.blocks * sum(base.values()) / step:>7.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
