"""The whole video, end to end: the distilled two-stage text-to-video (or, `--i2v`, image-to-video)
workflow run through a real ComfyUI's node classes, called one after another with their graph's inputs as
ComfyUI's executor calls them (its caching and UI messages aside), with random weights of the real shapes.
Per phase: seconds, peak VRAM and host RSS, and the total.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_workflow.py --config-from ltx-2.3-22b-distilled-1.1.safetensors \
        [--modes "core bf16,core fp8,fp8-scaled-mm,nvfp4"] [--sizes 768x512x121,1536x1024x121] [--vram-gb 24] [--i2v]
    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_workflow.py --tiny      # (or --dry-run) the tiny models, CPU

Modes: `core bf16` and `core fp8` are ComfyUI core's template as shipped (CheckpointLoaderSimple,
LTXAVTextEncoderLoader, SamplerCustomAdvanced per stage with LTXVLatentUpsampler between, VAEDecodeTiled,
LTXVAudioVAEDecode) on bf16 files and on per-tensor FP8 files as stock ComfyUI reads them; a pack policy
(`fp8-scaled-mm`, `int8-convrot`, `nvfp4`, ...) is the pack's workflow: its loader and text-encoder loader
at that policy, Attention `auto-8bit` and Compile Blocks (`blocks, cuda graphs` for nvfp4), its two-stage
sampler, the same decodes. Phases: `load files` (loader nodes), `text encode`, `stage 1`, `upsample`,
`stage 2`, `video decode`, `audio decode`, `GPU loads/moves` (ComfyUI's load_models_gpu, taken out of the
phase that asked for it), `other` (empty latents, sigmas, patches).

Weights: the transformer (LTX-2.3, 48 blocks) and Gemma 3 12B + projection from the pack's shape tables;
the video VAE, audio VAE + vocoder and the x2 upsampler from the configs in the header of a release
checkpoint (`--config-from`: only its header is read) and in ltx2.md (upsampler), built by ComfyUI's own
classes. They are written once into `--models-dir` (about 100 GB for every mode) and reused.

`--vram-gb N` makes a bigger card behave as one of N GiB: ComfyUI's `--reserve-vram` (total - N), so its
model management plans loads, partial loads and offloads for N GiB, and the CUDA allocator's per-process
fraction N/total, so any allocation past N fails as it would on that card (without it, activations would
borrow the rest of the card unnoticed; without the reservation ComfyUI would keep whole models resident
and then run out of memory where a real N GiB card would have offloaded).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.environ["COMFYUI_PATH"])

from bench.workflow_graphs import BENCH_AUDIO_LATENT, MODES, core_graph, pack_graph  # noqa: E402
from bench.workflow_phases import emulate_card  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--sizes", default="768x512x121,1536x1024x121")
    parser.add_argument("--vram-gb", type=float, help="behave as a card of this many GiB (see the module doc)")
    parser.add_argument("--i2v", action="store_true", help="image-to-video (a random first frame)")
    parser.add_argument("--tiny", "--dry-run", dest="tiny", action="store_true",
                        help="the same workflow and phase split on the tiny test models, on the CPU")
    parser.add_argument("--models-dir", default=os.path.join(REPO, "bench", ".workflow_models"))
    parser.add_argument("--config-from", help="a release LTX-2.3 checkpoint: its header's VAE and audio configs")
    parser.add_argument("--out", help="write the rows as JSON here")
    return parser.parse_args(argv)


def load_nodes():
    """ComfyUI's nodes module with its built-in node modules and this pack, loaded as ComfyUI's start-up
    loads them (with the server object their extensions register routes on, never started). The order is
    main.py's: ComfyUI's `utils` package before `nodes`, which puts comfy/ (holding a utils.py) on the path."""
    import utils.extra_config  # noqa: F401
    import server
    import nodes
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server.PromptServer(loop)
    loop.run_until_complete(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if not loop.run_until_complete(nodes.load_custom_node(REPO)):
        raise SystemExit(f"ComfyUI could not load the pack from {REPO}")
    return nodes


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    emulate_card(args.vram_gb, cpu=args.tiny)  # before ComfyUI's model management is imported
    from bench import workflow_models
    from bench.workflow_phases import BenchAudioLatent, print_rows, run_graph, write_rows
    nodes = load_nodes()
    node_classes = {**nodes.NODE_CLASS_MAPPINGS, BENCH_AUDIO_LATENT: BenchAudioLatent}
    files = workflow_models.prepare(args.models_dir, args.tiny, args.config_from)
    sizes = [tuple(int(v) for v in s.split("x")) for s in (
        workflow_models.TINY_SIZES if args.tiny else args.sizes).split(",")]
    rows = []
    for mode in args.modes.split(","):
        for width, height, frames in sizes:
            build = core_graph if mode.startswith("core") else pack_graph
            graph = build(mode, files, width, height, frames, args.i2v, args.tiny)
            row = run_graph(graph, node_classes)
            row.update({"mode": mode, "size": f"{width}x{height}x{frames}", "i2v": args.i2v, "vram_gb": args.vram_gb})
            rows.append(row)
            print_rows([row])
    print_rows(rows)
    if args.out:
        write_rows(args.out, rows)
    return rows


if __name__ == "__main__":
    main()
