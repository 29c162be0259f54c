"""Issue #7 in a real ComfyUI server (headless, CPU): bad model files through the loader, Cancel
(POST /interrupt) during loading, sampling and saving, running out of memory while quantizing and
while sampling, and Save names that would leave the model folder. After each fault the server
must run the next prompt, and give the result a clean start gives. Skips when COMFYUI_PATH is unset."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from support import faults
from support.comfy_server import (TINY_CONFIG, loader_node, ltx25_missing, missing_requirements, sampling_graph, saved_latent,
                                          write_lora, write_tiny_model)
from quant import ltx2
from quant.safetensors_io import save_tensors

REASON = missing_requirements()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

GOOD = "ltx2q_test_reliable.safetensors"
CONFIG = ltx2.tiny_config(**TINY_CONFIG)
LORA_LAYERS = ["transformer_blocks.0.attn1.to_q", "transformer_blocks.1.ff.net.2"]


class ArmedPickle:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def bad_files(folder, marker: str) -> dict[str, str]:
    """File name -> what the error must say."""
    state = ltx2.synthetic_state_dict(CONFIG, seed=3)
    metadata = ltx2.header_metadata(CONFIG)
    save_tensors(folder / "ltx2q_test_bad_truncated.safetensors", state, metadata)
    truncated = folder / "ltx2q_test_bad_truncated.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    (folder / "ltx2q_test_bad_empty.safetensors").write_bytes(b"")
    (folder / "ltx2q_test_bad_pickle.safetensors").write_bytes(pickle.dumps({"w": ArmedPickle(marker)}))
    save_tensors(folder / "ltx2q_test_bad_not_ltx.safetensors", {"model.layers.0.mlp.up_proj.weight": torch.zeros(8, 8)})
    nan = dict(state)
    nan["transformer_blocks.1.attn2.to_v.weight"] = nan["transformer_blocks.1.attn2.to_v.weight"].clone()
    nan["transformer_blocks.1.attn2.to_v.weight"][0, 0] = float("nan")
    save_tensors(folder / "ltx2q_test_bad_nan.safetensors", nan, metadata)
    missing = {k: v for k, v in state.items() if k != "transformer_blocks.0.audio_ff.net.2.weight"}
    save_tensors(folder / "ltx2q_test_bad_missing.safetensors", missing, metadata)
    ltx2_config = {k: v for k, v in CONFIG.items() if k != "apply_gated_attention"}
    save_tensors(folder / "ltx2q_test_bad_generation.safetensors", state, ltx2.header_metadata(ltx2_config))
    return {
        "ltx2q_test_bad_truncated.safetensors": "truncated",
        "ltx2q_test_bad_empty.safetensors": "0 bytes",
        "ltx2q_test_bad_pickle.safetensors": "pickles are never loaded",
        "ltx2q_test_bad_not_ltx.safetensors": "not an LTX-2 checkpoint",
        "ltx2q_test_bad_nan.safetensors": "layer 'transformer_blocks.1.attn2.to_v': tensor 'transformer_blocks.1.attn2.to_v.weight' has 1 NaN/Inf",
        "ltx2q_test_bad_missing.safetensors": "missing: transformer_blocks.0.audio_ff.net.2.weight",
        "ltx2q_test_bad_generation.safetensors": "config is LTX-2's",
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy")
    models = root / "models" / "diffusion_models"
    loras = root / "models" / "loras"
    models.mkdir(parents=True)
    loras.mkdir(parents=True)
    write_tiny_model(models / GOOD, seed=3, config=CONFIG)
    write_lora(loras / "ltx2q_test_reliable_lora.safetensors", CONFIG, LORA_LAYERS, seed=5, b_scale=0.5)
    return root


@pytest.fixture(scope="module")
def bad(base):
    marker = str(base / "pickle_ran")
    return bad_files(base / "models" / "diffusion_models", marker), marker


@pytest.fixture(scope="module")
def server(base, bad):
    s = faults.start_server(str(base))
    yield s
    s.stop()


def models_folder(base) -> str:
    return os.path.join(str(base), "models", "diffusion_models")


def same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def run_twice_from_clean(server, base, graph: dict, name: str) -> tuple[tuple, tuple]:
    """The graph's latent now, and after ComfyUI dropped every model and cached output."""
    server.run(graph)
    now = tuple(saved_latent(base, name).values())
    faults.free(server)
    server.run(graph)
    return now, tuple(saved_latent(base, name).values())


@pytest.mark.parametrize("index", range(7))
def test_bad_file_gives_a_clear_error_and_the_server_goes_on(server, base, bad, index):
    files, marker = bad
    name, needle = sorted(files.items())[index]
    message = faults.error_message(server, sampling_graph(loader_node(name, "nvfp4"), f"bad_{index}"))
    assert name in message and needle in message, message
    assert not os.path.exists(marker)  # the pickle never ran
    server.run(sampling_graph(loader_node(GOOD, "nvfp4"), f"after_bad_{index}"))


@pytest.mark.parametrize("weight_dtype", ["fp8_e4m3fn", "fp8_e4m3fn_fast"])
def test_quantize_node_on_a_model_core_cast_to_fp8(server, base, weight_dtype):
    # Core's fp8 weight dtypes cast norms too; that crashed the Quantize node with an unpacking error.
    core = {"class_type": "UNETLoader", "inputs": {"unet_name": GOOD, "weight_dtype": weight_dtype}}
    quantize = {"9": {"class_type": "LTX2QuantQuantizeModel",
                      "inputs": {"model": ["1", 0], "policy": "nvfp4", "nvfp4_mode": "fast", "scope": "all block linears"}}}
    server.run(sampling_graph(core, f"core_{weight_dtype}", extra=quantize, model_ref=["9", 0]))
    assert all(torch.isfinite(t).all() for t in tuple(saved_latent(base, f"core_{weight_dtype}").values()))


def test_cancel_while_loading(server, base):
    graph = sampling_graph(loader_node(GOOD, "nvfp4", scope="keep audio branch"), "cancel_load")
    entry = faults.cancel_at(server, graph, node="1", step=20)
    assert interrupted_and_failed(entry)
    after, clean = run_twice_from_clean(server, base, graph, "cancel_load")
    assert same(after, clean)


def test_cancel_while_sampling_with_a_lora(server, base):
    lora = {"9": {"class_type": "LoraLoaderModelOnly",
                  "inputs": {"model": ["1", 0], "lora_name": "ltx2q_test_reliable_lora.safetensors",
                             "strength_model": 1.0}}}
    graph = sampling_graph(loader_node(GOOD, "fp8-scaled-mm"), "cancel_sample", extra=lora, model_ref=["9", 0])
    entry = faults.cancel_at(server, graph, node="7", step=3)
    assert interrupted_and_failed(entry)
    # The interrupted run had the model loaded and the LoRA patched in: whatever it left behind
    # must not change the next result.
    after, clean = run_twice_from_clean(server, base, graph, "cancel_sample")
    assert same(after, clean)


def interrupted_and_failed(entry: dict) -> bool:
    return faults.interrupted(entry) and entry["status"]["status_str"] == "error"


def test_cancel_while_saving_leaves_no_file(server, base):
    name = f"ltx2q_test_cancelled_save_{os.getpid()}.safetensors"
    graph = {"1": loader_node(GOOD, "nvfp4"),
             "2": {"class_type": "LTX2QuantSave", "inputs": {"model": ["1", 0], "folder": models_folder(base),
                                                             "filename": name, "comfy_compatible": True,
                                                             "overwrite": False}}}
    entry = faults.cancel_at(server, graph, node="2", step=5)
    assert interrupted_and_failed(entry)
    assert not [n for n in os.listdir(models_folder(base)) if n == name or n.startswith(".tmp-")]
    server.run(graph)
    assert len(load_file(os.path.join(models_folder(base), name))) > 0
    os.unlink(os.path.join(models_folder(base), name))


def test_out_of_memory_while_sampling(server, base):
    graph = sampling_graph(loader_node(GOOD, "fp8-scaled-mm"), "oom_sample")
    graph["6"]["inputs"]["noise_seed"] = 4242  # a sampler run no earlier test has cached
    faults.post(server, "/ltx2_quant_test/oom", {"where": "sampling"})
    message = faults.error_message(server, graph)
    assert message.startswith("torch.OutOfMemoryError: LTX-2 Quant: out of GPU memory while sampling with policy "
                              "fp8-scaled-mm: it needs about"), message
    # The video's size as the model saw it: 96x64 pixels, 9 frames (test inputs).
    assert "(estimated for 96x64x9)" in message and "nvfp4 (about" in message and "smaller video" in message
    assert "Got an OOM, unloading all loaded models" in server.tail()  # ComfyUI's own OOM handling ran
    after, clean = run_twice_from_clean(server, base, graph, "oom_sample")
    assert same(after, clean)


def test_out_of_memory_while_quantizing(server, base):
    graph = sampling_graph(loader_node(GOOD, "mxfp8", scope="keep audio branch"), "oom_quantize")
    faults.post(server, "/ltx2_quant_test/oom", {"where": "quantizing"})
    message = faults.error_message(server, graph)
    assert "out of GPU memory while loading and quantizing the model with policy mxfp8: it needs about" in message
    assert "(its weights plus 6 GiB for activations)" in message, message
    after, clean = run_twice_from_clean(server, base, graph, "oom_quantize")
    assert same(after, clean)


@pytest.mark.parametrize("filename,needle", [
    ("../escape", "plain name"), ("/tmp/ltx2q_test_absolute", "plain name"), ("sub/model", "plain name"),
    ("..", "plain name"), ("   ", "plain name"), ("ltx2q_test_link", "would leave the folder"),
])
def test_save_names_cannot_leave_the_model_folder(server, base, filename, needle):
    outside = base / "outside"
    outside.mkdir(exist_ok=True)
    link = os.path.join(models_folder(base), "ltx2q_test_link.safetensors")
    if not os.path.islink(link):
        os.symlink(outside / "target.safetensors", link)
    graph = {"1": loader_node(GOOD, "nvfp4"),
             "2": {"class_type": "LTX2QuantSave", "inputs": {"model": ["1", 0], "folder": models_folder(base),
                                                             "filename": filename, "comfy_compatible": True,
                                                             "overwrite": True}}}
    assert needle in faults.error_message(server, graph)
    assert os.listdir(outside) == [] and not os.path.exists("/tmp/ltx2q_test_absolute.safetensors")
    assert not os.path.exists(os.path.join(base, "models", "escape.safetensors"))


def test_save_folder_must_be_a_model_folder(server, base):
    graph = {"1": loader_node(GOOD, "nvfp4"),
             "2": {"class_type": "LTX2QuantSave", "inputs": {"model": ["1", 0], "folder": str(base),
                                                             "filename": "ltx2q_test_elsewhere", "comfy_compatible": True,
                                                             "overwrite": True}}}
    with pytest.raises(RuntimeError, match="refused the graph"):  # ComfyUI validates the combo
        server.run(graph)
    assert not os.path.exists(os.path.join(base, "ltx2q_test_elsewhere.safetensors"))


LAYOUT_IN_COMFYUI = textwrap.dedent("""
    import json, sys
    import torch
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.ops
    from comfy.ldm.lightricks.av_model import LTXAVModel
    config = json.loads(sys.argv[1])
    with torch.device("meta"):
        model = LTXAVModel(**config, operations=comfy.ops.disable_weight_init, dtype=torch.bfloat16)
    print(json.dumps({k: list(v.shape) for k, v in model.state_dict().items()}))
""")


@pytest.mark.parametrize("generation", ["ltx2.3", "ltx2", "ltx2.5", "ltx2.5 without prompt embedders"])
def test_layout_check_matches_the_model_comfyui_builds(generation):
    """check_layers compares files with ltx2.block_shapes / model_shapes: they must be exactly what
    ComfyUI builds from the config (full-size LTX-2.3 and LTX-2.5, and LTX-2's layout), or real files
    would be refused or wrong ones let through."""
    config = dict(ltx2.LTX23_CONFIG, num_layers=2)
    if generation == "ltx2":
        for key in ("apply_gated_attention", "cross_attention_adaln", "caption_proj_before_connector",
                    "connector_apply_gated_attention"):
            config.pop(key)
    if generation.startswith("ltx2.5"):
        if ltx25_missing():
            pytest.skip(ltx25_missing())
        config = dict(ltx2.LTX25_CONFIG, num_layers=2, use_prompt_adaln_single="without" not in generation)
    pythonpath = os.pathsep.join(filter(None, (os.environ["COMFYUI_PATH"], os.environ.get("PYTHONPATH"))))
    done = subprocess.run([sys.executable, "-c", LAYOUT_IN_COMFYUI, json.dumps(config)], capture_output=True,
                          text=True, cwd=os.environ["COMFYUI_PATH"], timeout=300,
                          env={**os.environ, "PYTHONPATH": pythonpath})
    assert done.returncode == 0, done.stderr[-3000:]
    comfy = {k: tuple(v) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
    blocks = {k[len("transformer_blocks.1."):]: v for k, v in comfy.items() if k.startswith("transformer_blocks.1.")}
    assert blocks == ltx2.block_shapes(config)
    if generation != "ltx2":
        assert comfy == ltx2.model_shapes(config)
