"""The pack's video decode (nodes/decode.py) on the tiny LTX-2.3 VAE in one ComfyUI process (CPU), against
core's VAE Decode and VAE Decode (Tiled): tests/integration/test_decode_comfyui.py runs it in a subprocess
and reads the JSON it prints last.

usage: python decode_check.py CHECKPOINT
"""

from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(REPO, "scripts"))
from comfyui_pack import import_pack  # noqa: E402

import_pack(cpu=True)
import torch  # noqa: E402

import comfy.nested_tensor  # noqa: E402
import nodes as comfy_nodes  # noqa: E402

from ltx2_quant.nodes import decode, model_io  # noqa: E402


def main(checkpoint: str) -> dict:
    vae = model_io.load_vae(checkpoint)
    g = torch.Generator().manual_seed(5)
    video = torch.randn(1, 128, 3, 12, 16, generator=g)  # 512 x 384 px, 17 frames
    samples = {"samples": comfy.nested_tensor.NestedTensor((video, torch.zeros(1, 8, 18, 16)))}
    whole, whole_text = decode.decode_video(vae, samples)
    core_whole = comfy_nodes.VAEDecode().decode(vae, {"samples": video})[0]
    # A budget of half what ComfyUI estimates for the whole clip: tiles or chunks must be chosen.
    budget = decode.plan_for(vae, video, free_bytes=10 ** 12)[0].whole_bytes // 2
    tiled_plan, _ = decode.plan_for(vae, video, free_bytes=budget)
    tiled, tiled_text = decode.decode_video(vae, samples, free_bytes=budget)
    core_tiled = comfy_nodes.VAEDecodeTiled().decode(
        vae, {"samples": video}, tiled_plan.tile, tiled_plan.overlap, tiled_plan.frames or decode.ALL_FRAMES,
        tiled_plan.temporal_overlap if tiled_plan.frames else decode.ALL_FRAMES_OVERLAP)[0]
    return {
        "whole_text": whole_text, "whole_equal": torch.equal(whole, core_whole), "shape": list(whole.shape),
        "tiled_text": tiled_text, "tiled_equal": torch.equal(tiled, core_tiled),
        "tiled_plan": [tiled_plan.tile, tiled_plan.frames, tiled_plan.fits], "tiled_shape": list(tiled.shape)}


if __name__ == "__main__":
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        print("RESULT " + json.dumps(main(sys.argv[1])))
