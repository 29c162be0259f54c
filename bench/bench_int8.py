"""INT8 W8A8 kernels on one GPU, one run: correctness at the LTX-2 shapes, then speed against bf16 and FP8.

1. Checks (fresh random inputs): the quantizers and every GEMM against quant.formats' references at each
   (M, N, K); a failed check is marked FAIL and makes the exit status 1, the run goes on.
2. GEMM alone on quantized operands: cuBLAS bf16 (with bias), FP8 `_scaled_mm` rowwise with fast
   accumulation (as quant.runtime runs it), the Triton INT8 GEMM (autotuned; pointer and persistent
   TMA kernels), torch._int_mm + the scaling pass. TFLOP/s (TOP/s for INT8) = 2MNK / time.
3. The whole Linear from a bf16 activation (quantization included): bf16, FP8, INT8 Triton with and
   without ConvRot, INT8 _int_mm, comfy-kitchen's int8_linear (when installed), with the relative error
   of each against the fp32 product (activations: Gaussian with 1 channel in 256 scaled by 30, as
   outliers; weights Gaussian).
4. The activation quantizers alone: GB/s counting one bf16 read and one 8-bit write.

Times are medians of triton.testing.do_bench (CUDA events, L2 flushed before each repetition) of the
call replayed from a CUDA graph (GPU time without launch gaps); "eager" columns time the plain call.
bf16 is timed again at the end of each shape: the difference is the noise.

    python bench/bench_int8.py [--quick] [--capability 8.0] [--out results.json]
    python bench/bench_int8.py --compile-report[=largest]     (any machine, no GPU)

`--compile-report` compiles every kernel variant and GEMM tile (`=largest`: each list's largest tile)
for sm_75, 80, 86 and 90 with Triton's own ptxas and prints shared memory, registers and spills per
target; a spill or a tile over its class's shared memory fails it (tests/test_kernels_int8.py runs it).

`--capability 8.0` makes CUDA capability queries answer sm_80 before the kernels pick their tile lists:
the Ampere lists then run on this GPU (their speed here says nothing about an Ampere card). A benchmark
switch only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import forced_capability  # noqa: E402  (bench/, beside this file)
from quant import formats, kernels, kernels_int8  # noqa: E402

SHAPES = [(4096, 4096), (16384, 4096), (4096, 16384), (2048, 2048)]  # (N, K) of the block Linears
TOKENS = [24576, 6144]
DEVICE = "cuda"
FAILED: list[str] = []


def bench(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def bench_graphed(fn) -> float:
    fn()  # autotuning and compilation happen outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay)


def check(name: str, ok: bool, detail: str) -> str:
    if not ok:
        FAILED.append(name)
    return f"{'ok  ' if ok else 'FAIL'} {name}: {detail}"


def code_mismatch(codes, ref_codes) -> tuple[int, float]:
    diff = (codes.int() - ref_codes.int()).abs()
    return int(diff.max()), (diff != 0).float().mean().item()


def relative_error(y, ref) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def activation(m: int, k: int) -> torch.Tensor:
    """Gaussian with a few outlier channels (LTX activations have them; ConvRot exists for them)."""
    x = torch.randn(m, k, device=DEVICE) * 2
    x[:, torch.randint(0, k, (k // 256,), device=DEVICE)] *= 30
    return x.bfloat16()


def check_quantizers(m: int, k: int) -> list[str]:
    x = activation(m, k)
    lines = []
    data, scale = kernels_int8.quantize_int8_rows(x)
    ref_data, ref_scale = formats.quantize_int8_rowwise_dynamic(x)
    exact = torch.equal(data, ref_data) and torch.equal(scale, ref_scale)
    lines.append(check(f"quantize_int8_rows {m}x{k}", exact,
                       "bit-exact" if exact else f"codes off by <= / in: {code_mismatch(data, ref_data)}"))
    for gelu, group in ((True, 0), (False, 256), (True, 256)):
        data, scale = kernels_int8.quantize_int8_rows(x, gelu=gelu, rotate_groupsize=group)
        values = torch.nn.functional.gelu(x.float(), approximate="tanh") if gelu else x  # fp32, as fused
        ref_data, ref_scale = formats.quantize_int8_rowwise_dynamic(values, group)
        worst, fraction = code_mismatch(data, ref_data)
        scale_err = ((scale - ref_scale).abs() / ref_scale).max().item()
        lines.append(check(f"quantize_int8_rows gelu={gelu} rotate={group} {m}x{k}",
                           worst <= 1 and fraction < 1e-3 and scale_err < 1e-5,
                           f"codes off by <= {worst} in {fraction:.1e} of elements, scale rel err {scale_err:.1e}"))
    return lines


def gemm_contenders(persistent_ok: bool) -> dict:
    out = {"int8 triton": lambda *args: kernels_int8._int8_mm_launch(*args, torch.bfloat16, persistent=False)}
    if persistent_ok:
        out["int8 triton persistent"] = lambda *args: kernels_int8._int8_mm_launch(*args, torch.bfloat16,
                                                                                    persistent=True)
    out["int8 _int_mm+scale"] = lambda *args: kernels_int8.int8_scaled_mm_int_mm(*args)
    return out


def run_shape(m: int, n: int, k: int, persistent_ok: bool, comfy_kitchen) -> tuple[list[dict], list[str]]:
    rows, lines = [], []
    flops = 2 * m * n * k
    x = activation(m, k)
    w = torch.randn(n, k, device=DEVICE) * k ** -0.5
    bias = (torch.randn(n, device=DEVICE) * 0.1).bfloat16()
    exact = x.float() @ w.t() + bias.float()

    def add(table, name, fn, reference=None, graphed=True):
        """`graphed=False` (comfy-kitchen, whose calls a CUDA graph may not capture): eager times only."""
        row = {"table": table, "M": m, "N": n, "K": k, "name": name}
        try:  # a contender that fails (a kernel that does not compile here) is reported, the run goes on
            eager_ms = bench(fn)
            ms = bench_graphed(fn) if graphed else eager_ms
            row.update(ms=ms, eager_ms=eager_ms, tflops=flops / ms / 1e9)
            if reference is not None:
                row["err_vs_fp32"] = relative_error(fn(), reference)
        except Exception as error:  # noqa: BLE001
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:100] if str(error) else ''}"
            FAILED.append(f"{name} {m}x{n}x{k}")
        rows.append(row)

    # operands
    w_bf16 = w.bfloat16()
    w_fp8, w_fp8_scale = formats.quantize_fp8_rowwise_dynamic(w)
    w_fp8_scale = w_fp8_scale.reshape(1, n)
    a_fp8, a_fp8_scale = kernels.quantize_fp8_rows(x)
    w_int8, w_int8_scale = formats.quantize_int8_rows(w)
    w_int8_scale = w_int8_scale.reshape(n)
    w_rot, w_rot_scale = formats.quantize_int8_rows(formats.rotate_groups(w, 256))  # W H^T = W H
    w_rot_scale = w_rot_scale.reshape(n)
    a_int8, a_int8_scale = kernels_int8.quantize_int8_rows(x)

    def fp8_mm(a, a_scale):
        return torch._scaled_mm(a, w_fp8.t(), scale_a=a_scale, scale_b=w_fp8_scale, bias=bias,
                                out_dtype=torch.bfloat16, use_fast_accum=True)

    # checks at this shape
    ref = formats.int8_scaled_mm(a_int8, w_int8, a_int8_scale, w_int8_scale, bias)
    for name, gemm in gemm_contenders(persistent_ok).items():
        y = gemm(a_int8, w_int8, a_int8_scale, w_int8_scale, bias)
        worst = ((y.float() - ref.float()).abs() / ref.float().abs().clamp(min=1e-6)).max().item()
        lines.append(check(f"{name} {m}x{n}x{k}", torch.allclose(y.float(), ref.float(), rtol=2 ** -7, atol=1e-6),
                           f"{(y != ref).float().mean().item():.1e} of outputs differ from the reference (the GPU "
                           f"fuses the bias add: one rounding less), max relative difference {worst:.1e}"))
    del ref

    # 2. GEMM alone
    add("gemm", "bf16 cuBLAS", lambda: torch.nn.functional.linear(x, w_bf16, bias))
    add("gemm", "fp8 _scaled_mm rowwise", lambda: fp8_mm(a_fp8, a_fp8_scale))
    for name, gemm in gemm_contenders(persistent_ok).items():
        add("gemm", name, lambda gemm=gemm: gemm(a_int8, w_int8, a_int8_scale, w_int8_scale, bias))
        if name.startswith("int8 triton") and "error" not in rows[-1]:
            tuned = kernels_int8._autotuned_gemm(name.endswith("persistent"), kernels_int8.gemm_class(DEVICE))
            rows[-1]["config"] = str(getattr(tuned, "best_config", ""))

    # 3. the whole Linear from bf16
    add("linear", "bf16", lambda: torch.nn.functional.linear(x, w_bf16, bias), exact)
    add("linear", "fp8 rowwise", lambda: fp8_mm(*kernels.quantize_fp8_rows(x)), exact)
    add("linear", "int8 triton", lambda: _int8_linear(x, w_int8, w_int8_scale, bias, 0, kernels_int8.int8_scaled_mm),
        exact)
    add("linear", "int8 triton convrot", lambda: _int8_linear(x, w_rot, w_rot_scale, bias, 256,
                                                              kernels_int8.int8_scaled_mm), exact)
    add("linear", "int8 _int_mm", lambda: _int8_linear(x, w_int8, w_int8_scale, bias, 0,
                                                       kernels_int8.int8_scaled_mm_int_mm), exact)
    if comfy_kitchen is not None:
        add("linear", "comfy-kitchen int8_linear (eager)", lambda: comfy_kitchen.int8_linear(
            x, w_int8, w_int8_scale, bias, out_dtype=torch.bfloat16), exact, graphed=False)
        add("linear", "comfy-kitchen convrot (eager)", lambda: comfy_kitchen.int8_linear(
            x, w_rot, w_rot_scale, bias, out_dtype=torch.bfloat16, convrot=True, convrot_groupsize=256), exact,
            graphed=False)
    add("linear", "bf16 (again: noise)", lambda: torch.nn.functional.linear(x, w_bf16, bias), exact)
    return rows, lines


def _int8_linear(x, w, w_scale, bias, group, gemm):
    a, a_scale = kernels_int8.quantize_int8_rows(x, rotate_groupsize=group)
    return gemm(a, w, a_scale, w_scale, bias)


def quantizer_rows(m: int, k: int) -> list[dict]:
    x = activation(m, k)
    gigabytes = m * k * 3 / 1e9
    variants = {
        "fp8 rows": lambda: kernels.quantize_fp8_rows(x),
        "fp8 rows gelu": lambda: kernels.quantize_fp8_rows(x, gelu=True),
        "int8 rows": lambda: kernels_int8.quantize_int8_rows(x),
        "int8 rows gelu": lambda: kernels_int8.quantize_int8_rows(x, gelu=True),
        "int8 rows rotate": lambda: kernels_int8.quantize_int8_rows(x, rotate_groupsize=256),
        "int8 rows gelu rotate": lambda: kernels_int8.quantize_int8_rows(x, gelu=True, rotate_groupsize=256),
    }
    if k > 4096:  # against the default whole row: 4,096-feature chunks, each read twice (amax, quantize)
        variants["int8 rows gelu rotate, 4096 chunks"] = lambda: kernels_int8._quantize_int8_launch(
            x, True, 256, block_k=4096)
    rows = []
    for name, fn in variants.items():
        row = {"table": "quantize", "M": m, "K": k, "name": name}
        try:
            ms = bench_graphed(fn)
            row.update(ms=ms, gb_per_s=gigabytes / ms * 1e3)
        except Exception as error:  # noqa: BLE001
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:100] if str(error) else ''}"
            FAILED.append(f"{name} {m}x{k}")
        rows.append(row)
    return rows


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, bytes read plus written: the quantizers' ceiling."""
    source = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    target = torch.empty_like(source)
    return 2 * source.numel() / bench(lambda: target.copy_(source)) / 1e6


def print_tables(rows: list[dict]) -> None:
    for table, unit in (("gemm", "TOP/s"), ("linear", "TOP/s")):
        print(f"\n{table}: {'GEMM on quantized operands' if table == 'gemm' else 'whole Linear from bf16'}")
        print(f"{'M':>6} {'N':>6} {'K':>6}  {'contender':<30}{'ms':>8}{unit:>8}{'vs bf16':>9}{'eager ms':>10}"
              f"{'err/fp32':>10}  config")
        base = {}
        for r in (r for r in rows if r["table"] == table):
            head = f"{r['M']:>6} {r['N']:>6} {r['K']:>6}  {r['name']:<30}"
            if "error" in r:
                print(f"{head}failed: {r['error']}")
                continue
            key = (r["M"], r["N"], r["K"])
            base.setdefault(key, r["ms"])
            err = f"{r['err_vs_fp32']:>10.4f}" if "err_vs_fp32" in r else " " * 10
            print(f"{head}{r['ms']:>8.3f}{r['tflops']:>8.0f}{base[key] / r['ms']:>8.2f}x{r['eager_ms']:>10.3f}{err}"
                  f"  {r.get('config', '')}")
    print(f"\nactivation quantizers (GB/s: one bf16 read + one 8-bit write; a 1 GiB copy here: "
          f"{copy_bandwidth():.0f} GB/s)")
    print(f"{'M':>6} {'K':>6}  {'kernel':<36}{'ms':>8}{'GB/s':>8}")
    for r in (r for r in rows if r["table"] == "quantize"):
        head = f"{r['M']:>6} {r['K']:>6}  {r['name']:<36}"
        print(f"{head}failed: {r['error']}" if "error" in r else f"{head}{r['ms']:>8.3f}{r['gb_per_s']:>8.0f}")


# Per compile target: the GEMM tile list it takes (Turing none: torch._int_mm) and its shared memory.
COMPILE_TARGETS = {75: (None, 64 * 1024), 80: ("a100", 163 * 1024), 86: ("small-smem", 99 * 1024),
                   90: ("hopper", 227 * 1024)}


def compile_for(fn, signature: dict, constexprs: dict, capability: int, num_warps: int, num_stages: int = 3
                ) -> dict:
    """Shared memory, registers and spill bytes of `fn` compiled for sm_<capability>, pointers and
    integer arguments 16-aligned as the launcher specializes them. The numbers come from the `ptxas -v`
    log of Triton's own compilation, not from a second ptxas run: the ptxas and flags of the real
    kernels, whichever ptxas this Triton is set up with. A failing ptxas raises with its stderr."""
    import contextlib
    import io
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    aligned = {(index,): [["tt.divisibility", 16]] for index, kind in enumerate(signature.values())
               if kind.startswith("*") or kind == "i32"}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned)
    printed = io.StringIO()
    with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope(), contextlib.redirect_stdout(printed):
        triton.knobs.nvidia.dump_ptxas_log = True  # Triton prints its ptxas -v log
        triton.knobs.compilation.always_compile = True  # a cached kernel would skip ptxas
        kernel = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                options={"num_warps": num_warps, "num_stages": num_stages})
    log = printed.getvalue()
    registers, spills = re.search(r"Used (\d+) registers", log), re.search(r"(\d+) bytes spill stores", log)
    if registers is None or spills is None:
        raise RuntimeError(f"no ptxas -v log in Triton's output: {log[-2000:]!r}")
    return {"smem": kernel.metadata.shared, "regs": int(registers.group(1)), "spills": int(spills.group(1))}


def compile_variants(capability: int, tiles: str):
    """(name, kernel, signature, constexprs, warps, stages) of what a GPU of `capability` runs."""
    from quant.kernels import _fp8_rows_to_bf16_kernel, _nvfp4_rows_kernel
    for out in ("*fp16",) if capability < 80 else ("*fp16", "*bf16"):
        yield (f"fp8 rows -> {out[1:]}", _fp8_rows_to_bf16_kernel,
               {"data_ptr": "*u8", "scale_ptr": "*fp32", "out_ptr": out, "N": "i32", "K": "i32",
                "stride_data": "i32", "stride_out": "i32"}, {"BLOCK_N": 16, "BLOCK_K": 256, "INTERPRET": False}, 4, 3)
        yield (f"nvfp4 -> {out[1:]}", _nvfp4_rows_kernel,
               {"packed_ptr": "*u8", "scales_ptr": "*u8", "global_scale_ptr": "*fp32", "row_ratio_ptr": "*fp32",
                "out_ptr": out, "N": "i32", "K": "i32", "stride_packed": "i32", "stride_out": "i32",
                "scale_cols_padded": "i32"}, {"TO_FP8": False, "BLOCK_N": 16, "BLOCK_K": 256, "INTERPRET": False}, 4, 3)
    quantizer = {"x_ptr": "*bf16" if capability >= 80 else "*fp16", "out_ptr": "*i8", "scale_ptr": "*fp32",
                 "stride_x": "i32", "stride_out": "i32"}
    for k, gelu, group in ((4096, False, 0), (16384, True, 0), (4096, False, 256), (16384, True, 256)):
        block = kernels.row_block(k)
        yield (f"quantize K={k} gelu={gelu} rotate={group}", kernels_int8._quantize_int8_kernel,
               quantizer, {"K": k, "GELU": gelu, "ROTATE_GROUP": group,
                           "ROTATE_SCALE": group ** -0.5 if group else 1.0, "BLOCK_K": block},
               kernels.row_warps(block), 3)
    gpu_class = COMPILE_TARGETS[capability][0]
    if gpu_class is None:
        return
    gemm = {"a_ptr": "*i8", "b_ptr": "*i8", "c_ptr": "*bf16", "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32",
            "bias_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "M_BUCKET": "i32"}
    flags = {"B_SCALE_PER_N": True, "HAS_BIAS": True, "INTERPRET": False}
    lists = [("gemm", kernels_int8._int8_mm_kernel, kernels_int8.GEMM_TILES[gpu_class], {})]
    if gpu_class == "hopper":
        lists.append(("gemm persistent", kernels_int8._int8_mm_persistent_kernel, kernels_int8.PERSISTENT_TILES,
                      {"NUM_SMS": 132, "WARP_SPECIALIZE": False}))
        lists.append(("gemm persistent warp-specialized", kernels_int8._int8_mm_persistent_kernel,
                      kernels_int8.WARP_SPECIALIZED_TILES, {"NUM_SMS": 132, "WARP_SPECIALIZE": True}))
    for name, kernel, tile_list, extra in lists:
        if tiles == "largest":  # pipeline stages and bf16 output tile: the closest to the shared memory limit
            tile_list = [max(tile_list, key=lambda t: (t[0] + t[1]) * t[2] * t[3] + t[0] * t[1] * 2)]
        for block_m, block_n, block_k, stages, warps in tile_list:
            yield (f"{name} {block_m}x{block_n}x{block_k} stages {stages} warps {warps}", kernel, gemm,
                   {**flags, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8, **extra},
                   warps, stages)


def compile_report(tiles: str) -> list[str]:
    lines = []
    for capability, (_, smem_limit) in COMPILE_TARGETS.items():
        for name, kernel, signature, constexprs, warps, stages in compile_variants(capability, tiles):
            label = f"sm_{capability} {name}"
            try:
                info = compile_for(kernel, signature, constexprs, capability, warps, stages)
            except Exception as error:  # noqa: BLE001
                # the message's end: ptxas's stderr and the repro command, or the compiler's error
                reason = "\n      ".join(str(error).strip().splitlines()[-12:])
                lines.append(check(label, False, f"does not compile ({type(error).__name__}):\n      {reason}"))
                continue
            lines.append(check(label, info["spills"] == 0 and info["smem"] <= smem_limit,
                               f"{info['smem'] / 1024:.0f} KB shared (limit {smem_limit // 1024}), "
                               f"{info['regs']} registers, {info['spills']} bytes spilled"))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="24,576 tokens, the two large shapes only")
    parser.add_argument("--capability", help="answer CUDA capability queries with this (e.g. 8.0)")
    parser.add_argument("--out", help="write every number as JSON here")
    parser.add_argument("--compile-report", nargs="?", const="all", choices=("all", "largest"),
                        help="compile for sm_75/80/86/90 and report resources (no GPU needed)")
    args = parser.parse_args()
    if args.compile_report:
        print("\n".join(compile_report(args.compile_report)))
        print(f"{len(FAILED)} failed" + (": " + ", ".join(FAILED) if FAILED else ""))
        sys.exit(1 if FAILED else 0)
    if args.capability:
        forced_capability.force(forced_capability.parse(["--capability", args.capability]))
    try:
        import comfy_kitchen
    except ImportError:
        comfy_kitchen = None
    gpu_class = kernels_int8.gemm_class(DEVICE)
    persistent_ok = gpu_class == "hopper"
    print(f"device: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()}"
          f"{' forced' if args.capability else ''}, tiles '{gpu_class}'), torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}, comfy-kitchen "
          f"{getattr(comfy_kitchen, '__version__', 'installed') if comfy_kitchen else 'not installed'}")
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    tokens = TOKENS[:1] if args.quick else TOKENS
    shapes = SHAPES[1:3] if args.quick else SHAPES
    rows, lines = [], []
    for m in tokens:
        for k in sorted({k for _, k in shapes}):
            lines += check_quantizers(m, k)
            rows += quantizer_rows(m, k)
        for n, k in shapes:
            shape_rows, shape_lines = run_shape(m, n, k, persistent_ok, comfy_kitchen)
            rows += shape_rows
            lines += shape_lines
            torch.cuda.empty_cache()
    print("\n".join(lines))
    print_tables(rows)
    print(f"\n{len(FAILED)} failed checks" + (": " + ", ".join(FAILED) if FAILED else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
                       "rows": rows, "checks": lines}, f, indent=1)
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
