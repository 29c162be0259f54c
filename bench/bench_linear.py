"""Linear-layer benchmark: bf16 vs every quantized path at the LTX-2.3 block shapes, one card, one run.

For each (M, K, N) it checks each path against its fp32 policy reference (fresh random inputs) and
against the fp32 product with the original weights, then times it (median of triton.testing.do_bench,
activation quantization included) and prints the ratio to bf16.

    python bench/bench_linear.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from quant import kernels, runtime  # noqa: E402
from quant.reference import reference_linear, relative_error  # noqa: E402
from quant.weights import FP8_ROWWISE, MXFP8, NVFP4, quantize_weight  # noqa: E402

SHAPES = [(4096, 4096), (4096, 16384), (16384, 4096), (2048, 2048)]  # (K, N) of the block Linears
TOKENS = [6144, 24576]

# name, weight format, policy activation, nvfp4 mode, static input scale
VARIANTS = [  # (name, format, the activation the layer asks for, static input scale)
    ("fp8-scaled-mm", FP8_ROWWISE, "fp8", False),
    ("fp8-scaled-mm static", FP8_ROWWISE, "fp8", True),
    ("fp8-cast", FP8_ROWWISE, "none", False),
    ("mxfp8", MXFP8, "fp8", False),
    ("nvfp4 fast", NVFP4, "nvfp4", False),
    ("nvfp4 exact", NVFP4, "none", False),
]


def bench(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def bench_graphed(fn) -> float:
    """Time of `fn` replayed from a CUDA graph: the GPU work alone, without Python/launch overhead
    (what a graphed or compiled model step sees; eager small GEMMs at 6k tokens are CPU-bound)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay)


def run(quick: bool) -> list[dict]:
    device = "cuda"
    torch.manual_seed(0)
    rows = []
    shapes = SHAPES[:2] if quick else SHAPES
    for m in TOKENS[-1:] if quick else TOKENS:
        for k, n in shapes:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            w = torch.randn(n, k, device=device) * k ** -0.5
            bias = torch.randn(n, device=device, dtype=torch.bfloat16) * 0.1
            exact = x.float() @ w.t() + bias.float()
            w_bf16 = w.bfloat16()
            t_bf16 = bench(lambda: torch.nn.functional.linear(x, w_bf16, bias))
            g_bf16 = bench_graphed(lambda: torch.nn.functional.linear(x, w_bf16, bias))
            bf16_err = relative_error(torch.nn.functional.linear(x, w_bf16, bias).float(), exact)
            rows.append({"M": m, "K": k, "N": n, "variant": "bf16", "ms": t_bf16, "speedup": 1.0,
                         "graph_ms": g_bf16, "graph_speedup": 1.0,
                         "err_vs_policy_ref": 0.0, "err_vs_fp32": bf16_err, "path": "cuBLAS bf16"})
            for name, fmt, activation, static in VARIANTS:
                qw = quantize_weight(w, fmt)
                if static:
                    qw.tensors["input_scale"] = (x.float().abs().amax() / 448.0).reshape(())
                layer = runtime.PreparedLinear(qw, bias, activation, device)
                # Correctness on fresh inputs: against the policy's own fp32 reference.
                x_check = torch.randn(min(m, 2048), k, device=device, dtype=torch.bfloat16)
                y = layer(x_check)
                ref = reference_linear(x_check, qw, bias, layer.activation)
                policy_err = relative_error(y.float(), ref)
                assert policy_err == policy_err, f"{name}: NaN output"
                err = relative_error(layer(x).float(), exact)
                t = bench(lambda layer=layer: layer(x))
                g = bench_graphed(lambda layer=layer: layer(x))
                rows.append({"M": m, "K": k, "N": n, "variant": name, "ms": t, "speedup": t_bf16 / t,
                             "graph_ms": g, "graph_speedup": g_bf16 / g,
                             "err_vs_policy_ref": policy_err, "err_vs_fp32": err, "path": layer.path})
                del layer, qw
            t_again = bench(lambda: torch.nn.functional.linear(x, w_bf16, bias))
            g_again = bench_graphed(lambda: torch.nn.functional.linear(x, w_bf16, bias))
            rows.append({"M": m, "K": k, "N": n, "variant": "bf16 (repeat: noise)", "ms": t_again,
                         "speedup": t_bf16 / t_again, "graph_ms": g_again, "graph_speedup": g_bf16 / g_again,
                         "err_vs_policy_ref": 0.0, "err_vs_fp32": bf16_err,
                         "path": "cuBLAS bf16"})
            torch.cuda.empty_cache()
    return rows


def components() -> list[str]:
    """Costs of the pieces at the largest shapes: activation quant and NVFP4 expansion."""
    out = []
    x = torch.randn(24576, 16384, device="cuda", dtype=torch.bfloat16)
    t = bench(lambda: kernels.quantize_fp8_rows(x))
    gb = x.numel() * 3 / 1e9  # read bf16 + write fp8
    out.append(f"per-token FP8 quant 24576x16384: {t:.3f} ms ({gb / t:.2f} TB/s effective, counting one read)")
    qw = quantize_weight(torch.randn(16384, 4096, device="cuda"), NVFP4)
    layer = runtime.PreparedLinear(qw, None, "nvfp4", "cuda")
    tensors = layer.tensors
    t = bench(lambda: kernels.nvfp4_to_fp8(tensors["weight"], tensors["weight_scale"], tensors["weight_scale_2"],
                                           tensors["row_ratio"], 16384, 4096))
    out.append(f"NVFP4 -> FP8 expansion 16384x4096: {t:.3f} ms")
    t = bench(lambda: kernels.nvfp4_to_bf16(tensors["weight"], tensors["weight_scale"], tensors["weight_scale_2"],
                                            16384, 4096))
    out.append(f"NVFP4 -> bf16 expansion 16384x4096: {t:.3f} ms")
    # fp8-cast pieces: the per-call dequantize, and the bf16 GEMM on an already dequantized weight
    qw = quantize_weight(torch.randn(4096, 4096, device="cuda") * 0.02, FP8_ROWWISE)
    fp8_layer = runtime.PreparedLinear(qw, None, "none", "cuda")
    data, scale = fp8_layer.tensors["weight"], fp8_layer.tensors["weight_scale"].reshape(-1, 1)
    t_deq = bench(lambda: data.to(torch.bfloat16) * scale.to(torch.bfloat16))
    t_kernel = bench(lambda: kernels.fp8_rows_to_bf16(data, scale))
    x = torch.randn(24576, 4096, device="cuda", dtype=torch.bfloat16)
    w_deq = data.to(torch.bfloat16) * scale.to(torch.bfloat16)
    w_plain = (torch.randn(4096, 4096, device="cuda") * 0.02).bfloat16()
    t_gemm_deq = bench(lambda: torch.nn.functional.linear(x, w_deq))
    t_gemm_plain = bench(lambda: torch.nn.functional.linear(x, w_plain))
    t_path = bench(lambda: fp8_layer(x))
    out.append(f"fp8-cast 24576x4096x4096: eager-torch dequant {t_deq:.3f} ms, Triton dequant {t_kernel:.3f} ms, "
               f"GEMM on dequantized weight {t_gemm_deq:.3f} ms, "
               f"GEMM on plain bf16 weight {t_gemm_plain:.3f} ms, whole path {t_path:.3f} ms")
    return out


def compile_and_graphs() -> list[str]:
    """The fast paths under torch.compile and inside a CUDA graph give the eager result."""
    out = []
    x = torch.randn(512, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, 2048, device="cuda") * 2048 ** -0.5
    for fmt, activation in ((FP8_ROWWISE, "fp8"), (NVFP4, "none"), (MXFP8, "fp8")):
        layer = runtime.PreparedLinear(quantize_weight(w, fmt), None, activation, "cuda")
        eager = layer(x)
        compiled = torch.compile(layer.__call__, fullgraph=True)(x)
        static_x = x.clone()
        layer(static_x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        graph.replay()
        torch.cuda.synchronize()
        out.append(f"{layer.path}: compile max|diff| {float((compiled - eager).abs().max()):.2e}, "
                   f"cuda graph max|diff| {float((static_y - eager).abs().max()):.2e}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()} torch {torch.__version__}")
    rows = run(args.quick)
    print(f"{'M':>6} {'K':>6} {'N':>6}  {'variant':<22}{'eager ms':>9}{'vs bf16':>8}{'graph ms':>9}{'vs bf16':>8}"
          f"{'err/ref':>9}{'err/fp32':>9}  path")
    for r in rows:
        print(f"{r['M']:>6} {r['K']:>6} {r['N']:>6}  {r['variant']:<22}{r['ms']:>9.3f}{r['speedup']:>7.2f}x"
              f"{r['graph_ms']:>9.3f}{r['graph_speedup']:>7.2f}x{r['err_vs_policy_ref']:>9.4f}{r['err_vs_fp32']:>9.4f}"
              f"  {r['path']}")
    extra = components() + compile_and_graphs()
    print("\n".join(extra))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows, "notes": extra}, f, indent=1)


if __name__ == "__main__":
    main()
