"""Issue #7 below ComfyUI: model files that do not match their header, NaN/Inf in weights and
scales, full disks, a killed writer, running out of GPU memory. Each test checks what the user is
told (the file, the layer, what is wrong) and that nothing half-written is left. The ComfyUI side
(Cancel, OOM while sampling, the soak) is in tests/integration/; docs/RELIABILITY.md lists both."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import signal
import struct
import subprocess
import sys
import textwrap
import weakref
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quant import advice, calibration, checkpoint, comfy_quant, conversion, ltx2, safetensors_io
from quant.conversion import load_converted, nonfinite_count, quantize_file
from quant.memory import GIB
from quant.policies import get_policy
from quant.safetensors_io import CheckpointError, MemoryTensors, SafetensorsFile, save_tensors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(num_layers: int = 2, **changes) -> tuple[dict, dict[str, torch.Tensor]]:
    config = ltx2.tiny_config(num_layers=num_layers)
    config.update(changes)
    return config, ltx2.synthetic_state_dict(config, seed=1)


def ltx2_tiny(num_layers: int = 2) -> tuple[dict, dict[str, torch.Tensor]]:
    """An LTX-2 (not 2.3) layout: no gated attention, no cross-attention AdaLN (6-row tables, no
    prompt tables). Only the blocks differ in what the checks look at."""
    config = {k: v for k, v in ltx2.tiny_config(num_layers=num_layers).items()
              if k not in ("apply_gated_attention", "cross_attention_adaln", "connector_apply_gated_attention")}
    state = {k: v for k, v in ltx2.synthetic_state_dict(ltx2.tiny_config(num_layers=num_layers), seed=1).items()
             if not k.startswith("transformer_blocks.") and "prompt_adaln_single" not in k}
    g = torch.Generator().manual_seed(2)
    for n in range(num_layers):
        for key, shape in ltx2.block_shapes(config).items():
            state[f"transformer_blocks.{n}.{key}"] = (torch.randn(shape, generator=g) * 0.05).bfloat16()
    return config, state


def leftovers(folder, *keep) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def refused(tmp_path, state, metadata, *needles, policy: str = "nvfp4") -> str:
    """Quantizing the file fails with a CheckpointError naming the file and each needle; no output."""
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_tensors(src, state, metadata)
    with pytest.raises(CheckpointError) as exc:
        quantize_file(str(src), str(dst), get_policy(policy))
    message = str(exc.value)
    assert str(src) in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    assert leftovers(tmp_path, "in.safetensors") == []
    return message


# ---------------------------------------------------------------------------------------------
# Model mismatch: the file is not the model its header describes
# ---------------------------------------------------------------------------------------------

def test_ltx2_weights_with_an_ltx23_config(tmp_path):
    config, state = tiny()
    state = {k: v for k, v in state.items() if "to_gate_logits" not in k}
    refused(tmp_path, state, ltx2.header_metadata(config), "config is LTX-2.3's", "weights are LTX-2's")


def test_ltx23_weights_with_an_ltx2_config(tmp_path):
    config, state = tiny()
    config = {k: v for k, v in config.items() if k != "apply_gated_attention"}
    refused(tmp_path, state, ltx2.header_metadata(config), "weights are LTX-2.3's", "config is LTX-2's")


def test_ltx2_layout_with_its_own_config_loads(tmp_path):
    config, state = ltx2_tiny()
    src = tmp_path / "ltx2.safetensors"
    save_tensors(src, state, ltx2.header_metadata(config))
    loaded = load_converted(str(src), get_policy("fp8-scaled-mm"))
    assert loaded.info.family == "ltx2" and len(loaded.decisions) > 0


def test_ltx2_layout_with_ltx23_table_rows(tmp_path):
    # LTX-2.3's 9-row AdaLN table in an LTX-2 model, which ComfyUI builds with 6 rows.
    config, state = ltx2_tiny()
    state["transformer_blocks.1.scale_shift_table"] = torch.zeros(9, 64).bfloat16()
    refused(tmp_path, state, ltx2.header_metadata(config),
            "wrong shape: transformer_blocks.1.scale_shift_table is [9, 64], not [6, 64]")


def test_missing_layer_is_named(tmp_path):
    config, state = tiny()
    del state["transformer_blocks.1.attn2.to_k.weight"]
    refused(tmp_path, state, ltx2.header_metadata(config), "missing: transformer_blocks.1.attn2.to_k.weight",
            "uninitialized")


def test_missing_blocks_named_as_a_range(tmp_path):
    config, state = tiny(num_layers=2)
    refused(tmp_path, state, ltx2.header_metadata({**config, "num_layers": 48}),
            "48 blocks", "missing: all of transformer_blocks.2 to 47")


def test_missing_tensor_outside_the_blocks(tmp_path):
    config, state = tiny()
    del state["audio_adaln_single.linear.bias"]
    refused(tmp_path, state, ltx2.header_metadata(config), "missing: audio_adaln_single.linear.bias")


def test_extra_block_is_named(tmp_path):
    config, state = tiny(num_layers=3)
    refused(tmp_path, state, ltx2.header_metadata({**config, "num_layers": 2}),
            "not part of that model: all of transformer_blocks.2", "ignore")


def test_extra_tensor_in_a_block_is_named_but_not_refused(tmp_path, caplog):
    """A stray tensor is harmless (ComfyUI ignores it); refusing it could refuse a real release file
    that carries one, so it is logged instead."""
    config, state = tiny()
    state["transformer_blocks.0.attn1.to_extra.weight"] = torch.zeros(64, 64).bfloat16()
    path = tmp_path / "extra.safetensors"
    save_tensors(path, state, ltx2.header_metadata(config))
    with caplog.at_level("WARNING", logger="ltx2_quant"):
        loaded = load_converted(str(path), get_policy("fp8-scaled-mm"))
    assert "transformer_blocks.0.attn1.to_extra.weight" in caplog.text
    assert "transformer_blocks.0.attn1.to_q.comfy_quant" in loaded.state_dict


def test_layer_shape_that_contradicts_the_config(tmp_path):
    config, state = tiny()
    state["transformer_blocks.0.attn1.to_q.weight"] = torch.zeros(64, 48).bfloat16()
    message = refused(tmp_path, state, ltx2.header_metadata(config),
                      "wrong shape: transformer_blocks.0.attn1.to_q.weight is [64, 48], not [64, 64]")
    assert "2 heads x 32" in message  # the config the shapes come from


def test_without_config_every_block_must_match_the_others(tmp_path):
    _, state = ltx2_tiny(num_layers=3)
    del state["transformer_blocks.2.ff.net.2.weight"]
    refused(tmp_path, state, None, "the other blocks", "missing: transformer_blocks.2.ff.net.2.weight")


@pytest.mark.parametrize("key,value", [("num_layers", 10 ** 9), ("num_attention_heads", -2),
                                       ("attention_head_dim", "128"), ("connector_num_layers", 2.5),
                                       ("num_layers", True)])
def test_implausible_layout_values_are_refused(tmp_path, key, value):
    config, state = tiny()
    refused(tmp_path, state, ltx2.header_metadata({**config, key: value}), f"{key}={value!r}")


@pytest.mark.parametrize("config,needle", [
    (json.dumps({"transformer": [1, 2]}), "has 'transformer': [1, 2]; it must be a JSON object"),
    (json.dumps({"transformer": None}), "has 'transformer': null; it must be a JSON object"),
    ('{"transformer": {"num_layers": 2,', "the header's 'config' metadata is unreadable: invalid JSON"),
    ("[1]", "'config' metadata is a JSON list, not an object"),
    ('{"transformer": ' + "[" * 80 + "]" * 80 + "}", "nested deeper than 64 levels"),
    ('{"transformer": {"num_layers": ' + "2" * 5000 + "}}", "an integer of 5,000 digits (at most 20)"),
])
def test_config_that_is_there_but_unreadable_is_not_called_missing(tmp_path, config, needle):
    # These used to read as "header has no 'config' metadata".
    _, state = tiny()
    message = refused(tmp_path, state, {"config": config}, needle)
    assert "has no 'config'" not in message


def test_block_layout_check_agrees_with_the_loader(tmp_path):
    # The layer table the policies plan from and the layout check see the same 28 Linears per block.
    config, state = tiny(num_layers=2)
    src = tmp_path / "ok.safetensors"
    save_tensors(src, state, ltx2.header_metadata(config))
    with SafetensorsFile(src) as f:
        info = checkpoint.inspect_checkpoint(f)
        checkpoint.check_layers(f, info)
    assert sum(bool(ltx2.BLOCK_LINEAR_RE.match(layer)) for layer in info.layers) == 2 * 28


def test_model_cast_to_fp8_by_comfyui_quantizes(tmp_path):
    # ComfyUI's UNETLoader with weight_dtype fp8_e4m3fn casts every weight, norms included; a 1-D
    # FP8 norm weight is a plain tensor, not an FP8 layer (it crashed the Quantize node before).
    config, state = tiny()
    cast = {k: v.to(torch.float8_e4m3fn) if k.endswith(".weight") else v for k, v in state.items()}
    source = MemoryTensors(cast, ltx2.header_metadata(config), "the input MODEL")
    loaded = load_converted(source, get_policy("fp8-scaled-mm"))
    norm = "transformer_blocks.0.attn1.q_norm.weight"
    assert loaded.state_dict[norm].dtype == torch.float8_e4m3fn and loaded.state_dict[norm].shape == (64,)
    changed = {d.layer for d in loaded.decisions if d.changed}
    assert len(changed) == 2 * 25  # fp8-scaled-mm keeps 3 audio->video attention Linears per block
    kept = loaded.state_dict["transformer_blocks.0.audio_to_video_attn.to_out.0.weight"]
    assert "transformer_blocks.0.audio_to_video_attn.to_out.0" not in changed and kept.dtype == torch.float8_e4m3fn


# ---------------------------------------------------------------------------------------------
# NaN / Inf in weights and scales: refused, naming the layer and the tensor
# ---------------------------------------------------------------------------------------------

LAYER = "transformer_blocks.1.ff.net.0.proj"


def quantized_file(tmp_path, policy: str, corrupt) -> str:
    """A file quantized with `policy` whose LAYER tensors `corrupt(tensors)` edits in place."""
    config, state = tiny()
    plain, path = tmp_path / "plain.safetensors", tmp_path / f"{policy}.safetensors"
    save_tensors(plain, state, ltx2.header_metadata(config))
    quantize_file(str(plain), str(path), get_policy(policy))
    plain.unlink()
    with SafetensorsFile(path) as f:
        tensors = {name: f.read(name).clone() for name in f.keys()}
        metadata = dict(f.metadata)
    corrupt({k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == LAYER})
    save_tensors(path, tensors, metadata, overwrite=True)
    return str(path)


def fill_bytes(tensor: torch.Tensor, value: int) -> None:
    tensor.view(torch.uint8).reshape(-1)[:3] = value


CORRUPTIONS = {
    "nvfp4-global-scale-inf": ("nvfp4", lambda t: t["weight_scale_2"].fill_(float("inf")), "weight_scale_2", 1),
    "nvfp4-block-scale-nan": ("nvfp4", lambda t: fill_bytes(t["weight_scale"], 0x7F), "weight_scale", 3),
    "fp8-weight-nan-codes": ("fp8-cast", lambda t: fill_bytes(t["weight"], 0xFF), "weight", 3),
    "fp8-row-scale-nan": ("fp8-cast", lambda t: t["weight_scale"][5].fill_(float("nan")), "weight_scale", 1),
    "mxfp8-e8m0-scale-nan": ("mxfp8", lambda t: fill_bytes(t["weight_scale"], 0xFF), "weight_scale", 3),
}


@pytest.mark.parametrize("target", ["same", "other"])
@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_nonfinite_scale_or_code_names_layer_and_tensor(tmp_path, case, target):
    policy, corrupt, suffix, count = CORRUPTIONS[case]
    path = quantized_file(tmp_path, policy, corrupt)
    # Kept as it is (same format) or re-quantized from it: refused either way.
    load_policy = policy if target == "same" else ("fp8-cast" if policy != "fp8-cast" else "nvfp4")
    with pytest.raises(CheckpointError) as exc:
        load_converted(path, get_policy(load_policy))
    message = str(exc.value)
    assert path in message and f"layer {LAYER!r}" in message and f"'{LAYER}.{suffix}'" in message, message
    assert f"has {count} NaN/Inf values" in message, message


def test_nonfinite_input_scale_is_refused(tmp_path):
    config, state = tiny()
    state[LAYER + ".input_scale"] = torch.tensor(float("nan"))
    refused(tmp_path, state, ltx2.header_metadata(config), f"'{LAYER}.input_scale' has 1 NaN/Inf", policy="fp8-scaled-mm")


@pytest.mark.parametrize("policy", ["bf16", "nvfp4"])
def test_nonfinite_plain_tensor_is_refused_under_any_policy(tmp_path, policy):
    config, state = tiny()
    state["adaln_single.linear.bias"][7] = float("-inf")
    refused(tmp_path, state, ltx2.header_metadata(config), "'adaln_single.linear.bias' has 1 NaN/Inf", policy=policy)


FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2,
                torch.float8_e8m0fnu]


@settings(max_examples=60, deadline=None, database=None, derandomize=True)
@given(st.sampled_from(FLOAT_DTYPES), st.lists(st.integers(0, 255), max_size=64))
def test_nonfinite_count_matches_isfinite_on_any_bits(dtype, data):
    data = data[: len(data) - len(data) % dtype.itemsize]
    tensor = torch.tensor(data, dtype=torch.uint8).view(dtype)
    assert nonfinite_count(tensor) == int((~torch.isfinite(tensor.double())).sum())


def test_nonfinite_count_of_finite_values_whose_sum_overflows():
    huge = torch.full((4,), torch.finfo(torch.bfloat16).max, dtype=torch.bfloat16)
    assert not torch.isfinite(huge.sum(dtype=torch.float32))
    assert nonfinite_count(huge) == 0
    assert nonfinite_count(torch.arange(4)) == 0


# ---------------------------------------------------------------------------------------------
# Writes: full disk, size limit, killed writer
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_source(tmp_path):
    config, state = tiny()
    src = tmp_path / "src" / "in.safetensors"
    src.parent.mkdir()
    save_tensors(src, state, ltx2.header_metadata(config))
    return src


def test_free_space_is_checked_before_writing(tmp_path, tiny_source, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.safetensors").write_bytes(b"kept")
    monkeypatch.setattr(safetensors_io, "_free_bytes", lambda folder: 1000)
    with pytest.raises(OSError) as exc:
        quantize_file(str(tiny_source), str(out / "old.safetensors"), get_policy("nvfp4"), overwrite=True)
    assert str(out / "old.safetensors") in str(exc.value) and "only 1,000 are free" in str(exc.value)
    assert leftovers(out) == ["old.safetensors"] and (out / "old.safetensors").read_bytes() == b"kept"


WRITE_UNDER_LIMIT = textwrap.dedent("""
    import json, resource, sys
    sys.path.insert(0, sys.argv[1])
    from quant.conversion import quantize_file
    from quant.policies import get_policy
    limit = int(sys.argv[4])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        quantize_file(sys.argv[2], sys.argv[3], get_policy("nvfp4"))
    except OSError as e:
        print(json.dumps({"errno": e.errno, "message": str(e)}))
""")


def test_file_size_limit_mid_write_leaves_nothing(tmp_path, tiny_source):
    # RLIMIT_FSIZE makes the kernel refuse writes past the limit (EFBIG), like a disk filling up
    # while the file is written; Python ignores SIGXFSZ, so the writer sees the error.
    out = tmp_path / "out"
    out.mkdir()
    full = out / "full.safetensors"
    quantize_file(str(tiny_source), str(full), get_policy("nvfp4"))
    limit = full.stat().st_size // 2
    full.unlink()
    dst = out / "limited.safetensors"
    result = subprocess.run([sys.executable, "-c", WRITE_UNDER_LIMIT, REPO, str(tiny_source), str(dst), str(limit)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    error = json.loads(result.stdout)
    assert error["errno"] == errno.EFBIG
    assert str(dst) in error["message"] and "no room left" in error["message"] and "nothing was written" in error["message"]
    assert leftovers(out) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_really_full_disk(small_tmpfs, tiny_source, monkeypatch):
    dst = small_tmpfs / "out.safetensors"
    with pytest.raises(OSError, match="needs .* bytes but only .* are free"):
        quantize_file(str(tiny_source), str(dst), get_policy("bf16"))  # refused up front
    assert leftovers(small_tmpfs) == []
    # When free space cannot be known (or another writer takes it meanwhile), ENOSPC mid-write.
    monkeypatch.setattr(safetensors_io, "_free_bytes", lambda folder: None)
    with pytest.raises(OSError) as exc:
        quantize_file(str(tiny_source), str(dst), get_policy("bf16"))
    assert exc.value.errno == errno.ENOSPC and str(dst) in str(exc.value) and "no room left" in str(exc.value)
    assert leftovers(small_tmpfs) == []


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from quant.conversion import quantize_file
    from quant.policies import get_policy

    def progress(done, total):
        if done == total // 2:
            print("half", flush=True)
            time.sleep(60)
    quantize_file(sys.argv[2], sys.argv[3], get_policy("nvfp4"), overwrite=True, progress=progress)
""")


def test_killed_writer_never_leaves_a_partial_model(tmp_path, tiny_source):
    # SIGKILL (power loss, the OOM killer) runs no cleanup: the temp file stays, but the target
    # is the old file, never a partial one. The temp file's name ends in .part, which ComfyUI does
    # not list as a model, and the reader refuses it clearly.
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "model.safetensors"
    dst.write_bytes(b"previous model")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, REPO, str(tiny_source), str(dst)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "half"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert dst.read_bytes() == b"previous model"
    temps = [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    assert len(temps) == 1 and temps[0].name.endswith(".safetensors.part")
    with pytest.raises(CheckpointError, match="truncated"):
        SafetensorsFile(temps[0])


# ---------------------------------------------------------------------------------------------
# Out of memory
# ---------------------------------------------------------------------------------------------

def test_gpu_oom_while_quantizing_falls_back_to_the_cpu_for_that_layer(tmp_path, tiny_source, monkeypatch, caplog):
    real = conversion._quantize_on
    failed = []

    def quantize_on(f, source, stored, target, device, staging=None, outliers=conversion.NO_OUTLIERS):
        if torch.device(device).type != "cpu" and source.layer == LAYER:
            failed.append(source.layer)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(f, source, stored, target, "cpu", outliers=outliers)  # stands in for the GPU here
    monkeypatch.setattr(conversion, "_quantize_on", quantize_on)
    with caplog.at_level(logging.WARNING, logger="ltx2_quant"):
        on_gpu = load_converted(str(tiny_source), get_policy("nvfp4"), device="cuda")
    reference = load_converted(str(tiny_source), get_policy("nvfp4"))
    assert failed == [LAYER]
    assert f"out of GPU memory quantizing {LAYER}; quantizing it on the CPU instead" in caplog.text
    assert on_gpu.state_dict.keys() == reference.state_dict.keys()
    assert all(torch.equal(on_gpu.state_dict[k], reference.state_dict[k]) for k in reference.state_dict)


def test_oom_on_the_cpu_is_not_retried(tiny_source, monkeypatch):
    def quantize_on(*args):
        raise torch.OutOfMemoryError("out of memory")
    monkeypatch.setattr(conversion, "_quantize_on", quantize_on)
    with pytest.raises(torch.OutOfMemoryError):
        load_converted(str(tiny_source), get_policy("nvfp4"))


NEEDS = {"bf16": int(45.1 * GIB), "fp8-cast": int(26.6 * GIB), "fp8-scaled-mm": int(26.0 * GIB),
         "mxfp8": int(26.7 * GIB), "nvfp4": int(19.3 * GIB)}
BASIS = "estimated for 768x512x121"


def test_oom_advice_names_the_policies_that_fit():
    text = advice.out_of_memory_advice("sampling", "bf16", NEEDS, 32 * GIB, BASIS)
    assert text.startswith("LTX-2 Quant: out of GPU memory while sampling with policy bf16: it needs about 45.1 GiB "
                           "(estimated for 768x512x121) on this 32.0 GiB GPU.")
    assert "Policies that fit: mxfp8 (about 26.7 GiB), fp8-cast (about 26.6 GiB), fp8-scaled-mm (about 26.0 GiB), " \
           "nvfp4 (about 19.3 GiB)." in text
    assert "smaller video" in text
    on_24 = advice.out_of_memory_advice("sampling", "fp8-scaled-mm", NEEDS, 24 * GIB, BASIS)
    assert "Policies that fit: nvfp4 (about 19.3 GiB)." in on_24 and "bf16 (" not in on_24


def test_oom_advice_when_no_policy_fits():
    text = advice.out_of_memory_advice("loading and quantizing the model", "fp8-cast", NEEDS, 16 * GIB, BASIS)
    assert "nvfp4 needs the least (about 19.3 GiB)" in text and "system memory" in text
    smallest = advice.out_of_memory_advice("sampling", "nvfp4", NEEDS, 16 * GIB, BASIS)
    assert "Policies" not in smallest and "needs the least" not in smallest and "smaller video" in smallest


def test_oom_error_releases_the_failed_calls_tensors_first():
    allocated = []
    seen_by_release = []

    def sampling_step():
        activations = torch.empty(1 << 20)
        allocated.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.raises(torch.OutOfMemoryError) as exc:
        advice.call_or_advise_on_oom(sampling_step, lambda: "the advice",
                                      lambda: seen_by_release.append(allocated[0]() is None))
    assert str(exc.value) == "the advice"
    assert seen_by_release == [True]  # the failed frame's tensors were gone when release() ran
    assert exc.value.__context__ is None and exc.value.__cause__ is None


def test_call_or_advise_passes_results_and_other_errors_through():
    assert advice.call_or_advise_on_oom(lambda: 7, lambda: "unused", lambda: None) == 7
    with pytest.raises(ValueError, match="not memory"):
        advice.call_or_advise_on_oom(lambda: (_ for _ in ()).throw(ValueError("not memory")), lambda: "x",
                                      lambda: None)



# ---------------------------------------------------------------------------------------------
# Issue #23: finite values that are still wrong (config numbers, values past the compute dtype,
# scales that overflow or vanish), and 1-byte NVFP4 weights of another type
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value,needle", [
    ("timestep_scale_multiplier", float("nan"), "timestep_scale_multiplier=nan"),
    ("av_ca_timestep_scale_multiplier", float("inf"), "av_ca_timestep_scale_multiplier=inf"),
    ("timestep_scale_multiplier", 0, "timestep_scale_multiplier=0"),
    ("positional_embedding_theta", -10000.0, "positional_embedding_theta=-10000.0"),
    ("positional_embedding_max_pos", [20, 0, 2048], "positional_embedding_max_pos[1]=0"),
    ("norm_eps", 1e30, "norm_eps=1e+30"),
    ("caption_channels", 10 ** 19, "caption_channels=10000000000000000000"),
    ("some_future_key", {"nested": [1.0, float("nan")]}, "some_future_key.nested[1]=nan"),
])
def test_config_numbers_that_no_model_has_are_refused_by_name(tmp_path, key, value, needle):
    # A NaN timestep multiplier sampled an all-NaN latent: only the layout keys were checked.
    config, state = tiny()
    message = refused(tmp_path, state, ltx2.header_metadata({**config, key: value}), needle, policy="bf16")
    assert "which no LTX-2 model has" in message


def test_release_config_values_pass():
    info = checkpoint.CheckpointInfo("x", "", "ltx2.5", dict(ltx2.LTX25_CONFIG), {}, {}, 48, "plain")
    checkpoint.check_config_values(info)
    checkpoint.check_config_values(replace(info, config=dict(ltx2.LTX23_CONFIG)))


@pytest.mark.parametrize("raw,needle", [
    ("[" * 100 + "]" * 100, "nested deeper than 64 levels"),
    ('{"format_version": "1.0", "layers": {"a": {"shape": [' + "9" * 400 + "]}}}", "an integer of 400 digits"),
])
def test_quantization_metadata_nested_or_with_huge_integers(tmp_path, raw, needle):
    config, state = tiny()
    refused(tmp_path, state, {**ltx2.header_metadata(config), comfy_quant.QUANT_METADATA_KEY: raw},
            f"corrupt {comfy_quant.QUANT_METADATA_KEY} header metadata", needle)


def test_comfy_quant_tensor_too_large(tmp_path):
    config, state = tiny()
    state[LAYER + ".comfy_quant"] = torch.full((100_000,), ord(" "), dtype=torch.uint8)
    refused(tmp_path, state, ltx2.header_metadata(config), f"'{LAYER}.comfy_quant' holds 100,000 bytes")


@pytest.mark.parametrize("policy", ["bf16", "fp8-scaled-mm", "nvfp4"])
@pytest.mark.parametrize("key,tensor,shown", [
    ("transformer_blocks.0.attn1.to_q.bias", torch.full((64,), 1e300, dtype=torch.float64), "1e+300"),
    ("adaln_single.linear.bias", torch.cat([torch.tensor([3.4e38]), torch.zeros(9 * 64 - 1)]), "3.4e+38"),
    ("transformer_blocks.1.attn2.to_k.weight", torch.full((64, 64), -1e300, dtype=torch.float64), "1e+300"),
])
def test_finite_values_beyond_the_compute_dtype_are_refused(tmp_path, policy, key, tensor, shown):
    # They passed the NaN/Inf check and sampled an all-NaN latent in bf16 and fp8-scaled-mm.
    config, state = tiny()
    state[key] = tensor
    refused(tmp_path, state, ltx2.header_metadata(config), f"'{key}' holds {shown}, beyond bfloat16's range",
            policy=policy)


def test_values_at_the_edge_of_bfloat16_pass(tmp_path):
    config, state = tiny()
    state["adaln_single.linear.bias"] = torch.full((9 * 64,), torch.finfo(torch.bfloat16).max, dtype=torch.float32)
    src = tmp_path / "edge.safetensors"
    save_tensors(src, state, ltx2.header_metadata(config))
    load_converted(str(src), get_policy("bf16"))


@pytest.mark.parametrize("policy,suffix", [("fp8-cast", "weight_scale"), ("int8-scaled-mm", "weight_scale"),
                                           ("nvfp4", "weight_scale_2")])
@pytest.mark.parametrize("target", ["same", "other"])
def test_scales_that_overflow_the_weights_are_refused(tmp_path, policy, suffix, target):
    # Each scale is finite, but codes times scales exceed bfloat16: the dequantized weight would be Inf.
    path = quantized_file(tmp_path, policy, lambda t: t[suffix].view(-1)[0].fill_(1e37))
    load_policy = policy if target == "same" else "bf16"
    with pytest.raises(CheckpointError, match=f"layer '{LAYER}': its scales let weights reach"):
        load_converted(path, get_policy(load_policy))


@pytest.mark.parametrize("value", [0.0, 1e-45, -1.0])
def test_input_scale_that_is_zero_subnormal_or_negative_is_refused(tmp_path, value):
    config, state = tiny()
    state[LAYER + ".input_scale"] = torch.tensor(value)
    shown = f"{float(state[LAYER + '.input_scale']):g}"  # 1e-45 is stored as float32's 1.4013e-45
    refused(tmp_path, state, ltx2.header_metadata(config), f"'{LAYER}.input_scale' is {shown}",
            "positive normal float32", policy="fp8-scaled-mm")


@pytest.mark.parametrize("dtype", ["BOOL", "I8", "F8_E4M3", "F8_E5M2"])
@pytest.mark.parametrize("policy", ["bf16", "nvfp4", "fp8-cast"])
def test_nvfp4_weight_of_another_one_byte_type_is_refused(tmp_path, dtype, policy):
    # Read as U8 they loaded 25-29% off (a BOOL holds only 0/1) or, with bf16, raised a traceback.
    path = quantized_file(tmp_path, "nvfp4", lambda t: None)
    raw = open(path, "rb").read()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    header[LAYER + ".weight"]["dtype"] = dtype
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + raw[8 + length:])
    with pytest.raises(CheckpointError, match=f"'{LAYER}.weight' is {dtype} .* needs U8"):
        load_converted(path, get_policy(policy))


@pytest.mark.parametrize("value,needle", [
    ("1e300", "amax 1e+300 gives the activation scale amax/448 = 2.23214e+297, which float32 cannot hold"),
    ("1e-50", "amax 1e-50 gives the activation scale"),
    ("5e-324", "amax 4.94066e-324 gives"),
    ("1e-35", "amax/2688"),  # fine for FP8 and INT8, subnormal for NVFP4's global scale
    ("1" + "0" * 400, "an integer of 401 digits (at most 20)"),
    ("1" + "0" * 5000, "an integer of 5,001 digits"),
    ("1e400", "must be a positive finite number, got inf"),
    ("[" * 100 + "]" * 100, "nested deeper than 64 levels"),
])
def test_calibration_amax_that_gives_no_usable_scale(tmp_path, value, needle):
    # 1e300 made amax/448 Inf in float32 (all-NaN latent); 1e-50 made it 0 (layers output ~0).
    path = tmp_path / "amax.json"
    path.write_text('{"amax_values": {"transformer_blocks.0.attn1.to_q.input_quantizer": %s}}' % value)
    with pytest.raises(calibration.CalibrationError) as exc:
        calibration.load_amax(str(path))
    assert str(path) in str(exc.value) and needle in str(exc.value), str(exc.value)


@pytest.mark.parametrize("amax", [math.inf, 0.0, 1e-50, 1e300])
def test_input_scale_refuses_what_float32_cannot_hold(amax):
    with pytest.raises(calibration.CalibrationError, match="float32 cannot hold as a normal number"):
        calibration.input_scale(amax, "float8_e4m3fn")


def test_calibration_fifo_is_refused_without_blocking(tmp_path):
    path = tmp_path / "amax.json"
    os.mkfifo(path)
    with pytest.raises(calibration.CalibrationError, match="FIFO"):
        calibration.load_amax(str(path))


def test_calibration_file_too_large(tmp_path, monkeypatch):
    monkeypatch.setattr(calibration, "MAX_CALIBRATION_BYTES", 100)
    path = tmp_path / "amax.json"
    path.write_text(json.dumps({"amax_values": {f"layer{i}": 1.0 for i in range(20)}}))
    with pytest.raises(calibration.CalibrationError, match="more than the 100 a calibration file takes"):
        calibration.load_amax(str(path))
