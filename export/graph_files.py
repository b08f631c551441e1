"""Graph files on disk: writing them (with ONNX external data past a size threshold) and their manifest
entries, read from the files themselves (names, dtypes, named axes, sha256 of the graph and its data)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_model

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


ALIGNMENT = 4096  # large tensors start on a page boundary of the data file (what ONNX Runtime can map)
ALIGNED_TENSOR_MIN_BYTES = 1 << 20


def model_tensors(model: onnx.ModelProto):
    """Every TensorProto of the model: initializers and node attributes, subgraphs included."""
    def of_graph(graph: onnx.GraphProto):
        yield from graph.initializer
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors
                for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                    yield from of_graph(subgraph)
    yield from of_graph(model.graph)


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the graph's tensors, those held in external data files included, without serializing it."""
    return sum((ExternalDataInfo(t).length or 0) if is_external(t) else t.ByteSize() for t in model_tensors(model))


def read_external(tensor: onnx.TensorProto, base_dir: Path, files: dict[str, object]) -> bytes:
    info = ExternalDataInfo(tensor)
    if info.location not in files:
        files[info.location] = open(contained_path(base_dir, info.location, tensor.name), "rb")
    source = files[info.location]
    source.seek(info.offset or 0)
    data = source.read(info.length) if info.length else source.read()
    if info.length and len(data) != info.length:
        raise RuntimeError(f"{info.location}: {tensor.name} runs past the end of the file")
    return data


def write_external_data(model: onnx.ModelProto, path: Path, base_dir: Path) -> None:
    """Every tensor of ``EXTERNAL_TENSOR_MIN_BYTES`` or more, one at a time, into ``PATH.data``: tensors
    held inline and tensors in other data files (relative to ``base_dir``) alike; the model then names
    the new file. Written beside and renamed over, so the file being replaced may be a source."""
    location = f"{path.name}.data"
    partial = path.with_name(f"{location}.{os.getpid()}.partial")
    sources: dict[str, object] = {}
    try:
        with open(partial, "wb") as out:
            for tensor in model_tensors(model):
                if is_external(tensor):
                    data = read_external(tensor, base_dir, sources)
                elif tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_TENSOR_MIN_BYTES:
                    data = tensor.raw_data
                else:
                    continue
                if len(data) >= ALIGNED_TENSOR_MIN_BYTES:
                    out.seek(-out.tell() % ALIGNMENT, os.SEEK_CUR)
                offset = out.tell()
                out.write(data)
                tensor.ClearField("raw_data")
                del tensor.external_data[:]
                for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
                tensor.data_location = onnx.TensorProto.EXTERNAL
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        for source in sources.values():
            source.close()
    partial.replace(path.parent / location)


def save_graph(model: onnx.ModelProto, path: Path, threshold: int | None = None, base_dir: Path | None = None) -> None:
    """Write ``model`` to ``path``; past ``threshold`` bytes of tensors (default
    :func:`external_data_threshold`) its weights go to ``PATH.data`` as ONNX external data.

    ``model``'s own external tensors are read relative to ``base_dir``, one at a time, so a graph of
    any size is written without its weights ever being in memory together; afterwards ``model`` names
    the file written (its weights are no longer held in memory). A graph under the threshold is written
    whole, its external tensors read back into it, and a ``PATH.data`` of an earlier write is removed."""
    path = Path(path)
    if base_dir is None:
        if external := next((t.name for t in model_tensors(model) if is_external(t)), None):
            raise ValueError(f"{external}: its data is in an external file; save_graph needs the base_dir to read it from")
        base_dir = path.parent  # unused: nothing to read
    if tensor_bytes(model) <= (external_data_threshold() if threshold is None else threshold):
        load_external_data_for_model(model, str(base_dir))
        onnx.save_model(model, str(path))
        (path.parent / f"{path.name}.data").unlink(missing_ok=True)
        return
    write_external_data(model, path, base_dir)
    onnx.save_model(model, str(path))


def graph_entry(path: Path, precision: str, weight_storage: str = "float") -> GraphFile:
    model = onnx.load(str(path), load_external_data=False)
    data = tuple(DataFile(name, sha256_file(contained_path(path.parent, name, str(path))))
                 for name in sorted(external_data_locations(path)))
    return GraphFile(path.name, sha256_file(path), precision, tensor_specs(model.graph.input), tensor_specs(model.graph.output),
                     weight_storage, data)


def write_manifest(directory: Path, manifest: Manifest) -> None:
    (Path(directory) / BUNDLE_MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2))
