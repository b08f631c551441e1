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

import json
from dataclasses import dataclass, field
from pathlib import Path

from taming_deploy.errors import UserError
from taming_deploy.fileutil import sha256_file
from taming_deploy.model_paths import BUNDLE_MANIFEST
from taming_deploy.spec import ModelSpec

BUNDLE_FORMAT = "taming-deploy-bundle"
BUNDLE_VERSION = 2
GRAPH_NAMES = ("encoder", "decoder", "cond_encoder", "transformer")
PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, float16, int64
    shape: tuple[int | str, ...]  # str: a dynamic axis, named

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


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
    def from_dict(cls, d: dict) -> "GraphFile":
        return cls(
            file=d["file"],
            sha256=d["sha256"],
            precision=d["precision"],
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            weight_storage=d.get("weight_storage", "float"),
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
    def from_dict(cls, d: dict, source: str) -> "Manifest":
        if d.get("format") != BUNDLE_FORMAT:
            raise UserError(f"{source}: not a taming-deploy bundle manifest (format {d.get('format')!r})")
        version = d.get("format_version")
        if not isinstance(version, int) or version > BUNDLE_VERSION:
            raise UserError(
                f"{source}: bundle format version {version} is newer than this taming-deploy reads "
                f"({BUNDLE_VERSION}); upgrade taming-deploy or export the bundle again with this version"
            )
        if version < BUNDLE_VERSION:
            raise UserError(
                f"{source}: bundle format version {version} is older than this taming-deploy reads "
                f"({BUNDLE_VERSION}); export the bundle again with `taming-deploy export`"
            )
        try:
            return cls(
                model=ModelSpec.from_dict(d["model"]),
                graphs={g: {p: GraphFile.from_dict(f) for p, f in by_p.items()} for g, by_p in d["graphs"].items()},
                producer=d.get("producer", {}),
                validation=d.get("validation", {}),
                format_version=version,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{source}: malformed manifest ({type(exc).__name__}: {exc})") from None


class Bundle:
    """A bundle directory; graph files are verified against the manifest when first asked for."""

    def __init__(self, path: Path):
        self.path = Path(path)
        manifest_path = self.path / BUNDLE_MANIFEST
        if not manifest_path.is_file():
            raise UserError(f"{self.path}: not a bundle (no {BUNDLE_MANIFEST}); create one with `taming-deploy export`")
        try:
            raw = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{manifest_path}: unreadable manifest ({exc})") from None
        self.manifest = Manifest.from_dict(raw, str(manifest_path))
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
        path = self.path / entry.file
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
