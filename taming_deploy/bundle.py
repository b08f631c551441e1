"""An exported bundle: ONNX graphs plus ``manifest.json`` that describes and fingerprints them.

Layout (format version 2; version 1 bundles had a transformer graph that returned the whole cache):
    manifest.json
    encoder.onnx, decoder.onnx, [cond_encoder.onnx], transformer.onnx          fp32
    encoder.fp16.onnx, decoder.fp16.onnx, [cond_encoder.fp16.onnx], transformer.fp16.onnx
    engines/ (optional, TensorRT engines built on the target machine)
    NAME.onnx.data beside a graph over the external-data threshold (export/graph_files.py): its weights,
    as ONNX external data; the manifest lists and hashes it with its graph
Every graph file and external-data file is checked against its sha256 before it is used, so a tampered
or half-copied bundle fails with a message naming the file instead of computing garbage; a graph whose
tensors name a data file the manifest does not list for it (``../../etc/passwd``) is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from taming_deploy.errors import UserError
from taming_deploy.documents import Doc, item_int, read_json, shown
from taming_deploy.external_data import MalformedGraph, external_data_locations
from taming_deploy.fileutil import check_relative_name, contained_path, sha256_file
from taming_deploy.model_paths import BUNDLE_MANIFEST
from taming_deploy.spec import ModelSpec

BUNDLE_FORMAT = "taming-deploy-bundle"
BUNDLE_VERSION = 2
GRAPH_NAMES = ("encoder", "decoder", "cond_encoder", "transformer")
PRECISIONS = ("fp32", "fp16")
TENSOR_DTYPES = ("float32", "float16", "int64", "int32", "bool")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, float16, int64
    shape: tuple[int | str, ...]  # str: a dynamic axis, named

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict | Doc) -> "TensorSpec":
        doc = d if isinstance(d, Doc) else Doc(d, "tensor spec")
        dim = lambda v, where: v if isinstance(v, str) and len(v) <= 64 else item_int(0, 1 << 31, doc.source)(v, where)  # noqa: E731
        return cls(doc.str("name", max_length=256), doc.str("dtype", TENSOR_DTYPES), tuple(doc.list("shape", dim, max_items=16)))


@dataclass(frozen=True)
class DataFile:
    """An external-data file of a graph: the ``location`` its tensors name, relative to the bundle."""

    file: str
    sha256: str

    def to_dict(self) -> dict:
        return {"file": self.file, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, doc: Doc) -> "DataFile":
        return cls(check_relative_name(doc.str("file"), f"{doc.source}: {doc.field('file')}"), checked_sha256(doc))


def checked_sha256(doc: Doc) -> str:
    sha256 = doc.str("sha256")
    if len(sha256) != 64 or sha256.strip("0123456789abcdef"):
        raise doc.fail("sha256", "64 lowercase hex digits", sha256)
    return sha256


@dataclass(frozen=True)
class GraphFile:
    file: str
    sha256: str
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    weight_storage: str = "float"  # "int8": large weights stored as int8 + scales (export --int8-weights)
    data: tuple[DataFile, ...] = ()  # external-data files its tensors name (graphs over the threshold)

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "precision": self.precision,
            "weight_storage": self.weight_storage,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            **({"data": [d.to_dict() for d in self.data]} if self.data else {}),
        }

    @classmethod
    def from_dict(cls, d: dict | Doc) -> "GraphFile":
        doc = d if isinstance(d, Doc) else Doc(d, "graph entry")
        tensors = lambda t, where: TensorSpec.from_dict(Doc(t, doc.source, where))  # noqa: E731
        data_file = lambda d, where: DataFile.from_dict(Doc(d, doc.source, where))  # noqa: E731
        return cls(
            file=check_relative_name(doc.str("file"), f"{doc.source}: {doc.field('file')}"),
            sha256=checked_sha256(doc),
            precision=doc.str("precision", PRECISIONS),
            inputs=tuple(doc.list("inputs", tensors, max_items=1024)),
            outputs=tuple(doc.list("outputs", tensors, max_items=1024)),
            weight_storage=doc.str("weight_storage", ("float", "int8"), default="float"),
            data=tuple(doc.list("data", data_file, max_items=16, default=[])),
        )


@dataclass(frozen=True)
class Manifest:
    model: ModelSpec
    graphs: dict[str, dict[str, GraphFile]]  # graph name -> precision -> file
    producer: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    format_version: int = BUNDLE_VERSION

    def to_dict(self) -> dict:
        return {
            "format": BUNDLE_FORMAT,
            "format_version": self.format_version,
            "producer": self.producer,
            "model": self.model.to_dict(),
            "graphs": {g: {p: f.to_dict() for p, f in by_p.items()} for g, by_p in self.graphs.items()},
            "validation": self.validation,
        }

    @classmethod
    def from_dict(cls, d: dict | Doc, source: str) -> "Manifest":
        doc = d if isinstance(d, Doc) else Doc(d, source)
        if doc.raw("format", None) != BUNDLE_FORMAT:
            raise UserError(f"{source}: not a taming-deploy bundle manifest (format {shown(doc.raw('format', None))})")
        version = doc.int("format_version", 0, 1 << 20)
        if version > BUNDLE_VERSION:
            raise UserError(
                f"{source}: bundle format version {version} is newer than this taming-deploy reads "
                f"({BUNDLE_VERSION}); upgrade taming-deploy or export the bundle again with this version"
            )
        if version < BUNDLE_VERSION:
            raise UserError(
                f"{source}: bundle format version {version} is older than this taming-deploy reads "
                f"({BUNDLE_VERSION}); export the bundle again with `taming-deploy export`"
            )
        graphs: dict[str, dict[str, GraphFile]] = {}
        for name, _ in doc.items("graphs"):
            if name not in GRAPH_NAMES:
                raise UserError(f"{source}: graphs.{shown(name)}: not a graph name ({', '.join(GRAPH_NAMES)})")
            graphs[name] = {}
            for precision, entry in doc.doc("graphs").items(name):
                graph = GraphFile.from_dict(entry)
                if precision != graph.precision:
                    raise entry.fail("precision", f"{precision!r} as its key says", graph.precision)
                graphs[name][precision] = graph
        manifest = cls(
            model=ModelSpec.from_dict(doc.doc("model")),
            graphs=graphs,
            producer=doc.doc("producer", default={}).data,
            validation=doc.doc("validation", default={}).data,
            format_version=version,
        )
        manifest.check_graphs(source)
        return manifest

    def check_graphs(self, source: str) -> None:
        """The graphs' declared interfaces agree with the model (layers, heads, block, vocabulary)."""
        from taming_deploy.engines.profiles import transformer_io_problem  # the interface the runtime drives

        for required in ("encoder", "decoder", "transformer"):
            if not self.graphs.get(required):
                raise UserError(f"{source}: graphs.{required}: missing")
        for graph in self.graphs["transformer"].values():
            if reason := transformer_io_problem(graph, self.model):
                raise UserError(f"{source}: {reason}; export the bundle again with this taming-deploy (and, for "
                                "TensorRT, run `taming-deploy build` on it again)")


class Bundle:
    """A bundle directory; graph files are verified against the manifest when first asked for."""

    def __init__(self, path: Path):
        self.path = Path(path)
        manifest_path = self.path / BUNDLE_MANIFEST
        if not manifest_path.is_file():
            raise UserError(f"{self.path}: not a bundle (no {BUNDLE_MANIFEST}); create one with `taming-deploy export`")
        self.manifest = Manifest.from_dict(read_json(manifest_path, "bundle manifest"), str(manifest_path))
        self._verified: set[str | tuple[str, str]] = set()

    @property
    def spec(self) -> ModelSpec:
        return self.manifest.model

    def has_graph(self, name: str, precision: str = "fp32") -> bool:
        return precision in self.manifest.graphs.get(name, {})

    def graph(self, name: str, precision: str = "fp32") -> GraphFile:
        if not self.has_graph(name, precision):
            present = ", ".join(f"{graph} {p}" for graph, by_precision in self.manifest.graphs.items() for p in by_precision)
            raise UserError(f"{self.path}: the bundle has no {precision} {name} graph (it has: {present})")
        return self.manifest.graphs[name][precision]

    def graph_path(self, name: str, precision: str = "fp32") -> Path:
        """The verified path of a graph file (its external-data files verified too)."""
        entry = self.graph(name, precision)
        path = self._verified_file(entry.file, entry.sha256)
        for data in entry.data:
            self._verified_file(data.file, data.sha256)
        if (entry.file, "data") not in self._verified:
            self._check_data_locations(path, entry)
            self._verified.add((entry.file, "data"))
        return path

    def _verified_file(self, name: str, sha256: str) -> Path:
        path = contained_path(self.path, name, str(self.path / BUNDLE_MANIFEST))
        if name not in self._verified:
            if not path.is_file():
                raise UserError(f"{self.path}: {name} is listed in the manifest but missing; export the bundle again")
            digest = sha256_file(path)
            if digest != sha256:
                raise UserError(
                    f"{self.path}: {name} does not match the manifest (sha256 {digest[:12]}..., expected "
                    f"{sha256[:12]}...); the file was changed or damaged: export the bundle again"
                )
            self._verified.add(name)
        return path

    def _check_data_locations(self, path: Path, entry: GraphFile) -> None:
        """The graph's tensors name only the data files the manifest lists for it (and hashed)."""
        try:
            locations = external_data_locations(path)
        except MalformedGraph as exc:
            raise UserError(f"{path}: not a readable ONNX graph ({exc}); export the bundle again") from None
        graph_dir = PurePosixPath(entry.file).parent
        listed = {data.file for data in entry.data}
        for location in sorted(locations):
            name = check_relative_name(location, f"{path}: external data location")
            if str(graph_dir / name) not in listed:
                raise UserError(f"{path}: its tensors name the external data file {location[:60]!r}, which the manifest "
                                f"does not list for {entry.file}; refusing to load it")

    def verify_all(self) -> None:
        for name, by_precision in self.manifest.graphs.items():
            for precision in by_precision:
                self.graph_path(name, precision)

    def problems(self) -> list[str]:
        """Every graph file the manifest names that is missing, outside the bundle or changed, one line
        each; whichever backend would load them (``taming-deploy verify``)."""
        found = []
        for name, by_precision in self.manifest.graphs.items():
            for precision in by_precision:
                try:
                    self.graph_path(name, precision)
                except UserError as exc:
                    found.append(str(exc))
        return found
