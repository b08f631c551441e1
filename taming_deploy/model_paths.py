"""What a model path on disk is: a project checkpoint, an exported bundle, or the embedded default."""
from __future__ import annotations

from pathlib import Path

CHECKPOINT_CONFIG = "config.json"
CHECKPOINT_WEIGHTS = "model.safetensors"
BUNDLE_MANIFEST = "manifest.json"
DEFAULT_MODEL = Path(__file__).resolve().parent / "default_model"


def is_checkpoint(path: Path) -> bool:
    return (path / CHECKPOINT_CONFIG).is_file() and (path / CHECKPOINT_WEIGHTS).is_file()


def is_bundle(path: Path) -> bool:
    return (path / BUNDLE_MANIFEST).is_file()
