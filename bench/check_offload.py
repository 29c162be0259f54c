"""GPU check: a quantized model that does not fit still samples correctly when ComfyUI offloads it
(NO_VRAM: every layer stays in host memory and is moved per call) and gives the same latent as the
fully loaded model. Prints step time and peak VRAM for both.

    COMFYUI_PATH=/path/to/ComfyUI python bench/check_offload.py [--blocks 8]
"""

from __future__ import annotations

import argparse
import time

import torch

import bench_model as bm  # noqa: E402  (sets up ComfyUI and the pack)
import comfy.model_management as mm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--policies", default="fp8-scaled-mm,nvfp4,mxfp8")
    args = parser.parse_args()
    config = dict(bm.ltx2.LTX23_CONFIG, num_layers=args.blocks, connector_num_layers=1)
    metadata = bm.ltx2.header_metadata(config)
    state = bm.random_state(config)
    sigmas = bm.STAGE1[:4]
    print(f"{'policy':<16}{'mode':<10}{'s/step':>8}{'peak GiB':>10}{'rel diff':>10}")
    for policy in args.policies.split(","):
        results = {}
        for mode in ("resident", "offload"):
            saved = mm.vram_state
            mm.vram_state = mm.VRAMState.NO_VRAM if mode == "offload" else saved
            try:
                patcher = bm.build(policy, state, metadata)
                latent, positive = bm.inputs(patcher, 768, 512, 121)
                torch.cuda.reset_peak_memory_stats()
                bm.sample(patcher, latent, positive, sigmas[:2])
                start = time.perf_counter()
                video = bm.sample(patcher, latent, positive, sigmas).unbind()[0].float().cpu()
                seconds = (time.perf_counter() - start) / (len(sigmas) - 1)
                results[mode] = (video, seconds, torch.cuda.max_memory_allocated() / 2 ** 30)
            finally:
                mm.unload_all_models()
                mm.vram_state = saved
                del patcher
                mm.soft_empty_cache()
        ref = results["resident"][0]
        for mode, (video, seconds, peak) in results.items():
            diff = float((video - ref).norm() / ref.norm())
            print(f"{policy:<16}{mode:<10}{seconds:>8.3f}{peak:>10.2f}{diff:>10.2e}"
                  f"{'' if torch.isfinite(video).all() else '  NON-FINITE'}")


if __name__ == "__main__":
    main()
