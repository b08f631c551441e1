"""int8-weight graphs (``export --int8-weights``) -> the same graphs with fp32 weights, for ``build``.

An int8-weight graph reads each large weight through a DequantizeLinear node whose inputs are all
constants (int8 values, fp32 scale per output channel, zero point 0). ``build`` folds those nodes
before TensorRT parses the graph: each becomes an fp32 initializer holding exactly what the node
computes, ``(q - zero_point) * scale`` (ONNX DequantizeLinear), under the node's output name. The
graph's inputs, outputs and every other node stay as they are, so the engine computes the fp32 graph
with the int8-rounded weights: the int8-weight graph as the ONNX operators define it (tests compare
the two in ONNX Runtime with its graph optimisations off: transformer logits within 4e-6). ONNX
Runtime's default, optimised run differs more (0.08 on the same logits): it fuses DequantizeLinear +
MatMul into its MatMulNBits kernel, which computes differently. Keeping the nodes for TensorRT's own
weight-only quantization is not attempted, as it could not be tried without a GPU.

Why fp32 and not fp16 constants: an fp16 engine needs a strongly typed fp16 graph whose every
tensor's precision was chosen from measured activation ranges and validated (export/fp16.py and
export/validate.py, run at export with calibration data); casting only the weights would give
neither. A bundle without fp16 graphs therefore gets fp32 engines from its folded fp32 graphs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # onnx is imported when a graph is folded: the runtime imports this module without it
    import onnx

DEFAULT_DOMAINS = ("", "ai.onnx")


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _dequantized(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> np.ndarray:
    """The value a DequantizeLinear node of constants computes, in its scale's dtype."""
    values, scale = constants[node.input[0]], constants[node.input[1]]
    zero_point = constants[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros((), values.dtype)
    if _attribute(node, "block_size", 0):
        raise ValueError(f"{node.name}: blocked DequantizeLinear is not folded (the exporter does not write it)")
    if scale.ndim == 1 and values.ndim > 1:  # per-axis: scale and zero point run along ``axis``
        shape = [1] * values.ndim
        shape[_attribute(node, "axis", 1) % values.ndim] = -1
        scale, zero_point = scale.reshape(shape), (zero_point.reshape(shape) if zero_point.ndim else zero_point)
    difference = values.astype(np.int32) - zero_point.astype(np.int32)
    return (difference.astype(scale.dtype) * scale).astype(scale.dtype)


def fold_weight_dequantization(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """(a copy of ``model`` whose constant-input DequantizeLinear nodes are float initializers, how many
    were folded). Initializers read only by folded nodes are dropped (the exporter's graphs have no
    subgraphs that could read them)."""
    import onnx
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    constants = {init.name: init for init in graph.initializer}
    kept_nodes: list[onnx.NodeProto] = []
    folded: list[onnx.TensorProto] = []
    cache: dict[str, np.ndarray] = {}
    for node in graph.node:
        inputs = [name for name in node.input if name]
        if node.op_type == "DequantizeLinear" and node.domain in DEFAULT_DOMAINS and all(n in constants for n in inputs):
            for name in inputs:
                if name not in cache:
                    cache[name] = numpy_helper.to_array(constants[name])
            folded.append(numpy_helper.from_array(_dequantized(node, cache), node.output[0]))
        else:
            kept_nodes.append(node)
    if not folded:
        return out, 0
    still_read = {name for node in kept_nodes for name in node.input} | {o.name for o in graph.output}
    initializers = [init for init in graph.initializer if init.name in still_read] + folded
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    del graph.node[:]
    graph.node.extend(kept_nodes)
    return out, len(folded)
