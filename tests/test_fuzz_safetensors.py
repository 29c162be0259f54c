"""Bounded fuzzing of the safetensors reader: any bytes either parse into tensors that read back
in full, or fail with a CheckpointError naming the file; never another exception, never a hang."""

import json
import math
import os
import struct
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quant import calibration, weights
from quant.checkpoint import inspect_checkpoint
from quant.safetensors_io import CheckpointError, SafetensorsFile, save_tensors

SETTINGS = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def read_everything(path) -> None:
    try:
        with SafetensorsFile(path) as f:
            for name, info in f.tensors.items():
                tensor = f.read(name)
                assert tuple(tensor.shape) == info.shape and tensor.dtype == info.dtype
            try:
                inspect_checkpoint(f, require_ltx=False)
            except CheckpointError as e:
                assert str(path) in str(e)
    except CheckpointError as e:
        assert str(path) in str(e)


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "random.safetensors"
    path.write_bytes(data)
    read_everything(path)


def _valid_file(path) -> bytes:
    save_tensors(path, {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
                        "b.weight": torch.ones(4, 4, dtype=torch.bfloat16),
                        "b.weight_scale": torch.tensor(0.5)}, {"config": "{}"}, overwrite=True)
    return path.read_bytes()


@SETTINGS
@given(st.data())
def test_mutated_valid_files(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "mutated.safetensors"
    raw = bytearray(_valid_file(path))
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "length"]))
        if kind == "flip" and raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        elif kind == "truncate":
            del raw[data.draw(st.integers(0, len(raw))):]
        elif kind == "extend":
            raw += data.draw(st.binary(max_size=64))
        elif len(raw) >= 8:
            raw[:8] = struct.pack("<Q", data.draw(st.integers(0, 2 ** 64 - 1)))
    path.write_bytes(bytes(raw))
    read_everything(path)


header_entry = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from(["F32", "BF16", "U8", "F8_E4M3", "I64", "XX"]), st.integers(), st.none()),
    "shape": st.one_of(st.lists(st.integers(-2, 5), max_size=3), st.text(max_size=3)),
    "data_offsets": st.one_of(st.lists(st.integers(-4, 80), min_size=0, max_size=3), st.none()),
})


@SETTINGS
@given(st.dictionaries(st.text(max_size=8), header_entry, max_size=4), st.binary(max_size=80))
def test_lying_headers(tmp_path_factory, header, payload):
    path = tmp_path_factory.mktemp("fuzz") / "lying.safetensors"
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
    read_everything(path)


# ---------------------------------------------------------------------------------------------
# Issue #23: headers built to exhaust the reader, and the calibration reader
# ---------------------------------------------------------------------------------------------

def raw_file(path, header: bytes, payload: bytes = b"") -> str:
    path.write_bytes(struct.pack("<Q", len(header)) + header + payload)
    return str(path)


def refused(path: str, *needles: str) -> str:
    with pytest.raises(CheckpointError) as exc:
        SafetensorsFile(path).close()
    message = str(exc.value)
    assert message.startswith(path + ":"), message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def entry(dtype="F32", shape=(1,), offsets=(0, 4)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def test_deeply_nested_json_names_the_file(tmp_path):
    refused(raw_file(tmp_path / "deep.safetensors", b"[" * 100_000 + b"]" * 100_000), "nested deeper than 64")
    nested = "[" * 70 + "]" * 70  # parses; not walked, the entry's structure is what is checked
    refused(raw_file(tmp_path / "d70.safetensors", json.dumps({"x": json.loads(nested)}).encode()),
            "entry for tensor 'x' is not an object")


def test_integers_of_thousands_of_digits_name_the_file(tmp_path):
    header = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + b"4" * 5000 + b"]}}"
    refused(raw_file(tmp_path / "bigint.safetensors", header), "an integer of 5,000 digits (at most 20)")


@pytest.mark.parametrize("shape", [[0, 2 ** 64], [0, 2 ** 63 - 1, 4], [0] + [2 ** 20] * 4])
def test_zero_size_tensor_with_an_impossible_shape(tmp_path, shape):
    path = raw_file(tmp_path / "shape.safetensors", json.dumps({"a": entry(shape=shape, offsets=(0, 0))}).encode())
    refused(path, "spans more than 2^63 bytes")


def test_too_many_dimensions(tmp_path):
    path = raw_file(tmp_path / "dims.safetensors", json.dumps({"a": entry(shape=[1] * 17)}).encode(), bytes(4))
    refused(path, "17 dimensions, more than the 16")


def test_millions_of_entries_are_refused_before_parsing(tmp_path):
    # 1.6 million zero-size entries took 28 s and 2 GB to parse; the count of '{' refuses them at once.
    many = b"{" + b",".join(b'"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i
                             for i in range(200_001)) + b"}"
    start = time.perf_counter()
    refused(raw_file(tmp_path / "many.safetensors", many), "200,002 JSON objects, more than the 200,000")
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize("name", ["evil\x1b[31mRED\x1b[0m.weight", "two\nlines", "bidi\u202eflip", "tab\tname",
                                  "lone\udc80surrogate"])
def test_tensor_names_with_control_characters(tmp_path, name):
    header = json.dumps({name: entry()}).encode()
    message = refused(raw_file(tmp_path / "names.safetensors", header, bytes(4)), "holds control characters")
    assert "\x1b" not in message and "\n" not in message  # shown escaped, never raw


def test_metadata_keys_with_control_characters(tmp_path):
    header = json.dumps({"__metadata__": {"con\x1bfig": "{}"}, "a": entry()}).encode()
    refused(raw_file(tmp_path / "meta.safetensors", header, bytes(4)), "__metadata__ key", "control characters")


def test_bytes_after_the_last_tensor_are_refused(tmp_path):
    path = tmp_path / "tail.safetensors"
    save_tensors(path, {"a": torch.ones(4)})
    path.write_bytes(path.read_bytes() + bytes(1000))
    refused(str(path), "1,000 bytes after the last tensor belong to no tensor")


def test_gaps_between_tensors_are_refused(tmp_path):
    header = json.dumps({"a": entry(offsets=(0, 4)), "b": entry(offsets=(8, 12))}).encode()
    refused(raw_file(tmp_path / "gap.safetensors", header, bytes(12)), "4 bytes between tensors 'a' and 'b'")
    header = json.dumps({"a": entry(offsets=(4, 8))}).encode()
    refused(raw_file(tmp_path / "lead.safetensors", header, bytes(8)), "the first 4 bytes of the data section")


def test_safetensors_library_agrees_on_coverage(tmp_path):
    # The rule is the reference reader's: the files refused above are refused by ComfyUI's own loader too.
    import safetensors
    path = tmp_path / "tail.safetensors"
    save_tensors(path, {"a": torch.ones(4)})
    path.write_bytes(path.read_bytes() + bytes(8))
    with pytest.raises(safetensors.SafetensorError, match="not fully covered"):
        safetensors.safe_open(str(path), "pt")


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_non_regular_inputs_are_refused_without_blocking(tmp_path, kind):
    path = tmp_path / "model.safetensors"
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    start = time.perf_counter()
    refused(str(path), "cannot open", "FIFO" if kind == "fifo" else "folder", "only regular files are read")
    assert time.perf_counter() - start < 5  # a FIFO used to block until a writer came: forever


def test_header_too_large_to_read_back_is_never_written(tmp_path):
    path = tmp_path / "big_header.safetensors"
    with pytest.raises(ValueError, match="header would take .* more than the 104,857,600"):
        save_tensors(path, {"a": torch.ones(1)}, {"notes": "x" * (100 * 1024 * 1024)})
    assert list(tmp_path.iterdir()) == []


hostile_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=True),
              st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=12)


@SETTINGS
@given(st.dictionaries(st.text(max_size=8), st.one_of(header_entry, hostile_json), max_size=4),
       st.dictionaries(st.text(max_size=6), st.one_of(st.text(max_size=20), hostile_json), max_size=2),
       st.integers(0, 90), st.binary(max_size=40))
def test_hostile_headers(tmp_path_factory, header, metadata, depth, payload):
    """Headers with any JSON values (huge integers, NaN, nesting past the limit, odd names) and any
    metadata: the file parses and reads back, or a CheckpointError names it."""
    header = dict(header)
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    if depth:  # nesting around an entry, deeper than any header has
        raw = raw[:-1] + (b', "nest": ' if header else b'"nest": ') + b"[" * depth + b"]" * depth + b"}"
    path = tmp_path_factory.mktemp("fuzz") / "hostile.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
    read_everything(path)


calibration_values = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2 ** 80, 2 ** 80),
                               st.sampled_from([1e300, 1e-50, 5e-324, 1e-40, 448.0, 2.5]), st.none(), st.text(max_size=3),
                               st.lists(st.floats(), max_size=3))


@SETTINGS
@given(st.one_of(
    st.dictionaries(st.text(max_size=30), calibration_values, max_size=4).map(lambda a: {"amax_values": a}),
    st.dictionaries(st.text(max_size=30), calibration_values, max_size=4).map(
        lambda a: {"amax_values": {}, "amax_per_channel": a}),
    hostile_json),
    st.integers(0, 90), st.binary(max_size=8))
def test_calibration_reader(tmp_path_factory, content, depth, tail):
    """Any calibration file loads into usable scales (a normal float32 for every format) or raises
    a CalibrationError naming the file: never another exception."""
    text = json.dumps(content).encode()
    if depth:
        text = b'{"amax_values": {"x": ' + b"[" * depth + b"]" * depth + b"}}"
    path = tmp_path_factory.mktemp("fuzz") / "amax.json"
    path.write_bytes(text + tail)
    try:
        amax = calibration.load_amax(str(path))
        calibration.load_channel_amax(str(path))
    except calibration.CalibrationError as e:
        assert str(path) in str(e)
        return
    for value in amax.values():
        for fmt in (None, weights.INT8, weights.NVFP4):
            scale = calibration.input_scale(value, fmt)
            assert math.isfinite(scale) and scale >= torch.finfo(torch.float32).tiny
