"""What a model path on disk is: a project checkpoint, an exported bundle, or the embedded default."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from taming_deploy.errors import UserError

CHECKPOINT_CONFIG = "config.json"
CHECKPOINT_WEIGHTS = "model.safetensors"
BUNDLE_MANIFEST = "manifest.json"
DEFAULT_MODEL = Path(__file__).resolve().parent / "default_model"


def is_checkpoint(path: Path) -> bool:
    return (path / CHECKPOINT_CONFIG).is_file() and (path / CHECKPOINT_WEIGHTS).is_file()


def is_bundle(path: Path) -> bool:
    return (path / BUNDLE_MANIFEST).is_file()


def model_kind(path: Path) -> Literal["bundle", "checkpoint"]:
    """Which of the two a model directory is; neither is a one-line UserError."""
    if is_bundle(path):
        return "bundle"
    if is_checkpoint(path):
        return "checkpoint"
    raise UserError(f"{path}: neither a bundle ({BUNDLE_MANIFEST}) nor a checkpoint ({CHECKPOINT_CONFIG} + {CHECKPOINT_WEIGHTS})")
