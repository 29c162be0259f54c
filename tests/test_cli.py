"""Command line (quant.cli.main with an argv list; `python -m quant` once as a subprocess)."""

from __future__ import annotations

import ast
import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch

from quant import conversion, ltx2, weights
from quant.checkpoint import inspect_checkpoint
from quant.cli import main
from quant.comfy_quant import QUANT_METADATA_KEY
from quant.safetensors_io import SafetensorsFile, save_tensors

REPO = Path(__file__).resolve().parents[1]
POLICY_NAMES = ("bf16", "fp8-cast", "fp8-scaled-mm", "int8-scaled-mm", "int8-convrot", "mxfp8", "nvfp4")
DEMO_ROW = re.compile(r"^(?P<policy>[\w-]+)\s+(?P<bytes>[\d,]+)\s+(?P<ratio>[\d.]+)x\s+(?P<video>\S+)\s+(?P<audio>\S+)$")


def parse_demo(text: str) -> dict[str, dict]:
    rows = {}
    for line in text.splitlines():
        m = DEMO_ROW.match(line.strip())
        if m and m["policy"] in POLICY_NAMES:
            rows[m["policy"]] = {"bytes": int(m["bytes"].replace(",", "")), "ratio": float(m["ratio"]),
                                 "video": float(m["video"]), "audio": float(m["audio"])}
    return rows


def layers_by_format(text: str) -> dict[str, int]:
    """The `{...}` layer count dict that `quantize` prints at the end of its summary line."""
    line = next(l for l in text.splitlines() if l.startswith("wrote "))
    return ast.literal_eval(line[line.rindex("{"):])


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def synth_file(tmp_path, capsys):
    path = tmp_path / "tiny.safetensors"
    code, out, _ = run_cli(capsys, "synth", path, "--blocks", "2")
    assert code == 0 and str(path) in out
    return path


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------

def test_demo(capsys):
    code, out, err = run_cli(capsys, "demo", "--blocks", "2")
    assert code == 0, err
    rows = parse_demo(out)
    assert set(rows) == set(POLICY_NAMES), out
    for name, r in rows.items():
        assert math.isfinite(r["video"]) and math.isfinite(r["audio"]), (name, r)
        assert r["bytes"] > 0
    assert rows["bf16"]["ratio"] == 1.0 and rows["bf16"]["video"] == 0 and rows["bf16"]["audio"] == 0
    for name in POLICY_NAMES[1:]:
        assert rows[name]["ratio"] > 1, (name, rows[name])
        assert rows[name]["bytes"] < rows["bf16"]["bytes"]
        assert 0 < rows[name]["video"] < 0.5 and 0 < rows[name]["audio"] < 0.5, (name, rows[name])
    assert rows["nvfp4"]["bytes"] == min(r["bytes"] for r in rows.values())
    for stream in ("video", "audio"):
        assert rows["bf16"][stream] < rows["fp8-cast"][stream] < rows["nvfp4"][stream]
        assert rows["fp8-cast"][stream] <= rows["fp8-scaled-mm"][stream] < rows["nvfp4"][stream]
        assert rows["mxfp8"][stream] < rows["nvfp4"][stream]
        # INT8's 8 uniform bits per row beat E4M3's 3 mantissa bits on Gaussian weights and activations.
        assert rows["int8-scaled-mm"][stream] < rows["fp8-scaled-mm"][stream] / 2
        assert rows["int8-convrot"][stream] < rows["fp8-scaled-mm"][stream] / 2
    # Bytes ratio is consistent with the bytes column.
    for r in rows.values():
        assert r["ratio"] == pytest.approx(rows["bf16"]["bytes"] / r["bytes"], abs=0.006)


def test_python_m_quant_demo_subprocess():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "quant", "demo", "--blocks", "2"], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert set(parse_demo(proc.stdout)) == set(POLICY_NAMES), proc.stdout


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


# ---------------------------------------------------------------------------------------------
# synth -> quantize -> inspect
# ---------------------------------------------------------------------------------------------

def test_synth_quantize_inspect_end_to_end(tmp_path, capsys, synth_file):
    out_path = tmp_path / "tiny-nvfp4.safetensors"
    code, out, err = run_cli(capsys, "quantize", synth_file, out_path, "--policy", "nvfp4", "--table")
    assert code == 0, err
    assert layers_by_format(out)["nvfp4"] == 28 * 2
    assert str(out_path) in out
    table_rows = [l for l in out.splitlines() if "BF16 -> nvfp4" in l]
    assert len(table_rows) == 56  # --table lists the changed layers
    assert any(l.startswith("transformer_blocks.1.audio_ff.net.2 ") for l in table_rows)
    assert "total:" in out

    code, out, err = run_cli(capsys, "inspect", out_path)
    assert code == 0, err
    assert "kind: comfyui-native" in out and "family: ltx2.3" in out and "blocks: 2" in out
    assert f"file: {out_path}" in out
    config_line = next(l for l in out.splitlines() if l.startswith("config: "))
    assert json.loads(config_line[len("config: "):]) == ltx2.tiny_config(num_layers=2)
    listed = [l for l in out.splitlines() if re.match(r"^transformer_blocks\.\d+\.", l)]
    assert len(listed) == 56 and all(" nvfp4 " in l for l in listed)
    assert "'nvfp4': 56" in out

    code, out_all, _ = run_cli(capsys, "inspect", out_path, "--all")
    assert code == 0
    assert len([l for l in out_all.splitlines() if " BF16 " in l]) > 0
    assert "patchify_proj" in out_all and "patchify_proj" not in out
    safetensors.torch.load_file(str(out_path))


def test_synth_prefix(tmp_path, capsys):
    path = tmp_path / "single.safetensors"
    assert run_cli(capsys, "synth", path, "--blocks", "1", "--prefix")[0] == 0
    out_path = tmp_path / "single-fp8.safetensors"
    code, out, err = run_cli(capsys, "quantize", path, out_path, "--policy", "fp8-scaled-mm", "--every-block-linear")
    assert code == 0, err
    code, out, _ = run_cli(capsys, "inspect", out_path)
    assert f"prefix: {ltx2.CHECKPOINT_PREFIX!r}" in out
    with SafetensorsFile(out_path) as f:
        layers = json.loads(f.metadata[QUANT_METADATA_KEY])["layers"]
        assert len(layers) == 28 and all(k.startswith(ltx2.CHECKPOINT_PREFIX) for k in layers)


def test_synth_refuses_overwrite(capsys, synth_file):
    before = synth_file.read_bytes()
    code, _, err = run_cli(capsys, "synth", synth_file)
    assert code == 1 and str(synth_file) in err and "error" in err
    assert synth_file.read_bytes() == before
    assert run_cli(capsys, "synth", synth_file, "--overwrite", "--blocks", "1")[0] == 0
    assert synth_file.read_bytes() != before


@pytest.mark.parametrize("policy,fmt", [("fp8-cast", weights.FP8_ROWWISE), ("fp8-scaled-mm", weights.FP8_ROWWISE),
                                        ("mxfp8", weights.MXFP8), ("nvfp4", weights.NVFP4)])
def test_quantize_each_policy(tmp_path, capsys, synth_file, policy, fmt):
    out_path = tmp_path / f"{policy}.safetensors"
    code, out, err = run_cli(capsys, "quantize", synth_file, out_path, "--policy", policy)
    assert code == 0, err
    # 2 blocks x 28 Linears; fp8-scaled-mm keeps 3 audio->video attention Linears per block in bf16.
    quantized = 50 if policy == "fp8-scaled-mm" else 56
    assert layers_by_format(out) == {"BF16": layers_by_format(out)["BF16"], fmt: quantized}
    m = re.search(r"weights ([\d,]+) -> ([\d,]+) \(([\d.]+)x\)", out)
    before, after = (int(m[i].replace(",", "")) for i in (1, 2))
    assert after < before and float(m[3]) > 1


def test_quantize_bf16_policy(tmp_path, capsys, synth_file):
    out_path = tmp_path / "copy.safetensors"
    code, out, err = run_cli(capsys, "quantize", synth_file, out_path, "--policy", "bf16")
    assert code == 0, err
    assert set(layers_by_format(out)) == {"BF16"}
    assert "(1.00x)" in out


def test_quantize_comfy_compatible_writes_per_tensor_fp8(tmp_path, capsys, synth_file):
    out_path = tmp_path / "comfy.safetensors"
    code, out, err = run_cli(capsys, "quantize", synth_file, out_path, "--policy", "fp8-cast", "--comfy-compatible")
    assert code == 0, err
    assert layers_by_format(out)[weights.FP8_TENSOR] == 56
    with SafetensorsFile(out_path) as f:
        layers = json.loads(f.metadata[QUANT_METADATA_KEY])["layers"]
        assert all(c["format"] == weights.FP8_TENSOR and c.get("full_precision_matrix_mult") is True
                   for c in layers.values())
        assert f.tensors["transformer_blocks.0.attn1.to_q.weight_scale"].shape == ()


def test_quantize_refuses_to_overwrite(tmp_path, capsys, synth_file):
    out_path = tmp_path / "out.safetensors"
    out_path.write_bytes(b"keep me")
    code, out, err = run_cli(capsys, "quantize", synth_file, out_path, "--policy", "nvfp4")
    assert code == 1
    assert str(out_path) in err and "overwrite" in err and err.startswith("error:")
    assert out_path.read_bytes() == b"keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    code, out, err = run_cli(capsys, "quantize", synth_file, out_path, "--policy", "nvfp4", "--overwrite")
    assert code == 0, err
    assert layers_by_format(out)["nvfp4"] == 56
    with SafetensorsFile(out_path):
        pass


def test_unknown_policy_is_a_usage_error(tmp_path, capsys, synth_file):
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(synth_file), str(tmp_path / "o.safetensors"), "--policy", "int4"])
    assert exc.value.code == 2
    assert "int4" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Scope options
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options,count", [
    ([], 56),
    (["--exclude", "*.attn2.*"], 48),
    (["--exclude", "*.attn2.*", "--exclude", "*ff.*"], 40),
    (["--keep-first", "1"], 28),
    (["--keep-last", "1"], 28),
    (["--keep-first", "1", "--keep-last", "1"], 0),
    (["--keep-audio"], 28),
    (["--keep-audio", "--keep-first", "1"], 14),
    (["--include", "transformer_blocks.*.to_gate_logits"], 56 + 12),
    (["--include", "transformer_blocks.*.to_gate_logits", "--exclude", "*gate_logits"], 56),
])
def test_scope_options_change_counts(tmp_path, capsys, synth_file, options, count):
    out_path = tmp_path / "scoped.safetensors"
    code, out, err = run_cli(capsys, "quantize", synth_file, out_path, "--policy", "mxfp8", *options)
    assert code == 0, err
    assert layers_by_format(out).get("mxfp8", 0) == count, out
    with SafetensorsFile(out_path) as f:
        layers = json.loads(f.metadata.get(QUANT_METADATA_KEY, '{"layers": {}}'))["layers"]
        assert len(layers) == count
        if "--keep-audio" in options:
            assert not any(ltx2.is_audio_side(k) for k in layers)
        if "--keep-first" in options:
            assert not any(k.startswith("transformer_blocks.0.") for k in layers)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"", b"\x00" * 3, b"not a safetensors file at all, just text" * 10,
                                     b"\x80\x04\x95" + b"\x00" * 40, b"PK\x03\x04" + b"\x00" * 60])
def test_inspect_bad_file(tmp_path, capsys, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    code, out, err = run_cli(capsys, "inspect", path)
    assert code == 1
    assert str(path) in err and err.startswith("error:")
    assert out == ""


def test_inspect_missing_file(tmp_path, capsys):
    path = tmp_path / "missing.safetensors"
    code, _, err = run_cli(capsys, "inspect", path)
    assert code == 1 and str(path) in err


def test_inspect_non_ltx_file_is_allowed(tmp_path, capsys):
    import torch

    from quant.safetensors_io import save_tensors
    path = tmp_path / "other.safetensors"
    save_tensors(path, {"encoder.layer.0.weight": torch.ones(4, 4)})
    code, out, err = run_cli(capsys, "inspect", path, "--all")
    assert code == 0, err
    assert "family: None" in out and "encoder.layer.0" in out


def test_quantize_truncated_file(tmp_path, capsys, synth_file):
    synth_file.write_bytes(synth_file.read_bytes()[:-100])
    out_path = tmp_path / "out.safetensors"
    code, _, err = run_cli(capsys, "quantize", synth_file, out_path, "--policy", "nvfp4")
    assert code == 1 and str(synth_file) in err and "truncated" in err
    assert not out_path.exists()


def test_quantize_without_config(tmp_path, capsys):
    from quant.safetensors_io import save_tensors
    config = ltx2.tiny_config(num_layers=1)
    path = tmp_path / "noconfig.safetensors"
    save_tensors(path, ltx2.synthetic_state_dict(config))
    code, _, err = run_cli(capsys, "quantize", path, tmp_path / "out.safetensors", "--policy", "nvfp4")
    assert code == 1 and "config" in err and str(path) in err


def test_connectors_flag_reaches_the_scope():
    from quant.cli import _scope, build_parser
    args = build_parser().parse_args(["quantize", "in.safetensors", "out.safetensors", "--policy", "nvfp4",
                                      "--connectors"])
    assert _scope(args)["connectors"] is True
    args = build_parser().parse_args(["quantize", "in.safetensors", "out.safetensors", "--policy", "nvfp4"])
    assert _scope(args)["connectors"] is False


# ---------------------------------------------------------------------------------------------
# Issue #23: careless and hostile arguments
# ---------------------------------------------------------------------------------------------

def usage_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (("demo", "--blocks", "0"), "argument --blocks: 0 is not from 1 to 48"),
    (("quality-layers", "m.safetensors", "--tokens", "0"), "argument --tokens: 0 is not from 1 to 8,192"),
    (("quality-layers", "m.safetensors", "--tokens", "-1"), "argument --tokens: -1 is not from 1"),
    (("quality-layers", "m.safetensors", "--worst", "-5"), "argument --worst: -5 is not from 0"),
    (("quantize", "a", "b", "--policy", "nvfp4", "--keep-first", "1" * 5000), "is not a whole number"),
])
def test_numbers_out_of_range_are_usage_errors(capsys, argv, needle):
    # --tokens 0 reported SNR "inf" for every layer and exited 0; -1 and demo --blocks 0 gave tracebacks.
    assert needle in usage_error(capsys, *argv)


@pytest.mark.parametrize("blocks", ["-1", "0", "5000"])
def test_synth_writes_only_files_the_pack_reads(tmp_path, capsys, blocks):
    out = tmp_path / "s.safetensors"
    assert "argument --blocks" in usage_error(capsys, "synth", out, "--blocks", blocks)
    assert not out.exists()


def test_synth_largest_file_quantizes(tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    assert run_cli(capsys, "synth", out, "--blocks", "48")[0] == 0
    assert run_cli(capsys, "quantize", out, tmp_path / "q.safetensors", "--policy", "nvfp4")[0] == 0


def test_quality_report_never_replaces_a_file_unasked(tmp_path, capsys, synth_file):
    model_bytes = synth_file.read_bytes()
    # The model file itself, even with --overwrite: it was replaced by JSON.
    code, _, err = run_cli(capsys, "quality-layers", synth_file, "--policy", "fp8-cast", "--out", synth_file,
                           "--overwrite")
    assert code == 1 and "is the model file being measured" in err
    notes = tmp_path / "notes.json"
    notes.write_text("mine")
    code, out, err = run_cli(capsys, "quality-layers", synth_file, "--policy", "fp8-cast", "--out", notes)
    assert code == 1 and "exists; refusing to overwrite (pass --overwrite" in err and out == ""  # before measuring
    assert notes.read_text() == "mine" and synth_file.read_bytes() == model_bytes
    assert run_cli(capsys, "quality-layers", synth_file, "--policy", "fp8-cast", "--out", notes, "--overwrite")[0] == 0
    assert json.loads(notes.read_text())["policies"]["fp8-cast"]["layers"]


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_quantize_never_replaces_what_is_not_a_regular_file(tmp_path, capsys, synth_file, kind):
    # With --overwrite a FIFO or a device node was replaced by a regular file (as root, /dev/null would be).
    target = tmp_path / "target.safetensors"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "device":
        if os.geteuid() != 0:
            pytest.skip("making a device node needs root")
        os.mknod(target, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # a null device of our own
    else:
        target.mkdir()
    code, _, err = run_cli(capsys, "quantize", synth_file, target, "--policy", "fp8-cast", "--overwrite")
    assert code == 1 and "refusing to replace it with a file" in err, err
    mode = os.lstat(target).st_mode
    assert {"fifo": stat.S_ISFIFO, "device": stat.S_ISCHR, "folder": stat.S_ISDIR}[kind](mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target.safetensors", "tiny.safetensors"]


FIFO_COMMANDS = {
    "inspect": ["inspect", "{fifo}"],
    "quantize": ["quantize", "{fifo}", "{out}", "--policy", "nvfp4"],
    "calibration": ["quality-layers", "{model}", "--policy", "fp8-scaled-mm", "--calibration", "{fifo}"],
}


@pytest.mark.parametrize("command", list(FIFO_COMMANDS))
def test_fifo_inputs_are_refused_at_once(tmp_path, synth_file, command):
    # A FIFO named *.safetensors (or as the calibration file) blocked these forever. In a subprocess:
    # were it to block again, the test fails instead of hanging.
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    argv = [a.format(fifo=fifo, out=tmp_path / "out.safetensors", model=synth_file) for a in FIFO_COMMANDS[command]]
    done = subprocess.run([sys.executable, "-m", "quant", *argv], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert done.returncode == 1 and "FIFO" in done.stderr and str(fifo) in done.stderr, done.stderr
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("output", ["", "o2/", ".", "{folder}"])
def test_output_that_names_no_file_is_refused(tmp_path, capsys, synth_file, monkeypatch, output):
    # "" wrote its temp file into the working directory's parent; "o2/" with --overwrite into the parent.
    work = tmp_path / "work"
    (work / "o2").mkdir(parents=True)
    monkeypatch.chdir(work)
    code, _, err = run_cli(capsys, "quantize", synth_file, output.format(folder=work / "o2"), "--policy", "nvfp4",
                           "--overwrite")
    assert code == 1 and ("not a file name" in err or "is a folder" in err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.safetensors", "work"]
    assert os.listdir(work) == ["o2"] and os.listdir(work / "o2") == []


def test_output_name_too_long_is_refused_before_quantizing(tmp_path, capsys, synth_file, monkeypatch):
    monkeypatch.setattr(conversion, "plan_conversion", lambda *a, **k: pytest.fail("quantized before refusing"))
    code, _, err = run_cli(capsys, "quantize", synth_file, tmp_path / ("m" * 300 + ".safetensors"), "--policy", "nvfp4")
    assert code == 1 and "the file name is too long (312 bytes" in err, err


SLOW_WRITE = """
import sys, time
from quant import cli, conversion
steps = conversion._run_steps
def slow(plan, progress):
    for index, item in enumerate(steps(plan, progress)):
        if index == 3:
            print("writing", flush=True)
            time.sleep(60)
        yield item
conversion._run_steps = slow
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_while_writing_leaves_no_temp_file(tmp_path, synth_file):
    out = tmp_path / "out.safetensors"
    child = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, "quantize", str(synth_file), str(out), "--policy",
                              "nvfp4"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # mid-write
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        child.kill()
        child.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.safetensors"]


def test_inspect_shows_no_raw_escape(tmp_path, capsys):
    # Tensor names with terminal escapes were printed raw by `inspect --all` and copied into outputs.
    config = ltx2.tiny_config(num_layers=1)
    state = ltx2.synthetic_state_dict(config)
    state["evil\x1b]0;owned\x07.weight"] = state.pop("proj_out.weight")
    path = tmp_path / "esc.safetensors"
    save_tensors(path, state, ltx2.header_metadata(config))
    code, out, err = run_cli(capsys, "inspect", path, "--all")
    assert code == 1 and "control characters" in err and "\x1b" not in out + err
    code, out, err = run_cli(capsys, "quantize", path, tmp_path / "q.safetensors", "--policy", "nvfp4")
    assert code == 1 and not (tmp_path / "q.safetensors").exists()


def test_quality_layers_measures_the_outlier_options(tmp_path, capsys, synth_file):
    """--smooth / --low-rank reach the per-layer measurement: with a calibration whose per-channel amax
    has outlier channels, smoothing raises INT8's output SNR; --smooth without per-channel amax is
    refused before any measurement."""
    import importlib.util

    from quant import calibration
    spec = importlib.util.spec_from_file_location(
        "quality_outliers", os.path.join(os.path.dirname(__file__), "..", "bench", "quality_outliers.py"))
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    import torch
    with SafetensorsFile(str(synth_file)) as f:
        info = inspect_checkpoint(f)
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    channels = {layer: recipe.outlier_gains(source.shape[1], 25.0, g) * 4.0 for layer, source in info.layers.items()
                if source.layer.startswith("transformer_blocks.") and len(source.shape) == 2}
    amax_file = tmp_path / "amax.json"
    calibration.save_amax(str(amax_file), {k: float(v.max()) for k, v in channels.items()}, channels, overwrite=False)
    code, _, err = run_cli(capsys, "quality-layers", synth_file, "--policy", "int8-scaled-mm", "--smooth", "0.5")
    assert code == 1 and "--smooth needs a --calibration file with per-channel amax" in err
    assert "argument --smooth: 1.5 is not from 0 to 1" in usage_error(capsys, "quality-layers", synth_file, "--smooth", "1.5")
    snr = {}
    for smooth in ("0", "0.5"):
        out = tmp_path / f"report{smooth}.json"
        code, _, err = run_cli(capsys, "quality-layers", synth_file, "--policy", "int8-scaled-mm", "--calibration",
                               amax_file, "--smooth", smooth, "--low-rank", "0.1", "--out", out)
        assert code == 0, err
        report = json.loads(out.read_text())
        assert report["smooth"] == float(smooth) and report["low_rank"] == 0.1
        rows = [r for r in report["policies"]["int8-scaled-mm"]["layers"] if r["layer"] in channels]
        snr[smooth] = sum(r["output_snr_db"] for r in rows) / len(rows)
    assert snr["0.5"] > snr["0"] + 1.0  # dB
