"""Real GPU out-of-memory through the pack (issue #7; the CPU tests can only inject the error):

1. load-time quantization with the GPU nearly full (a ballast tensor stands for other apps and
   models): layers that do not fit are quantized on the CPU instead, with a logged reason;
2. sampling that runs out of memory: the error names the policies and sizes that would fit, the
   failed run's activations are already freed when it reaches ComfyUI, and once ComfyUI's OOM
   handling has unloaded the model, GPU memory is back where it started; a smaller run then works.

    COMFYUI_PATH=/path/to/ComfyUI python bench/check_oom.py [--blocks 8] [--policy nvfp4]
"""

from __future__ import annotations

import argparse
import gc
import logging

import torch

from bench_model import model_io  # the pack as ComfyUI imports it; puts COMFYUI_PATH on sys.path
import comfy.model_management  # noqa: E402
import comfy.nested_tensor  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
from ltx2_quant.quant import ltx2  # noqa: E402
from ltx2_quant.quant.load_options import LoadOptions  # noqa: E402
from ltx2_quant.quant.memory import GIB  # noqa: E402
from ltx2_quant.quant.safetensors_io import MemoryTensors  # noqa: E402

SIGMAS = [1.0, 0.99375, 0.9875]


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def ballast(leave_bytes: int) -> torch.Tensor:
    """Occupy the GPU's free memory except `leave_bytes`."""
    free, _ = torch.cuda.mem_get_info()
    return torch.empty(max(free - leave_bytes, 0), dtype=torch.uint8, device="cuda")


def sample(patcher, width: int, height: int, frames: int):
    dm = patcher.model.diffusion_model
    g = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, 1024, dm.cross_attention_dim + dm.audio_cross_attention_dim, generator=g) * 0.5,
                 {"frame_rate": 24.0}]]
    video = torch.zeros(1, 128, (frames - 1) // 8 + 1, height // 32, width // 32)
    audio = torch.zeros(1, 8, round(frames / 24 * 25), 16)
    latent = comfy.nested_tensor.NestedTensor((video, audio))
    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds(positive, positive)
    guider.set_cfg(1.0)
    return guider.sample(comfy.sample.prepare_noise(latent, 42), latent, comfy.samplers.sampler_object("euler"),
                         torch.tensor(SIGMAS), disable_pbar=True, seed=42)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--policy", default="nvfp4")
    parser.add_argument("--leave-gib", type=float, default=0.25, help="free memory left while quantizing")
    args = parser.parse_args()
    config = dict(ltx2.LTX23_CONFIG, num_layers=args.blocks, connector_num_layers=1)
    gen = torch.Generator().manual_seed(0)
    state = {key: (torch.randn(shape, generator=gen) * (shape[1] ** -0.5 if len(shape) == 2 else 0.02)).bfloat16()
             for key, shape in ltx2.model_shapes(config).items()}
    warnings = Warnings()
    logging.getLogger("ltx2_quant").addHandler(warnings)
    print(f"device {torch.cuda.get_device_name()}, {args.blocks} blocks, policy {args.policy}", flush=True)

    # 1. Quantizing with the GPU nearly full.
    start = torch.cuda.memory_allocated()
    full = ballast(int(args.leave_gib * GIB))
    patcher, _ = model_io.convert_and_build(MemoryTensors(state, ltx2.header_metadata(config)), LoadOptions(args.policy))
    fallbacks = [m for m in warnings.messages if "quantizing it on the CPU instead" in m]
    del full
    print(f"quantizing with {args.leave_gib} GiB free: loaded; {len(fallbacks)} layers fell back to the CPU "
          f"(e.g. {fallbacks[:1]})", flush=True)

    # 2. Sampling out of memory, then recovery.
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    loaded = torch.cuda.memory_allocated()
    full = ballast(int(0.5 * GIB))
    with_ballast = torch.cuda.memory_allocated()
    try:
        sample(patcher, 1536, 1024, 121)
        print("sampling did not run out of memory: lower --leave-gib or raise the size", flush=True)
        return
    except torch.OutOfMemoryError as e:
        after_error = torch.cuda.memory_allocated()
        print(f"error: {e}", flush=True)
        ok = str(e).startswith("LTX-2 Quant: out of GPU memory while sampling")
    print(f"allocated: before load {start / GIB:.2f} GiB, model loaded {loaded / GIB:.2f}, with ballast "
          f"{with_ballast / GIB:.2f}, right after the error {after_error / GIB:.2f} "
          f"(activations left: {(after_error - with_ballast) / 2 ** 20:.0f} MiB)", flush=True)
    del full
    comfy.model_management.unload_all_models()  # what ComfyUI's executor does on any OOM
    gc.collect()
    comfy.model_management.soft_empty_cache()
    print(f"after ComfyUI's OOM handling: {torch.cuda.memory_allocated() / GIB:.2f} GiB allocated "
          f"(started at {start / GIB:.2f})", flush=True)
    video, _ = sample(patcher, 768, 512, 25).unbind()
    print(f"then 768x512x25: {'finite' if torch.isfinite(video).all() else 'NOT finite'}; "
          f"message as expected: {ok}", flush=True)


if __name__ == "__main__":
    main()
