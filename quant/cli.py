"""Command line: `python -m quant {demo,quantize,inspect,quality-layers,synth}`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import replace

from . import ltx2
from .checkpoint import CheckpointInfo, inspect_checkpoint
from .conversion import quantize_file
from .outliers import Outliers
from .policies import POLICIES, format_table, get_policy, summarize
from .safetensors_io import CheckpointError, SafetensorsFile, check_output_path, save_tensors
from .weights import FormatError

MAX_DEMO_BLOCKS = 48  # the release's depth; the demo and synth files are for trying things out
MAX_TOKENS = 8192  # quality-layers input rows: 512 MiB for the widest LTX-2.3 layer input in float32


def whole_number(low: int, high: int):
    """An argparse type: a whole number from `low` to `high`, refused with the range otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not from {low} to {high:,}")
        return value
    return parse


def fraction(text: str) -> float:
    """An argparse type: a number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value:g} is not from 0 to 1")
    return value


def _add_scope_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--every-block-linear", action="store_true",
                   help="start from every block linear, without the policy's own bf16 layers "
                        "(fp8-scaled-mm keeps the audio-to-video attention's to_k, to_v and to_out.0 in bf16)")
    p.add_argument("--include", action="append", default=[], metavar="PATTERN",
                   help="also quantize layers matching this fnmatch pattern (unprefixed names)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="keep layers matching this pattern in high precision (wins over --include)")
    p.add_argument("--keep-first", type=whole_number(0, 4096), default=0, metavar="N",
                   help="keep the first N blocks unquantized")
    p.add_argument("--keep-last", type=whole_number(0, 4096), default=0, metavar="N",
                   help="keep the last N blocks unquantized")
    p.add_argument("--keep-audio", action="store_true", help="keep the audio-side linears unquantized")
    p.add_argument("--connectors", action="store_true",
                   help="also quantize the text connectors (8-bit, weight-only; 1.9 GiB less for LTX-2.3)")
    p.add_argument("--audio-8bit", action="store_true",
                   help="nvfp4: the audio-side linears in FP8 instead (lower error, 1.6 GiB more for LTX-2.3)")
    p.add_argument("--8bit", dest="eight_bit", action="append", default=[], metavar="PATTERN",
                   help="nvfp4: block linears matching this pattern in FP8 instead")


def _scope(args: argparse.Namespace) -> dict:
    return {"include": args.include, "exclude": args.exclude, "keep_first_blocks": args.keep_first,
            "keep_last_blocks": args.keep_last, "keep_audio": args.keep_audio, "connectors": args.connectors,
            "audio_8bit": args.audio_8bit, "eight_bit": args.eight_bit, "policy_scope": not args.every_block_linear}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m quant", description="LTX-2 Quant: quantization core")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="quantize a small synthetic LTX-2.3-shaped model with every policy")
    demo.add_argument("--blocks", type=whole_number(1, MAX_DEMO_BLOCKS), default=4)

    quantize = sub.add_parser("quantize", help="quantize a safetensors checkpoint, streaming")
    quantize.add_argument("input")
    quantize.add_argument("output")
    quantize.add_argument("--policy", required=True, choices=list(POLICIES))
    quantize.add_argument("--comfy-compatible", action="store_true",
                          help="per-tensor FP8 scales, so stock ComfyUI (without this pack) loads the file")
    quantize.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    quantize.add_argument("--table", action="store_true", help="print the per-layer decision table")
    quantize.add_argument("--calibration", metavar="AMAX_JSON", help="per-channel amax for --smooth (this pack's "
                                                                      "calibration files carry it)")
    _add_outlier_options(quantize)
    _add_scope_options(quantize)

    inspect = sub.add_parser("inspect", help="show a checkpoint's layers, formats, bytes and config")
    inspect.add_argument("file")
    inspect.add_argument("--all", action="store_true", help="list every layer, not only quantized ones")

    quality = sub.add_parser("quality-layers", help="per-layer weight error and output SNR of policies vs the "
                                                    "full-precision file (no ComfyUI; random or calibrated inputs)")
    quality.add_argument("file")
    quality.add_argument("--policy", action="append", choices=list(POLICIES), metavar="POLICY",
                         help="policy to measure (repeatable; default: every quantizing policy)")
    quality.add_argument("--calibration", metavar="AMAX_JSON",
                         help="use its static activation scales, and shape inputs by its per-channel amax")
    _add_outlier_options(quality)
    quality.add_argument("--tokens", type=whole_number(1, MAX_TOKENS), default=256, help="input rows per layer")
    quality.add_argument("--worst", type=whole_number(0, 1_000_000), default=20, metavar="N",
                         help="list the N worst layers per policy")
    quality.add_argument("--out", metavar="JSON", help="write the full report here")
    quality.add_argument("--overwrite", action="store_true", help="replace the --out file if it exists")
    _add_scope_options(quality)

    synth = sub.add_parser("synth", help="write a small random LTX-2.3-shaped checkpoint (for trying things out)")
    synth.add_argument("output")
    synth.add_argument("--blocks", type=whole_number(1, MAX_DEMO_BLOCKS), default=2)
    synth.add_argument("--prefix", action="store_true", help=f"use the single-file {ltx2.CHECKPOINT_PREFIX!r} prefix")
    synth.add_argument("--overwrite", action="store_true")
    return parser


def _add_outlier_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smooth", type=fraction, default=0.0, metavar="ALPHA",
                        help="smooth each quantized block Linear (SmoothQuant, quant.outliers) with this migration "
                             "strength from --calibration's per-channel amax; 0.5 measured best (docs/QUALITY.md)")
    parser.add_argument("--low-rank", type=fraction, default=0.0, metavar="FRACTION",
                        help="keep each block Linear's dominant singular directions in a bf16 branch of at most this "
                             "fraction of its quantized bytes (quant.outliers; 0.1 measured)")


def describe(info: CheckpointInfo, show_all: bool) -> str:
    lines = [f"file: {info.path}", f"kind: {info.kind}; family: {info.family}; blocks: {info.num_blocks}; "
             f"prefix: {info.prefix!r}"]
    counts: dict[str, int] = {}
    for s in info.layers.values():
        counts[s.format] = counts.get(s.format, 0) + 1
    lines.append(f"weights by format: {counts}; weight bytes: {sum(s.nbytes for s in info.layers.values()):,}")
    lines.append("config: " + (json.dumps(info.config, sort_keys=True) if info.config else "none in header"))
    lines.append(f"{'layer':<60}{'shape':>14}  {'format':<22}{'bytes':>14}")
    for s in info.layers.values():
        if show_all or s.quantized:
            lines.append(f"{s.layer:<60}{'x'.join(map(str, s.shape)):>14}  {s.format:<22}{s.nbytes:>14,}")
    return "\n".join(lines)


def check_report_path(out: str, model: str, overwrite: bool) -> None:
    """The --out file is checked before the measurement runs: it must not be the model file, nor an
    existing file unless --overwrite."""
    check_output_path(out)
    if os.path.exists(out) and os.path.exists(model) and os.path.samefile(out, model):
        raise FileExistsError(f"{out}: is the model file being measured; refusing to write the report over it")
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"{out}: exists; refusing to overwrite (pass --overwrite to replace it)")


def _channel_amax(args: argparse.Namespace) -> dict | None:
    """--calibration's per-channel amax; with --smooth, an error naming the file when it has none."""
    from . import calibration
    channels = calibration.load_channel_amax(args.calibration) if args.calibration else None
    if args.smooth and not channels:
        raise ValueError(f"--smooth needs a --calibration file with per-channel amax (amax_per_channel); "
                         f"{args.calibration + ' has none' if args.calibration else 'none was given'}")
    return channels


def quality_layers(args: argparse.Namespace) -> str:
    from . import calibration, quality
    if args.out:
        check_report_path(args.out, args.file, args.overwrite)
    amax = calibration.load_amax(args.calibration) if args.calibration else None
    channels = _channel_amax(args)
    handling = Outliers(smooth_alpha=args.smooth, low_rank_bytes=args.low_rank)
    report, lines = {}, []
    for name in args.policy or [p for p in POLICIES if POLICIES[p].weight_format]:
        policy = replace(get_policy(name, **_scope(args)), outliers=handling)
        rows = quality.file_layer_quality(args.file, policy, amax, channels, tokens=args.tokens,
                                          calibration=args.calibration)
        summary = quality.group_summary(rows)
        report[name] = {"layers": rows, "groups": summary}
        lines += [f"== {name}: {len(rows)} quantized layers, worst {min(args.worst, len(rows))}",
                  quality.format_layer_table(rows, args.worst), quality.format_group_table(summary), ""]
    if args.out:
        quality.write_report(args.out, {"file": args.file, "calibration": args.calibration, "smooth": args.smooth,
                                        "low_rank": args.low_rank, "policies": report}, overwrite=args.overwrite)
        lines.append(f"wrote {args.out}")
    return "\n".join(lines)


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (kill, a closing terminal's session manager) ends the process without unwinding, which
    # would leave the temp file of a write in progress; as an exception, atomic_file removes it.
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.command == "demo":
            from .demo import format_demo, run_demo
            start = time.perf_counter()
            print(format_demo(run_demo(num_layers=args.blocks)))
            print(f"({time.perf_counter() - start:.1f} s)")
        elif args.command == "quantize":
            policy = replace(get_policy(args.policy, fp8_per_tensor=args.comfy_compatible, **_scope(args)),
                             outliers=Outliers(smooth_alpha=args.smooth, low_rank_bytes=args.low_rank))
            start = time.perf_counter()
            result = quantize_file(args.input, args.output, policy, overwrite=args.overwrite,
                                   channel_amax=_channel_amax(args), calibration=args.calibration,
                                   stock_loadable=args.comfy_compatible)
            elapsed = time.perf_counter() - start
            if args.table:
                print(format_table(result.decisions, only_changed=True))
            s = summarize(result.decisions)
            print(f"wrote {args.output}: {result.bytes_written:,} bytes in {elapsed:.1f} s; weights "
                  f"{s['bytes_before']:,} -> {s['bytes_after']:,} ({s['ratio']:.2f}x); {s['layers_by_format']}")
        elif args.command == "inspect":
            with SafetensorsFile(args.file) as f:
                print(describe(inspect_checkpoint(f, require_ltx=False), args.all))
        elif args.command == "quality-layers":
            print(quality_layers(args))
        elif args.command == "synth":
            config = ltx2.tiny_config(num_layers=args.blocks)
            state = ltx2.synthetic_state_dict(config)
            if args.prefix:
                state = {ltx2.CHECKPOINT_PREFIX + k: v for k, v in state.items()}
            save_tensors(args.output, state, ltx2.header_metadata(config), overwrite=args.overwrite)
            print(f"wrote {args.output}: {len(state)} tensors, LTX-2.3 layout, {args.blocks} blocks")
    except (CheckpointError, FormatError, FileExistsError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
