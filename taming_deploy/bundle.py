"""An exported bundle: ONNX graphs plus ``manifest.json`` that describes and fingerprints them.

Layout (format version 2; version 1 bundles had a transformer graph that returned the whole cache):
    manifest.json
    encoder.onnx, decoder.onnx, [cond_encoder.onnx], transformer.onnx          fp32
    encoder.fp16.onnx, decoder.fp16.onnx, [cond_encoder.fp16.onnx], transformer.fp16.onnx
    engines/ (optional, TensorRT engines built on the target machine)
Every graph file is checked against its sha256 before it is used, so a tampered or half-copied
bundle fails with a message naming the file instead of computing garbage.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from taming_deploy.errors import UserError
from taming_deploy.documents import Doc, item_int, read_json, shown
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
class GraphFile:
    file: str
    sha256: str
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    weight_storage: str = "float"  # "int8": large weights stored as int8 + scales (export --int8-weights)

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "precision": self.precision,
            "weight_storage": self.weight_storage,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }

    @classmethod
    def from_dict(cls, d: dict | Doc) -> "GraphFile":
        doc = d if isinstance(d, Doc) else Doc(d, "graph entry")
        sha256 = doc.str("sha256")
        if len(sha256) != 64 or sha256.strip("0123456789abcdef"):
            raise doc.fail("sha256", "64 lowercase hex digits", sha256)
        tensors = lambda t, where: TensorSpec.from_dict(Doc(t, doc.source, where))  # noqa: E731
        return cls(
            file=check_relative_name(doc.str("file"), f"{doc.source}: {doc.field('file')}"),
            sha256=sha256,
            precision=doc.str("precision", PRECISIONS),
            inputs=tuple(doc.list("inputs", tensors, max_items=1024)),
            outputs=tuple(doc.list("outputs", tensors, max_items=1024)),
            weight_storage=doc.str("weight_storage", ("float", "int8"), default="float"),
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
        self._verified: set[str] = set()

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
        """The verified path of a graph file."""
        entry = self.graph(name, precision)
        path = contained_path(self.path, entry.file, str(self.path / BUNDLE_MANIFEST))
        if entry.file not in self._verified:
            if not path.is_file():
                raise UserError(f"{self.path}: {entry.file} is listed in the manifest but missing; export the bundle again")
            digest = sha256_file(path)
            if digest != entry.sha256:
                raise UserError(
                    f"{self.path}: {entry.file} does not match the manifest (sha256 {digest[:12]}..., expected "
                    f"{entry.sha256[:12]}...); the file was changed or damaged: export the bundle again"
                )
            self._verified.add(entry.file)
        return path

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
