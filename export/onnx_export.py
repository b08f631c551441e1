"""torch -> ONNX for one graph: the torch.export-based exporter at opset 21.

Opset 21 gives GroupNormalization (with fp32 statistics available to fp16 graphs) and the exporter
maps GroupNorm/LayerNorm/GELU onto single ONNX ops, which TensorRT's parser implements natively.
"""
from __future__ import annotations

import contextlib
import gc
import io
import logging
import warnings
from pathlib import Path

import onnx
import onnx_ir as ir
import torch

from taming_deploy.export.graph_files import EXTERNAL_TENSOR_MIN_BYTES
from taming_deploy.export.graphs import GraphDef

OPSET = 21


def name_axes(model: onnx.ModelProto, axis_names: dict[str, tuple[int | str, ...]]) -> None:
    """Give graph inputs/outputs the declared axis names (the exporter invents names like s73)."""
    for value in list(model.graph.input) + list(model.graph.output):
        declared = axis_names[value.name]
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(declared):
            raise RuntimeError(f"{value.name}: exported rank {len(dims)} differs from declared {declared}")
        for dim, axis in zip(dims, declared):
            if isinstance(axis, str):
                dim.Clear()
                dim.dim_param = axis
            elif dim.HasField("dim_value") and dim.dim_value != axis:
                raise RuntimeError(f"{value.name}: exported size {dim.dim_value} differs from declared {axis}")


EXPORTER_METADATA_PREFIXES = ("pkg.torch.", "pkg.onnxscript.")  # torch.export's and onnxscript's bookkeeping
EXPORTER_NODE_METADATA = ("namespace",)  # the module path of each node, also the exporter's


def is_exporter_metadata(key: str) -> bool:
    return key.startswith(EXPORTER_METADATA_PREFIXES) or key in EXPORTER_NODE_METADATA


def strip_exporter_metadata(model: onnx.ModelProto) -> None:
    """Drop the metadata the exporter writes for debugging on every node, value and initializer: the
    Python stack trace of each op, its module path and class hierarchy, FX node names, graph
    signatures, constant-folding history. A quarter to a tenth of a small graph's bytes; nothing
    reads them at run time. Other metadata stays."""

    def keep_only_ours(props) -> None:  # a repeated StringStringEntryProto field
        kept = [p for p in props if not is_exporter_metadata(p.key)]
        del props[:]
        props.extend(kept)

    def strip_graph(graph: onnx.GraphProto) -> None:
        keep_only_ours(graph.metadata_props)
        for value in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]:
            keep_only_ours(value.metadata_props)
        for node in graph.node:
            keep_only_ours(node.metadata_props)
            for attribute in node.attribute:
                for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                    strip_graph(subgraph)

    keep_only_ours(model.metadata_props)
    strip_graph(model.graph)
    for function in model.functions:
        keep_only_ours(function.metadata_props)
        for node in function.node:
            keep_only_ours(node.metadata_props)


@contextlib.contextmanager
def quiet_exporter():
    """The exporter prints progress lines and warnings meant for its developers; keep the CLI readable."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger("torch._export").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def release_rewriter_state() -> None:
    """Drop the last graph onnxscript's rewrite rules matched. The exporter's optimizer runs rules that
    live in module globals (onnxscript.rewriter.rules), and their matchers keep the graph, the match and
    the node of their last use (onnxscript 0.7: ``SimplePatternMatcher._graph``): the exported model,
    whose initializers wrap the torch parameters, so no weight of an exported module was ever freed
    (found at the 1.4 B size: 5.8 GiB still held after the model was deleted)."""
    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:  # an onnxscript without this private class; tests/test_validation_memory.py watches the version pinned
        return
    for matcher in (o for o in gc.get_objects() if isinstance(o, SimplePatternMatcher)):
        for state in ("_graph", "_match", "_current_node"):
            if hasattr(matcher, state):
                setattr(matcher, state, None)


def export_graph(graph: GraphDef, path: Path) -> onnx.ModelProto:
    """Export ``graph`` to ``path`` with every weight in ``PATH.data`` and return the graph without its
    weights (its tensors name that file). The exporter then picks the file layout (graph_files.save_graph:
    inline below the external-data threshold).

    The exporter's model is written straight to the data file, tensor by tensor, instead of being
    serialized into one ModelProto: at released sizes that in-memory copy of every weight (beside the
    torch model's and the exporter's own folded copies) is what ran out of memory; and every later pass
    (fp16, validation) reads the weights from the file a tensor at a time."""
    path = Path(path)
    graph.module.eval()
    with quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            graph.module,
            graph.example_inputs,
            dynamo=True,
            opset_version=OPSET,
            input_names=list(graph.input_names),
            output_names=list(graph.output_names),
            dynamic_shapes=graph.dynamic_shapes,
            verbose=False,
        )
    ir.save(program.model, str(path), external_data=f"{path.name}.data", size_threshold_bytes=EXTERNAL_TENSOR_MIN_BYTES)
    del program
    release_rewriter_state()
    model = onnx.load(str(path), load_external_data=False)
    model.producer_name = "taming-deploy"
    name_axes(model, graph.axis_names)
    strip_exporter_metadata(model)
    onnx.save_model(model, str(path))
    return model
