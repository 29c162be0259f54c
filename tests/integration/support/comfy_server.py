"""Start a real ComfyUI server (source from COMFYUI_PATH) headless on the CPU, and run API graphs."""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

from quant import ltx2

HERE = os.path.dirname(os.path.abspath(__file__))  # the integration tests' support folder
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
DISTILLED_STAGE1 = "1.0, 0.99375, 0.9875, 0.98125, 0.975, 0.909375, 0.725, 0.421875, 0.0"
# The tiny random LTX-2.3 transformer the integration tests load (2 blocks, narrow widths).
TINY_CONFIG = {"num_layers": 2, "heads": 4, "head_dim": 16, "audio_heads": 4, "audio_head_dim": 8}
# The tiny LTX-2.5 one: widths of 256, so every block Linear takes whole ConvRot groups as in the release.
TINY_LTX25_CONFIG = ltx2.tiny_config(num_layers=2, heads=4, head_dim=64, audio_heads=4, audio_head_dim=64,
                                     release=ltx2.LTX25_CONFIG)
# Its header, as the release's: the config and the model version (Lightricks' pipelines read it).
LTX25_METADATA = {**ltx2.header_metadata(TINY_LTX25_CONFIG), "model_version": "2.5.0"}


def write_tiny_model(path, seed: int, config: dict | None = None) -> None:
    """A random LTX-2.3-layout checkpoint with its header config (ltx2.tiny_config(**TINY_CONFIG) by default)."""
    from quant.safetensors_io import save_tensors
    config = config or ltx2.tiny_config(**TINY_CONFIG)
    save_tensors(path, ltx2.synthetic_state_dict(config, seed=seed), ltx2.header_metadata(config))


def write_lora(path, config: dict, layers: list[str], seed: int, b_scale: float, a_scale: float | None = None) -> None:
    """A rank-4 LoRA (ComfyUI's `diffusion_model.<layer>.lora_A/B` keys) on `layers` of a `config` model;
    A defaults to 1/sqrt(in_features) so the update is O(b_scale)."""
    import torch
    from safetensors.torch import save_file
    shapes = ltx2.model_shapes(config)
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for layer in layers:
        out_features, in_features = shapes[layer + ".weight"]
        a = in_features ** -0.5 if a_scale is None else a_scale
        lora[f"diffusion_model.{layer}.lora_A.weight"] = torch.randn(4, in_features, generator=g) * a
        lora[f"diffusion_model.{layer}.lora_B.weight"] = torch.randn(out_features, 4, generator=g) * b_scale
    save_file(lora, str(path))


def run_check(script: str, *args: str, timeout: float) -> dict:
    """Run a check script of this folder in its own Python process (a fresh ComfyUI import each time) and
    return the JSON it prints last on a `RESULT ` line; fails with the end of its output otherwise."""
    out = subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, args)],
                         capture_output=True, text=True, timeout=timeout)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def missing_requirements() -> str | None:
    """Why the ComfyUI tests cannot run here, or None."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        return "COMFYUI_PATH is not set (point it at a ComfyUI v0.20.1 checkout to run the integration tests)"
    if not os.path.exists(os.path.join(path, "main.py")):
        return f"COMFYUI_PATH={path} has no main.py"
    for module in ("aiohttp", "comfy_aimdo", "torchaudio", "einops", "transformers"):
        try:
            __import__(module)
        except Exception:
            return f"this interpreter lacks ComfyUI's requirement {module!r}"
    return None


@functools.cache
def ltx25_missing() -> str | None:
    """Why this ComfyUI cannot run LTX-2.5 (its LTXAVModel builds no bias-free FFNs), or None; asked
    once, in a subprocess (the test process does not import comfy)."""
    check = ("import inspect, sys; sys.path.insert(0, sys.argv[1]); import comfy.cli_args; "
             "comfy.cli_args.args.cpu = True; from comfy.ldm.lightricks.av_model import LTXAVModel; "
             "print('ff_bias' in inspect.signature(LTXAVModel.__init__).parameters)")
    out = subprocess.run([sys.executable, "-c", check, os.environ["COMFYUI_PATH"]], capture_output=True, text=True,
                         timeout=300)
    builds = out.stdout.strip().splitlines()[-1:] == ["True"]
    return None if builds else "this ComfyUI has no LTX-2.5 (its LTXAVModel takes no ff_bias)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, base: str, with_pack: bool):
        self.base = base
        self.port = free_port()
        nodes = os.path.join(base, "custom_nodes_pack" if with_pack else "custom_nodes_plain")
        os.makedirs(nodes, exist_ok=True)
        if not os.path.exists(os.path.join(nodes, "comfy_test_nodes")):
            shutil.copytree(os.path.join(HERE, "comfy_test_nodes"), os.path.join(nodes, "comfy_test_nodes"))
        if with_pack and not os.path.exists(os.path.join(nodes, "ltx2-quant")):
            os.symlink(REPO, os.path.join(nodes, "ltx2-quant"))
        config = os.path.join(base, f"extra_model_paths_{'pack' if with_pack else 'plain'}.yaml")
        with open(config, "w") as f:
            f.write(f"test:\n  base_path: {base}\n  diffusion_models: models/diffusion_models\n"
                    f"  loras: models/loras\n  ltx2_calibration: models/ltx2_calibration\n  checkpoints: models/checkpoints\n"
                    f"  latent_upscale_models: models/latent_upscale_models\n  vae: models/vae\n"
                    f"  text_encoders: models/text_encoders\n"
                    f"  custom_nodes: {os.path.basename(nodes)}\n")
        self.output = os.path.join(base, "output")
        os.makedirs(os.path.join(base, "user"), exist_ok=True)
        # ComfyUI's own folders (custom_nodes, input, temp, models) under `base`: the source tree may
        # be read-only and, as a bare source snapshot, lack custom_nodes/ (startup lists it).
        os.makedirs(os.path.join(base, "custom_nodes"), exist_ok=True)
        self.log_path = os.path.join(base, f"server_{self.port}.log")
        self.log = open(self.log_path, "w")
        comfy = os.environ["COMFYUI_PATH"]
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", base,
             "--extra-model-paths-config", config, "--database-url", "sqlite:///:memory:",
             "--output-directory", self.output, "--user-directory", os.path.join(base, "user"),
             "--use-pytorch-cross-attention",
            ],
            cwd=comfy, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                self.get("/object_info/LTX2QTestInputs")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not come up in {timeout} s:\n{self.tail()}")

    def tail(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return "".join(f.readlines()[-60:])

    def get(self, route: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{route}", timeout=30) as r:
            return json.loads(r.read())

    def run(self, graph: dict, timeout: float = 300.0) -> dict:
        """Queue an API-format graph and wait for its history entry; raises with the server's error."""
        body = json.dumps({"prompt": graph, "client_id": uuid.uuid4().hex}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/prompt", body,
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                prompt_id = json.loads(r.read())["prompt_id"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"/prompt refused the graph: {e.read().decode()}") from None
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                entry = history[prompt_id]
                status = entry.get("status", {})
                if status.get("status_str") != "success":
                    raise RuntimeError(f"graph failed: {json.dumps(status.get('messages'))[-3000:]}\n{self.tail()}")
                return entry
            time.sleep(0.2)
        raise TimeoutError(f"graph did not finish in {timeout} s\n{self.tail()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def saved_latent(base: str, name: str) -> dict:
    """A latent the test node LTX2QTestSaveLatent wrote: {"video": ..., "audio": ...} (no audio for a
    video-only latent)."""
    from safetensors.torch import load_file
    return load_file(os.path.join(base, "output", "latents", name + ".safetensors"))


def rel(a, b) -> float:
    """Relative L2 difference of a to b."""
    return float((a - b).norm() / b.norm())


def sampling_graph(model_node: dict, name: str, sampler: str = "euler", extra: dict | None = None,
                   model_ref: list | None = None, unprocessed: bool = False) -> dict:
    """Model -> test inputs -> CFGGuider(cfg 1) + ManualSigmas (distilled stage 1) -> SamplerCustomAdvanced
    -> latent saved as `name`. `unprocessed`: raw text-encoder context, so the text connectors run."""
    graph = {"1": model_node}
    graph.update(extra or {})
    model = model_ref or ["1", 0]
    graph.update({
        "2": {"class_type": "LTX2QTestInputs", "inputs": {"model": model, "seed": 1, "frames": 9, "height": 64,
                                                          "width": 96, "unprocessed": unprocessed}},
        "3": {"class_type": "CFGGuider", "inputs": {"model": model, "positive": ["2", 0], "negative": ["2", 1],
                                                    "cfg": 1.0}},
        "4": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler}},
        "5": {"class_type": "ManualSigmas", "inputs": {"sigmas": DISTILLED_STAGE1}},
        "6": {"class_type": "RandomNoise", "inputs": {"noise_seed": 42}},
        "7": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["6", 0], "guider": ["3", 0],
                                                                "sampler": ["4", 0], "sigmas": ["5", 0],
                                                                "latent_image": ["2", 2]}},
        "8": {"class_type": "LTX2QTestSaveLatent", "inputs": {"samples": ["7", 0], "name": name}},
    })
    return graph


def loader_node(ckpt: str, policy: str, **extra) -> dict:
    inputs = {"ckpt_name": ckpt, "policy": policy, "nvfp4_mode": "fast", "scope": "policy default"}
    inputs.update(extra)
    return {"class_type": "LTX2QuantLoader", "inputs": inputs}
