"""fp32 ONNX graph -> the same graph with its large weights stored as int8 (``export --int8-weights``).

Each weight of a MatMul, Gemm, Conv or Gather (embedding) with at least ``MIN_ELEMENTS`` values is
replaced by int8 values and one fp32 scale per output channel, read back through a
DequantizeLinear node named like the weight it replaces; everything else (biases, norms, the
quantizer's codebook that the encoder's distance computation reads) stays fp32. Scales are symmetric
(zero point 0): w ~= scale[c] * q, q in [-127, 127], so each value is within scale[c] / 2 of the
original.

Why per output channel: one output channel's weights share a magnitude; one scale per channel keeps
the rounding error of a channel proportional to that channel's own weights.

Computation stays fp32. ONNX Runtime 1.32 on CPU fuses DequantizeLinear + MatMul into its 8-bit
weight-only kernel (MatMulNBits): faster than the fp32 MatMul for one-token steps, slower for long
prefills; the DequantizeLinear of Conv and embedding weights runs at every call
(benchmarks/bundle_compare.py measures both). How far the outputs move is measured by the export's
int8 validation rows (export/validate.py), not assumed.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

MIN_ELEMENTS = 4096  # smaller tensors are a negligible part of a graph's size


def output_channel_axis(node: onnx.NodeProto, input_index: int, rank: int) -> int | None:
    """The axis of ``node``'s weight input that indexes output channels (None: not a weight input)."""
    if node.op_type == "MatMul" and input_index == 1:
        return rank - 1
    if node.op_type == "Gemm" and input_index == 1:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "Conv" and input_index == 1:
        return 0
    if node.op_type == "Gather" and input_index == 0:
        return 0  # one embedding row per scale
    return None


def quantize_per_channel(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 values and the fp32 scale of each slice along ``axis``."""
    others = tuple(d for d in range(weight.ndim) if d != axis)
    peak = np.abs(weight).max(axis=others)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    shape = [1] * weight.ndim
    shape[axis] = -1
    values = np.clip(np.round(weight / scale.reshape(shape)), -127, 127).astype(np.int8)
    return values, scale


def int8_weight_storage(model: onnx.ModelProto, base_dir: Path | None = None, min_elements: int = MIN_ELEMENTS) -> onnx.ModelProto:
    """A copy of ``model`` with its large weights stored as int8 (inline; the weights it keeps as they
    were). ``base_dir``: where ``model``'s external data is; each weight is read from it in turn."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    rank = {init.name: len(init.dims) for init in graph.initializer}
    axes: dict[str, set[int | None]] = defaultdict(set)  # initializer -> output-channel axis per reader
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in rank:
                axes[name].add(output_channel_axis(node, index, rank[name]))
    kept, added, dequantize_nodes = [], [], []
    for init in graph.initializer:
        uses = axes.get(init.name, set())
        if init.data_type != onnx.TensorProto.FLOAT or int(np.prod(init.dims)) < min_elements or len(uses) != 1 or None in uses:
            kept.append(init)
            continue
        axis = next(iter(uses))
        values, scale = quantize_per_channel(numpy_helper.to_array(init, "" if base_dir is None else str(base_dir)), axis)
        added += [numpy_helper.from_array(values, f"{init.name}.int8"), numpy_helper.from_array(scale, f"{init.name}.scale")]
        dequantize_nodes.append(helper.make_node("DequantizeLinear", [f"{init.name}.int8", f"{init.name}.scale"], [init.name], name=f"{init.name}.dequantize", axis=axis))
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(dequantize_nodes + nodes)  # before every reader: the node list stays topologically sorted
    return out
