"""`taming-deploy info PATH --json`: what `info` prints, as one JSON object for scripts.

A bundle: its manifest as written by the exporter (model spec, graphs with their I/O, validation),
each graph file's size on disk, and engines.json when engines were built. A checkpoint: its
config.json and the parameter count of each stage."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from taming_deploy.bundle import Bundle
from taming_deploy.documents import read_json
from taming_deploy.info import parameter_counts
from taming_deploy.model_paths import CHECKPOINT_CONFIG, CHECKPOINT_WEIGHTS, model_kind


def bundle_json(path: Path) -> dict[str, Any]:
    manifest = Bundle(path).manifest
    files = [entry.file for by_precision in manifest.graphs.values() for entry in by_precision.values()]
    engines = path / "engines" / "engines.json"
    return {
        "kind": "bundle",
        "path": str(path),
        "manifest": manifest.to_dict(),
        "file_bytes": {file: (path / file).stat().st_size for file in files if (path / file).is_file()},
        "engines": read_json(engines, "engines manifest").data if engines.is_file() else None,
    }


def checkpoint_json(path: Path) -> dict[str, Any]:
    return {
        "kind": "checkpoint",
        "path": str(path),
        "config": read_json(path / CHECKPOINT_CONFIG, "checkpoint config").data,
        "parameters": parameter_counts(path / CHECKPOINT_WEIGHTS),
    }


def describe_json(path: Path) -> dict[str, Any]:
    path = Path(path)
    return bundle_json(path) if model_kind(path) == "bundle" else checkpoint_json(path)
