"""Bounded fuzzing of the loader (issue #7): a valid tiny LTX-2.3 file whose header is edited the way
damaged or hand-made files differ (entries dropped, renamed, retyped, reshaped, swapped; the config
and the quantization metadata changed) and whose bytes are flipped, loaded with every policy. The
loader either converts it or raises a CheckpointError that names the file: never another exception.
(tests/test_fuzz_safetensors.py fuzzes the header parser alone.)"""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quant import ltx2, weights
from quant.conversion import load_converted
from quant.comfy_quant import QUANT_METADATA_KEY
from quant.policies import POLICIES, get_policy
from quant.safetensors_io import CheckpointError, save_tensors

SETTINGS = settings(max_examples=120, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SAME_SIZE_DTYPES = {1: ["U8", "I8", "BOOL", "F8_E4M3", "F8_E5M2"], 2: ["BF16", "F16", "I16", "U16"],
                    4: ["F32", "I32", "U32"], 8: ["F64", "I64", "U64"]}
ITEMSIZE = {name: size for size, names in SAME_SIZE_DTYPES.items() for name in names}
ODD_VALUES = st.one_of(st.integers(-3, 70), st.sampled_from([10 ** 6, "48", None, [1], {"a": 1}, True, 2.5]))


class ValidFile:
    """A valid tiny LTX-2.3 file, split into its parsed header and its data section."""

    def __init__(self, raw: bytes):
        (length,) = struct.unpack("<Q", raw[:8])
        self.header, self.payload = json.loads(raw[8:8 + length]), raw[8 + length:]

    def __repr__(self) -> str:  # hypothesis prints its arguments when a case fails
        return "ValidFile(tiny LTX-2.3, 1 block)"


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory) -> ValidFile:
    config = ltx2.tiny_config(num_layers=1)
    path = tmp_path_factory.mktemp("fuzz") / "valid.safetensors"
    save_tensors(path, ltx2.synthetic_state_dict(config, seed=4), ltx2.header_metadata(config))
    return ValidFile(path.read_bytes())


def factorizations(shape: list[int]) -> list[list[int]]:
    numel = 1
    for d in shape:
        numel *= d
    return [[numel], list(reversed(shape)), [1, *shape], [numel // 2, 2] if numel % 2 == 0 else [numel]]


def edit_header(data, header: dict) -> None:
    names = [k for k in header if k != "__metadata__"]
    kind = data.draw(st.sampled_from(["drop", "rename", "retype", "reshape", "swap", "config", "quant_meta",
                                      "drop_config"]))
    name = data.draw(st.sampled_from(names))
    entry = header[name]
    if kind == "drop":
        del header[name]
    elif kind == "rename":
        new = data.draw(st.sampled_from([name.replace("blocks.0.", "blocks.1."), name.replace("attn1", "attn3"),
                                         name + "_scale", name.replace(".weight", ".weight_scale"),
                                         name.replace(".bias", ".input_scale"), "model.diffusion_model." + name]))
        header[new] = header.pop(name)
    elif kind == "retype":
        entry["dtype"] = data.draw(st.sampled_from(SAME_SIZE_DTYPES[ITEMSIZE[entry["dtype"]]]))
    elif kind == "reshape":
        entry["shape"] = data.draw(st.sampled_from(factorizations(entry["shape"])))
    elif kind == "swap":
        other = header[data.draw(st.sampled_from(names))]
        if other["data_offsets"][1] - other["data_offsets"][0] == entry["data_offsets"][1] - entry["data_offsets"][0]:
            entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
    elif kind in ("config", "quant_meta", "drop_config"):
        metadata = header.setdefault("__metadata__", {})
        config = json.loads(metadata.get("config", "{}"))
        transformer = config.get("transformer") if isinstance(config.get("transformer"), dict) else {}
        if kind == "drop_config":
            metadata.pop("config", None)
        elif kind == "config":
            key = data.draw(st.sampled_from([*sorted(transformer), "transformer"]))
            if key == "transformer":
                config["transformer"] = data.draw(ODD_VALUES)
            else:
                config["transformer"] = {**transformer, key: data.draw(ODD_VALUES)}
            metadata["config"] = json.dumps(config)
        else:
            layer = name.rsplit(".", 1)[0]
            conf = {"format": data.draw(st.sampled_from([*weights.FORMATS, "int4", None])),
                    "shape": data.draw(st.one_of(st.lists(ODD_VALUES, max_size=3), ODD_VALUES))}
            metadata[QUANT_METADATA_KEY] = json.dumps({"format_version": "1.0", "layers": {layer: conf}})


@SETTINGS
@given(st.data())
def test_edited_ltx_files_load_or_fail_with_a_named_error(tmp_path_factory, valid_file, data):
    header = json.loads(json.dumps(valid_file.header))
    payload = bytearray(valid_file.payload)
    for _ in range(data.draw(st.integers(1, 3))):
        edit_header(data, header)
    for _ in range(data.draw(st.integers(0, 2))):
        payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
    raw = json.dumps(header).encode()
    path = tmp_path_factory.mktemp("fuzz") / "edited.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(payload))
    policy = data.draw(st.sampled_from(list(POLICIES)))
    try:
        load_converted(str(path), get_policy(policy))
    except CheckpointError as e:
        assert str(path) in str(e), str(e)
