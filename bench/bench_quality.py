"""End-to-end quality through ComfyUI: final-latent error and per-step velocity error vs core bf16 on the
same inputs, for ComfyUI core's pre-quantized fp8/nvfp4 and this pack's policies and scopes, with
static activation scales calibrated on *other* inputs (another seed and prompt). Also the ComfyUI-side
command for calibrating a file: `--save-amax`.

GPU, the issue's targets (full LTX-2.3 widths, random weights):
    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_quality.py --blocks 48 --size 768x512x121
CPU, sensitivity of scopes on a small random model (what docs/QUALITY.md reports):
    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_quality.py --width 256 --blocks 8 --size 256x256x25 --per-layer \
        --modes 'fp8-scaled-mm;fp8-scaled-mm+static;nvfp4;nvfp4:first=1,last=1'

Modes: `core bf16` is the reference; `core prequant fp8|nvfp4` are core's pre-quantized files (per-tensor
FP8 / NVFP4 with amax/6 block scales; FP8 without `input_scale`, with 1.0 (`core prequant fp8 scale1`) or
calibrated (`core prequant fp8+static`): see bench_model.prequantized_file); `POLICY[+static][:scope,...]` is this pack, with bench_model's
scope items (parse_mode), added to the policy's own scope: all (start from every block Linear instead),
first=N, last=N, audio (keep the audio branch), connectors (also the text
connectors, 8-bit), exclude=PATTERN, wo=PATTERN (weight-only), audio8 / 8bit=PATTERN (NVFP4 policies:
those layers FP8), per-tensor (FP8 policies: per-tensor weight scales); `+static` loads with the calibrated amax;
`+smooth[=ALPHA]` / `+lowrank[=FRACTION]` (bench_model's outlier items) smooth from this run's per-channel amax;
bench_model's patches (`+attn=triton-int8`, `+compile`) apply to any mode.
"""

from __future__ import annotations

import argparse
import gc
import json
from dataclasses import replace

import torch

from bench_model import apply_patches, model_io, parse_mode, prequantized_file, random_state, split_patches  # the ComfyUI bootstrap and the pack as ComfyUI imports it
import comfy.model_management  # noqa: E402
import comfy.nested_tensor  # noqa: E402
import comfy.sd  # noqa: E402
from ltx2_quant.nodes import quality_evaluation  # noqa: E402
from ltx2_quant.quant import conversion, ltx2, sampling  # noqa: E402
from ltx2_quant.quant.calibration import save_amax  # noqa: E402
from ltx2_quant.quant.load_options import LoadOptions  # noqa: E402
from ltx2_quant.quant.policies import get_policy, summarize  # noqa: E402
from ltx2_quant.quant.safetensors_io import MemoryTensors  # noqa: E402

DEFAULT_MODES = ["core prequant fp8", "core prequant nvfp4", "fp8-scaled-mm", "fp8-scaled-mm+static",
                 "nvfp4", "nvfp4:first=1,last=1", "nvfp4:audio", "nvfp4:first=2,last=2,audio"]


def inputs(config: dict, width: int, height: int, frames: int, seed: int, context_tokens: int,
           unprocessed: bool = False):
    """Conditioning (random text context, as a text encoder would give; `unprocessed`: marked raw, so
    the model's text connectors run on it) and an empty AV latent."""
    g = torch.Generator().manual_seed(seed)
    context = config["cross_attention_dim"] + config["audio_cross_attention_dim"]
    extra = {"unprocessed_ltxav_embeds": True} if unprocessed else {}
    positive = [[torch.randn(1, context_tokens, context, generator=g) * 0.5, {"frame_rate": 24.0, **extra}]]
    video = torch.zeros(1, 128, (frames - 1) // 8 + 1, height // 32, width // 32)
    audio = torch.zeros(1, 8, max(1, round(frames / 24 * 25)), 16)
    return positive, {"samples": comfy.nested_tensor.NestedTensor((video, audio))}


def build(mode: str, state: dict, metadata: dict, amax: dict | None, device: str,
          channel_amax: dict | None = None):
    """(MODEL, weight bytes) for a mode, with its model patches (`+attn=NAME`, `+compile`); smoothing
    (`+smooth`) takes `channel_amax`, the calibration pass's."""
    mode, patches = split_patches(mode)
    if patches:
        patcher, weight_bytes = build(mode, state, metadata, amax, device, channel_amax)
        return apply_patches(patcher, patches), weight_bytes
    source = MemoryTensors(state, metadata)
    if mode == "core bf16":
        patcher = comfy.sd.load_diffusion_model_state_dict(dict(state), {"dtype": torch.bfloat16}, metadata=metadata)
        return patcher, sum(t.numel() * 2 for k, t in state.items() if k.endswith(".weight"))
    if mode.startswith("core prequant"):
        loaded = prequantized_file(mode, state, metadata, device, amax)
        patcher = comfy.sd.load_diffusion_model_state_dict(loaded.state_dict, {}, metadata=loaded.metadata)
        return patcher, summarize(loaded.decisions)["bytes_after"]
    policy_name, static, scope, handling = parse_mode(mode)
    loaded = conversion.load_converted(source, replace(get_policy(policy_name, **scope), outliers=handling),
                                       device=device, channel_amax=channel_amax, calibration="this run's calibration")
    if static:
        model_io.apply_calibration(loaded, amax, channel_amax)
    return model_io.build_model(loaded, LoadOptions(policy_name))[0], summarize(loaded.decisions)["bytes_after"]


def release() -> None:
    comfy.model_management.unload_all_models()
    gc.collect()
    comfy.model_management.soft_empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=48)
    parser.add_argument("--width", type=int, help="video width (heads x 64) for a small model; default: LTX-2.3's")
    parser.add_argument("--size", default="768x512x121", help="WIDTHxHEIGHTxFRAMES of the video")
    parser.add_argument("--modes", default=";".join(DEFAULT_MODES), help="separated by ';'")
    parser.add_argument("--sigmas", default="distilled stage 1", choices=list(sampling.SIGMA_PRESETS))
    parser.add_argument("--context-tokens", type=int, default=256)
    parser.add_argument("--unprocessed", action="store_true",
                        help="feed raw text-encoder context so the text connectors run (and their quantization counts)")
    parser.add_argument("--per-layer", action="store_true", help="also per-layer SNR (copies bf16 weights to CPU)")
    parser.add_argument("--save-amax", metavar="JSON", help="write the calibration (amax per tensor and channel)")
    parser.add_argument("--weight-seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--out", metavar="JSON")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.width:
        heads = args.width // 64
        config = ltx2.tiny_config(num_layers=args.blocks, heads=heads, head_dim=64, audio_heads=heads, audio_head_dim=32)
    else:
        config = dict(ltx2.LTX23_CONFIG, num_layers=args.blocks, connector_num_layers=1)
    metadata = ltx2.header_metadata(config)
    state = random_state(config, device, args.weight_seed)
    width, height, frames = (int(v) for v in args.size.split("x"))
    sigmas = torch.tensor(sampling.SIGMA_PRESETS[args.sigmas])
    positive, latent = inputs(config, width, height, frames, seed=1, context_tokens=args.context_tokens,
                              unprocessed=args.unprocessed)
    calib_positive, calib_latent = inputs(config, width, height, frames, seed=7, context_tokens=args.context_tokens,
                                          unprocessed=args.unprocessed)
    print(f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"{args.blocks} blocks, {sum(t.numel() for t in state.values()) / 1e9:.3f} B params, {args.size}", flush=True)

    reference, reference_bytes = build("core bf16", state, metadata, None, device)
    recorder = quality_evaluation.calibrate(reference, calib_positive, calib_positive, calib_latent, sigmas, 1.0, seed=7)
    amax = recorder.per_tensor()
    if args.save_amax:
        save_amax(args.save_amax, amax, recorder.per_channel(), overwrite=True)
    rows = []
    for mode in args.modes.split(";"):
        candidate, weight_bytes = build(mode, state, metadata, amax, device, recorder.per_channel())
        report = quality_evaluation.compare_models(reference, {mode: candidate}, positive, positive, latent, sigmas, 1.0,
                                           seed=42, per_layer=args.per_layer)
        r = report["models"][mode]
        rows.append({"mode": mode, "weight_gib": weight_bytes / 2 ** 30, "err_video": r["final_error"][0],
                     "err_audio": r["final_error"][1], "cos_video": r["final_cosine"][0],
                     "velocity_mean": sum(r["velocity_error"]) / len(r["velocity_error"]),
                     "min_layer_snr_db": min((x.output_snr_db for x in r["layers"]), default=float("nan"))})
        print(f"{mode}: done, err video {rows[-1]['err_video']:.4f} audio {rows[-1]['err_audio']:.4f}", flush=True)
        del candidate
        release()
    print(f"{'mode':<34}{'weights GiB':>12}{'err video':>11}{'err audio':>11}{'cos video':>11}{'v err':>9}"
          f"{'min SNR':>9}")
    print(f"{'core bf16 (reference)':<34}{reference_bytes / 2 ** 30:>12.3f}")
    for r in rows:
        print(f"{r['mode']:<34}{r['weight_gib']:>12.3f}{r['err_video']:>11.4f}{r['err_audio']:>11.4f}"
              f"{r['cos_video']:>11.5f}{r['velocity_mean']:>9.4f}{r['min_layer_snr_db']:>9.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "blocks": args.blocks, "size": args.size, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
