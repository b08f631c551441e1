"""Manifest entries for graph files, read from the files themselves (names, dtypes, named axes, sha256)."""
from __future__ import annotations

import json
from pathlib import Path

import onnx

from taming_deploy.bundle import GraphFile, Manifest, TensorSpec
from taming_deploy.fileutil import sha256_file
from taming_deploy.model_paths import BUNDLE_MANIFEST

ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
}


def tensor_specs(values) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(
            v.name,
            ONNX_DTYPES[v.type.tensor_type.elem_type],
            tuple(d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim),
        )
        for v in values
    )


def graph_entry(path: Path, precision: str, weight_storage: str = "float") -> GraphFile:
    model = onnx.load(str(path), load_external_data=False)
    return GraphFile(path.name, sha256_file(path), precision, tensor_specs(model.graph.input), tensor_specs(model.graph.output), weight_storage)


def write_manifest(directory: Path, manifest: Manifest) -> None:
    (Path(directory) / BUNDLE_MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2))
