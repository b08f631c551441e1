"""torch -> ONNX for one graph: the torch.export-based exporter at opset 21.

Opset 21 gives GroupNormalization (with fp32 statistics available to fp16 graphs) and the exporter
maps GroupNorm/LayerNorm/GELU onto single ONNX ops, which TensorRT's parser implements natively.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch

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


@contextlib.contextmanager
def quiet_exporter():
    """The exporter prints progress lines and warnings meant for its developers; keep the CLI readable."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger("torch._export").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def export_graph(graph: GraphDef, path: Path) -> onnx.ModelProto:
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
    model = program.model_proto
    model.producer_name = "taming-deploy"
    name_axes(model, graph.axis_names)
    onnx.save_model(model, str(path))
    return model
