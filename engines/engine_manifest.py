"""``BUNDLE/engines/engines.json``: what the engines were built with, and whether they still fit.

A TensorRT plan runs only on the TensorRT version and the GPU it was built for, and only means
something for the graphs it was built from. The file records all three; ``incompatibility``
compares them with the running machine and the bundle and returns the reason they differ (or
None), so that loading stale engines is one clear message instead of a deserialisation failure or,
worse, an engine silently computing an older model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from taming_deploy.engines.profiles import Profile
from taming_deploy.bundle import GraphFile, Manifest
from taming_deploy.documents import first_line, read_json
from taming_deploy.errors import UserError
from taming_deploy.fileutil import check_relative_name, sha256_file
from taming_deploy.model_paths import BUNDLE_MANIFEST, DEFAULT_MODEL

ENGINES_DIR = "engines"
ENGINES_MANIFEST = "engines.json"
TIMING_CACHE = "timing.cache"
ENGINES_FORMAT = "taming-deploy-engines"
ENGINES_VERSION = 1


@dataclass(frozen=True)
class Environment:
    """What a plan is tied to: the TensorRT version and the GPU."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]

    def to_dict(self) -> dict:
        return {
            "tensorrt_version": self.tensorrt_version,
            "gpu": {"name": self.gpu_name, "compute_capability": list(self.compute_capability)},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Environment":
        cc = d["gpu"]["compute_capability"]
        return cls(d["tensorrt_version"], d["gpu"]["name"], (int(cc[0]), int(cc[1])))


@dataclass(frozen=True)
class EngineEntry:
    file: str  # the plan, relative to the engines directory
    sha256: str  # of the plan
    source_file: str  # the ONNX graph, relative to the bundle
    source_sha256: str
    profiles: tuple[Profile, ...]

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "source": {"file": self.source_file, "sha256": self.source_sha256},
            "profiles": [p.to_dict() for p in self.profiles],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "EngineEntry":
        return cls(
            file=check_relative_name(d["file"], "engines.json: engines.*.file"),
            sha256=d["sha256"],
            source_file=d["source"]["file"],
            source_sha256=d["source"]["sha256"],
            profiles=tuple(Profile.from_dict(p) for p in d["profiles"]),
        )


@dataclass(frozen=True)
class EngineManifest:
    environment: Environment
    precision: str
    engines: dict[str, EngineEntry]  # graph name -> engine
    build: dict = field(default_factory=dict)  # limits and builder settings, for the record
    format_version: int = ENGINES_VERSION

    def to_dict(self) -> dict:
        return {
            "format": ENGINES_FORMAT,
            "format_version": self.format_version,
            **self.environment.to_dict(),
            "precision": self.precision,
            "build": self.build,
            "engines": {name: e.to_dict() for name, e in self.engines.items()},
        }

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "EngineManifest":
        if d.get("format") != ENGINES_FORMAT:
            raise UserError(f"{source}: not a taming-deploy engines manifest (format {d.get('format')!r})")
        version = d.get("format_version")
        if not isinstance(version, int) or version > ENGINES_VERSION:
            raise UserError(f"{source}: engines format version {version} is newer than this taming-deploy reads; rebuild the engines")
        try:
            return cls(
                environment=Environment.from_dict(d),
                precision=d["precision"],
                engines={name: EngineEntry.from_dict(e) for name, e in d["engines"].items()},
                build=d.get("build", {}),
                format_version=version,
            )
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise UserError(f"{source}: malformed engines manifest ({type(exc).__name__}: {first_line(exc, 120)}); rebuild the engines") from None


def user_engines_root() -> Path:
    """Where engines of bundles that are not the user's own live: ``$XDG_CACHE_HOME/taming-deploy/engines``
    (``~/.cache/...`` when XDG_CACHE_HOME is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "taming-deploy" / "engines"


def engines_dir(bundle_dir: Path) -> Path:
    """``BUNDLE/engines``; for the embedded model, which lives inside the installed package (often
    read-only, and replaced by every upgrade), a folder of the user's cache named by the hash of its
    manifest, so engines built for one version are never taken for another's."""
    bundle_dir = Path(bundle_dir)
    if bundle_dir.resolve() == DEFAULT_MODEL:
        return user_engines_root() / sha256_file(bundle_dir / BUNDLE_MANIFEST)[:16]
    return bundle_dir / ENGINES_DIR


def build_command(bundle_dir: Path) -> str:
    """The command that builds ``bundle_dir``'s engines (no path for the embedded model)."""
    return "taming-deploy build" if Path(bundle_dir).resolve() == DEFAULT_MODEL else f"taming-deploy build {bundle_dir}"


def read_engine_manifest(bundle_dir: Path) -> EngineManifest:
    path = engines_dir(bundle_dir) / ENGINES_MANIFEST
    if not path.is_file():
        raise UserError(
            f"no TensorRT engines in {path.parent} (no {ENGINES_MANIFEST}); build them with "
            f"`{build_command(bundle_dir)}` on the machine with the NVIDIA GPU"
        )
    try:
        document = read_json(path, "engines manifest")
    except UserError as exc:
        raise UserError(f"{exc}; rebuild the engines") from None
    return EngineManifest.from_dict(document.data, str(path))


def environment_difference(built: Environment, current: Environment) -> str | None:
    """Why a plan built in ``built`` cannot run in ``current`` (TensorRT plans are tied to the exact
    TensorRT version and to the GPU), or None. The same test decides whether a timing cache is reusable."""
    if built.tensorrt_version != current.tensorrt_version:
        return f"the engines were built with TensorRT {built.tensorrt_version}, this is TensorRT {current.tensorrt_version}"
    if built.compute_capability != current.compute_capability or built.gpu_name != current.gpu_name:
        b_cc, c_cc = (".".join(map(str, cc)) for cc in (built.compute_capability, current.compute_capability))
        return f"the engines were built for {built.gpu_name} (compute capability {b_cc}), this GPU is {current.gpu_name} ({c_cc})"
    return None


def required_graphs(bundle: Manifest, precision: str) -> list[str]:
    """The graphs of the bundle that get an engine at ``precision``, in build order."""
    return [name for name, by_precision in bundle.graphs.items() if precision in by_precision]


def incompatibility(engines: EngineManifest, current: Environment, bundle: Manifest) -> str | None:
    """Why these engines cannot serve this bundle on this machine, or None."""
    if reason := environment_difference(engines.environment, current):
        return reason
    names = required_graphs(bundle, engines.precision)
    if not names:
        return f"the bundle has no {engines.precision} graphs, which the engines were built from"
    for name in names:
        graph = bundle.graphs[name][engines.precision]
        entry = engines.engines.get(name)
        if entry is None:
            return f"there is no {name} engine"
        if entry.source_sha256 != graph.sha256:
            return f"the {name} engine was built from another {graph.file} than the bundle's (the graphs were exported again)"
    return None


def io_mismatch(actual: list[tuple[str, bool, str]], graph: GraphFile) -> str | None:
    """Compare an engine's I/O tensors, (name, is_input, numpy dtype name), with its graph's
    declared inputs and outputs; the reason they differ, or None."""
    declared = [(t.name, True, t.dtype) for t in graph.inputs] + [(t.name, False, t.dtype) for t in graph.outputs]
    if sorted(actual) != sorted(declared):
        return f"the engine's tensors {sorted(actual)} differ from {graph.file}'s {sorted(declared)}"
    return None
