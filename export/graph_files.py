"""Graph files on disk: writing them (with ONNX external data past a size threshold) and their manifest
entries, read from the files themselves (names, dtypes, named axes, sha256 of the graph and its data)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import onnx

from taming_deploy.bundle import DataFile, GraphFile, Manifest, TensorSpec
from taming_deploy.errors import UserError
from taming_deploy.external_data import external_data_locations
from taming_deploy.fileutil import contained_path, sha256_file
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


# A protobuf message cannot exceed 2 GiB; past this many bytes of tensors (with headroom for the rest
# of the graph) the weights go to NAME.onnx.data beside the graph. The environment variable lowers it
# (the tests exercise external data on small models that way).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
EXTERNAL_DATA_ENV = "TAMING_DEPLOY_EXTERNAL_DATA_BYTES"
EXTERNAL_TENSOR_MIN_BYTES = 1024  # smaller tensors (shapes, scalars) stay inside the graph


def external_data_threshold() -> int:
    value = os.environ.get(EXTERNAL_DATA_ENV)
    if value is None:
        return EXTERNAL_DATA_THRESHOLD
    if not value.isdigit():
        raise UserError(f"{EXTERNAL_DATA_ENV} must be a number of bytes, got {value[:40]!r}")
    return int(value)


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Serialized bytes of the graph's initializers and nodes (Constant tensors), without serializing it."""
    return sum(t.ByteSize() for t in model.graph.initializer) + sum(n.ByteSize() for n in model.graph.node)


def save_graph(model: onnx.ModelProto, path: Path, threshold: int | None = None) -> None:
    """Write ``model`` to ``path``; past ``threshold`` bytes of tensors (default
    :func:`external_data_threshold`) its weights go to ``PATH.data`` as ONNX external data. The
    ModelProto keeps its weights in memory afterwards (onnx moves them out while writing; they are
    read back from the data file, one tensor at a time, so no second copy of the graph is made)."""
    path = Path(path)
    if tensor_bytes(model) <= (external_data_threshold() if threshold is None else threshold):
        onnx.save_model(model, str(path))
        return
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=EXTERNAL_TENSOR_MIN_BYTES, convert_attribute=True)
    onnx.load_external_data_for_model(model, str(path.parent))


def graph_entry(path: Path, precision: str, weight_storage: str = "float") -> GraphFile:
    model = onnx.load(str(path), load_external_data=False)
    data = tuple(DataFile(name, sha256_file(contained_path(path.parent, name, str(path))))
                 for name in sorted(external_data_locations(path)))
    return GraphFile(path.name, sha256_file(path), precision, tensor_specs(model.graph.input), tensor_specs(model.graph.output),
                     weight_storage, data)


def write_manifest(directory: Path, manifest: Manifest) -> None:
    (Path(directory) / BUNDLE_MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2))
