"""The external-data files an ONNX graph names, read from its protobuf bytes without the onnx package.

Graphs over protobuf's 2 GB limit keep their weights in a separate file that each tensor names by a
``location`` relative to the graph (ONNX external data). A bundle must confine those names as it
confines its own file names: a graph that names ``../../etc/passwd`` as its data would otherwise
make ONNX Runtime or TensorRT read any file the user can read. The runtime installs no onnx, so
this walks the protobuf wire format itself, visiting only the messages that can hold tensors
(ModelProto -> graphs, functions, training info -> nodes -> attributes -> tensors, sparse tensors,
subgraphs) and skipping everything else, weights included, by its length prefix.
"""
from __future__ import annotations

import mmap
from pathlib import Path

# field numbers from onnx.proto3 that lead to TensorProtos
MODEL_GRAPH, MODEL_TRAINING_INFO, MODEL_FUNCTIONS = 7, 20, 25
TRAINING_GRAPHS = (1, 2)  # initialization, algorithm
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_SPARSE_INITIALIZER = 1, 5, 15
FUNCTION_NODE = 7
NODE_ATTRIBUTE = 5
ATTRIBUTE_T, ATTRIBUTE_G, ATTRIBUTE_TENSORS, ATTRIBUTE_GRAPHS, ATTRIBUTE_SPARSE, ATTRIBUTE_SPARSES = 5, 6, 10, 11, 22, 23
SPARSE_VALUES, SPARSE_INDICES = 1, 2
TENSOR_EXTERNAL_DATA = 13
ENTRY_KEY, ENTRY_VALUE = 1, 2
MAX_DEPTH = 64  # nested subgraphs; deeper is not a graph this project writes


class MalformedGraph(ValueError):
    pass


def _varint(data, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise MalformedGraph("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(data, start: int, end: int):
    """(field number, wire type, value) of one message; length-delimited values as (start, end)."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 5:
            value, pos = None, pos + 4
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = (pos, pos + length), pos + length
        else:
            raise MalformedGraph(f"unsupported wire type {wire}")
        if pos > end:
            raise MalformedGraph("a field runs past its message")
        yield number, wire, value


def _messages(data, span: tuple[int, int], numbers) -> list[tuple[int, int]]:
    return [value for number, wire, value in _fields(data, *span) if wire == 2 and number in numbers]


def _tensor_location(data, span: tuple[int, int]) -> str | None:
    for entry in _messages(data, span, (TENSOR_EXTERNAL_DATA,)):
        fields = {number: value for number, wire, value in _fields(data, *entry) if wire == 2}
        if ENTRY_KEY in fields and bytes(data[slice(*fields[ENTRY_KEY])]) == b"location" and ENTRY_VALUE in fields:
            return bytes(data[slice(*fields[ENTRY_VALUE])]).decode("utf-8", "replace")
    return None


def _walk_graph(data, span, depth: int, found: set[str]) -> None:
    if depth > MAX_DEPTH:
        raise MalformedGraph("subgraphs nested too deeply")
    tensors = _messages(data, span, (GRAPH_INITIALIZER,))
    for sparse in _messages(data, span, (GRAPH_SPARSE_INITIALIZER,)):
        tensors += _messages(data, sparse, (SPARSE_VALUES, SPARSE_INDICES))
    for tensor in tensors:
        if (location := _tensor_location(data, tensor)) is not None:
            found.add(location)
    _walk_nodes(data, _messages(data, span, (GRAPH_NODE,)), depth, found)


def _walk_nodes(data, nodes, depth: int, found: set[str]) -> None:
    for node in nodes:
        for attribute in _messages(data, node, (NODE_ATTRIBUTE,)):
            tensors = _messages(data, attribute, (ATTRIBUTE_T, ATTRIBUTE_TENSORS))
            for sparse in _messages(data, attribute, (ATTRIBUTE_SPARSE, ATTRIBUTE_SPARSES)):
                tensors += _messages(data, sparse, (SPARSE_VALUES, SPARSE_INDICES))
            for tensor in tensors:
                if (location := _tensor_location(data, tensor)) is not None:
                    found.add(location)
            for subgraph in _messages(data, attribute, (ATTRIBUTE_G, ATTRIBUTE_GRAPHS)):
                _walk_graph(data, subgraph, depth + 1, found)


def external_data_locations(path: Path) -> set[str]:
    """Every ``location`` the graph file's tensors name (empty for a self-contained graph).
    Raises MalformedGraph when the file is not a well-formed protobuf message."""
    found: set[str] = set()
    with open(path, "rb") as f:
        if Path(path).stat().st_size == 0:
            return found
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            whole = (0, len(data))
            for graph in _messages(data, whole, (MODEL_GRAPH,)):
                _walk_graph(data, graph, 0, found)
            for info in _messages(data, whole, (MODEL_TRAINING_INFO,)):
                for graph in _messages(data, info, TRAINING_GRAPHS):
                    _walk_graph(data, graph, 0, found)
            for function in _messages(data, whole, (MODEL_FUNCTIONS,)):
                _walk_nodes(data, _messages(data, function, (FUNCTION_NODE,)), 0, found)
    return found
