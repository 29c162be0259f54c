"""Bounded fuzzing of the safetensors reader: any bytes either parse into tensors that read back
in full, or fail with a CheckpointError naming the file; never another exception, never a hang."""

import json
import struct

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
