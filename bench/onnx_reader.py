"""Reads an ONNX model's weights and node list without the onnx package and without executing anything:
an ONNX file is a protobuf message (ModelProto), decoded here from its wire format. Only the fields a
weight reader needs are kept: the graph's nodes (name, op type, inputs, outputs) and its initializers
(name, dims, float32 raw data). Tensors stored outside the file, or in another dtype, are refused.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Field numbers from onnx.proto (ModelProto.graph, GraphProto.node/initializer, NodeProto, TensorProto).
MODEL_GRAPH = 7
GRAPH_NODE, GRAPH_INITIALIZER = 1, 5
NODE_INPUT, NODE_OUTPUT, NODE_NAME, NODE_OP_TYPE = 1, 2, 3, 4
TENSOR_DIMS, TENSOR_DATA_TYPE, TENSOR_FLOAT_DATA, TENSOR_NAME, TENSOR_RAW_DATA, TENSOR_DATA_LOCATION = 1, 2, 4, 8, 9, 14
FLOAT32 = 1


@dataclasses.dataclass
class Node:
    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed protobuf varint")


def fields(buf: memoryview):
    """(field number, wire type, value) of one message: an int for varints and fixed-width fields,
    a memoryview for length-delimited ones (sub-messages, strings, bytes, packed arrays)."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ValueError("malformed protobuf: a field runs past its message")
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _tensor(buf: memoryview) -> tuple[str, np.ndarray]:
    name, dims, dtype, raw, floats = "", [], FLOAT32, None, []
    for number, wire, value in fields(buf):
        if number == TENSOR_DIMS:
            if wire == 2:  # packed
                pos = 0
                while pos < len(value):
                    dim, pos = _varint(value, pos)
                    dims.append(dim)
            else:
                dims.append(value)
        elif number == TENSOR_DATA_TYPE:
            dtype = value
        elif number == TENSOR_NAME:
            name = bytes(value).decode("utf-8")
        elif number == TENSOR_RAW_DATA:
            raw = value
        elif number == TENSOR_FLOAT_DATA:
            floats.append(np.frombuffer(value, "<f4") if wire == 2 else np.array([value], "<u4").view("<f4"))
        elif number == TENSOR_DATA_LOCATION and value != 0:
            raise ValueError(f"initializer {name!r} is stored outside the file (external data)")
    if dtype != FLOAT32:
        raise ValueError(f"initializer {name!r} has ONNX data type {dtype}, not float32")
    data = np.frombuffer(raw, "<f4") if raw is not None else (np.concatenate(floats) if floats else np.zeros(0, "<f4"))
    count = int(np.prod(dims)) if dims else 1
    if data.size != count:
        raise ValueError(f"initializer {name!r}: {data.size} values for dims {dims}")
    return name, data.reshape(dims).copy()


def _node(buf: memoryview) -> Node:
    node = Node("", "", [], [])
    for number, _, value in fields(buf):
        if number == NODE_INPUT:
            node.inputs.append(bytes(value).decode("utf-8"))
        elif number == NODE_OUTPUT:
            node.outputs.append(bytes(value).decode("utf-8"))
        elif number == NODE_NAME:
            node.name = bytes(value).decode("utf-8")
        elif number == NODE_OP_TYPE:
            node.op_type = bytes(value).decode("utf-8")
    return node


def read_onnx(path: str) -> tuple[dict[str, np.ndarray], list[Node]]:
    """The float32 initializers by name and the graph's nodes in order."""
    with open(path, "rb") as f:
        buf = memoryview(f.read())
    graphs = [value for number, wire, value in fields(buf) if number == MODEL_GRAPH and wire == 2]
    if len(graphs) != 1:
        raise ValueError(f"{path}: expected one graph, found {len(graphs)}")
    initializers, nodes = {}, []
    for number, wire, value in fields(graphs[0]):
        if number == GRAPH_INITIALIZER and wire == 2:
            name, array = _tensor(value)
            initializers[name] = array
        elif number == GRAPH_NODE and wire == 2:
            nodes.append(_node(value))
    return initializers, nodes
