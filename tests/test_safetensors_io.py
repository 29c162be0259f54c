"""The safetensors reader and writer (quant/safetensors_io.py): corrupt, truncated and foreign files are
refused with errors naming the file and the tensor, pickles are never loaded, and what the writer
produces is what the official safetensors library reads and writes."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from quant.conversion import quantize_file
from quant.policies import get_policy
from quant.safetensors_io import CheckpointError, SafetensorsFile, TensorSpec, save_tensors, write_streaming


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and raw_bytes(a) == raw_bytes(b)


def read_all(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with SafetensorsFile(path) as f:
        return {k: f.read(k) for k in f.keys()}, dict(f.metadata)


def tmp_leftovers(folder) -> list[str]:
    return [p.name for p in Path(folder).iterdir() if p.name.startswith(".tmp-")]


class _Armed:
    """Unpickling this creates a folder: a pickle that would run code if it were ever loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def write_raw(path, header, data: bytes = b"", header_bytes: bytes | None = None) -> None:
    raw = header_bytes if header_bytes is not None else json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def small_valid_file(path):
    save_tensors(path, {"alpha": torch.arange(6, dtype=torch.float32).reshape(2, 3),
                        "beta.weight": torch.ones(4, 4, dtype=torch.bfloat16),
                        "gamma.last": torch.arange(10, dtype=torch.float32)})


def assert_checkpoint_error(path, *names):
    with pytest.raises(CheckpointError) as exc:
        SafetensorsFile(path)
    message = str(exc.value)
    assert str(path) in message, message
    for name in names:
        assert name in message, message
    return message


def test_truncated_file_names_file_and_tensor(tmp_path):
    path = tmp_path / "cut.safetensors"
    small_valid_file(path)
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    message = assert_checkpoint_error(path, "'gamma.last'")
    assert "truncated" in message


def test_truncated_inside_header(tmp_path):
    path = tmp_path / "cut.safetensors"
    small_valid_file(path)
    path.write_bytes(path.read_bytes()[:40])
    assert "truncated" in assert_checkpoint_error(path)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    assert "0 bytes" in assert_checkpoint_error(path)


def test_missing_file(tmp_path):
    assert_checkpoint_error(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes(tmp_path, seed):
    path = tmp_path / "noise.safetensors"
    g = torch.Generator().manual_seed(seed)
    path.write_bytes(raw_bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8)))
    assert_checkpoint_error(path)


def test_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 100)
    assert "GGUF" in assert_checkpoint_error(path)


def test_armed_pickle_would_run_when_loaded(tmp_path):
    # Proves the payload used below is live.
    marker = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Armed(str(marker))))
    assert marker.exists()


@pytest.mark.parametrize("maker", ["torch.save", "pickle.dumps"])
def test_pickle_is_refused_and_never_loaded(tmp_path, maker):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.safetensors"  # a pickle with the wrong extension, as users get them
    if maker == "torch.save":
        torch.save({"state_dict": {"w": torch.ones(2)}, "evil": _Armed(str(marker))}, str(path))
    else:
        path.write_bytes(pickle.dumps({"w": torch.ones(2), "evil": _Armed(str(marker))}))
    message = assert_checkpoint_error(path, "pickles are never loaded")
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        quantize_file(str(path), str(tmp_path / "out.safetensors"), get_policy("nvfp4"))
    assert not marker.exists()
    assert "not a safetensors file" in message


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_of_any_protocol_is_refused(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps(_Armed(str(marker)), protocol=protocol))
    assert_checkpoint_error(path)
    assert not marker.exists()


def test_header_length_larger_than_file(tmp_path):
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b'{"a": 1}')
    assert "truncated" in assert_checkpoint_error(path)


def test_header_length_absurd(tmp_path):
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    assert_checkpoint_error(path, "header length")


def test_header_lies_about_sizes(tmp_path):
    path = tmp_path / "lie.safetensors"
    write_raw(path, {"ok": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                     "liar": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 20]}}, b"\0" * 20)
    assert "16" in assert_checkpoint_error(path, "'liar'")


def test_header_offsets_past_the_data(tmp_path):
    path = tmp_path / "past.safetensors"
    write_raw(path, {"big": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    assert_checkpoint_error(path, "'big'")


def test_header_reversed_offsets(tmp_path):
    path = tmp_path / "rev.safetensors"
    write_raw(path, {"rev": {"dtype": "U8", "shape": [0], "data_offsets": [8, 8]},
                     "neg": {"dtype": "U8", "shape": [2], "data_offsets": [4, 2]}}, b"\0" * 8)
    assert_checkpoint_error(path, "'neg'")


def test_overlapping_offsets(tmp_path):
    path = tmp_path / "overlap.safetensors"
    write_raw(path, {"first": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                     "second": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24)
    assert "overlap" in assert_checkpoint_error(path, "'first'", "'second'")


def test_overlap_hidden_behind_a_third_tensor(tmp_path):
    path = tmp_path / "overlap.safetensors"
    write_raw(path, {"outer": {"dtype": "U8", "shape": [64], "data_offsets": [0, 64]},
                     "a": {"dtype": "U8", "shape": [8], "data_offsets": [8, 16]},
                     "b": {"dtype": "U8", "shape": [8], "data_offsets": [32, 40]}}, b"\0" * 64)
    assert "overlap" in assert_checkpoint_error(path, "'outer'")


def test_non_utf8_header(tmp_path):
    path = tmp_path / "latin.safetensors"
    write_raw(path, None, b"", header_bytes=b'{"caf\xe9": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}')
    assert "UTF-8" in assert_checkpoint_error(path)


def test_invalid_json_header(tmp_path):
    path = tmp_path / "json.safetensors"
    write_raw(path, None, b"", header_bytes=b'{"a": ')
    assert "JSON" in assert_checkpoint_error(path)


def test_header_not_an_object(tmp_path):
    path = tmp_path / "list.safetensors"
    write_raw(path, [1, 2])
    assert_checkpoint_error(path)


def test_duplicate_keys(tmp_path):
    path = tmp_path / "dup.safetensors"
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    write_raw(path, None, b"\0" * 4, header_bytes=f'{{"twice": {entry}, "twice": {entry}}}'.encode())
    assert "twice" in assert_checkpoint_error(path, "'twice'")


@pytest.mark.parametrize("dtype", ["F4", "Q8_0", "float32", "C64"])
def test_unknown_dtype(tmp_path, dtype):
    path = tmp_path / "dtype.safetensors"
    write_raw(path, {"mystery": {"dtype": dtype, "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    assert_checkpoint_error(path, "'mystery'", repr(dtype))


@pytest.mark.parametrize("shape", [[-1], ["2"], 3, [2.0]])
def test_invalid_shape(tmp_path, shape):
    path = tmp_path / "shape.safetensors"
    write_raw(path, {"bent": {"dtype": "U8", "shape": shape, "data_offsets": [0, 2]}}, b"\0" * 2)
    assert_checkpoint_error(path, "'bent'")


def test_metadata_must_be_strings(tmp_path):
    path = tmp_path / "meta.safetensors"
    write_raw(path, {"__metadata__": {"config": {"not": "a string"}},
                     "x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0")
    assert_checkpoint_error(path, "__metadata__")


@pytest.mark.parametrize("dtype", [["F32"], {"name": "F32"}, 4, None])
def test_non_string_dtype_is_a_checkpoint_error(tmp_path, dtype):
    path = tmp_path / "dtype.safetensors"
    write_raw(path, {"odd": {"dtype": dtype, "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    assert_checkpoint_error(path, "'odd'")


def test_write_streaming_refuses_wrong_tensor(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(RuntimeError, match="'a'"):
        write_streaming(path, [TensorSpec("a", torch.float32, (2,))], iter([torch.ones(3)]))
    with pytest.raises(RuntimeError, match="'b'"):
        write_streaming(path, [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.float32, (2,))],
                        iter([torch.ones(2)]))
    assert not path.exists() and not tmp_leftovers(tmp_path)


def test_save_tensors_output_matches_official_library(tmp_path):
    path = tmp_path / "all.safetensors"
    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "f16": torch.randn(2, 2).half(),
               "e4m3": torch.randn(4, 4).to(torch.float8_e4m3fn), "u8": torch.arange(9, dtype=torch.uint8),
               "i64": torch.arange(3), "bool": torch.tensor([True, False]), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 4)}
    save_tensors(path, tensors, {"k": "v"})
    official = safetensors.torch.load_file(str(path))
    ours, metadata = read_all(path)
    assert metadata == {"k": "v"}
    for k, t in tensors.items():
        assert same_tensor(official[k], t) and same_tensor(ours[k], t), k
    # And we read what the official library writes.
    other = tmp_path / "official.safetensors"
    safetensors.torch.save_file(tensors, str(other), metadata={"a": "b"})
    ours, metadata = read_all(other)
    assert metadata == {"a": "b"} and all(same_tensor(ours[k], t) for k, t in tensors.items())
