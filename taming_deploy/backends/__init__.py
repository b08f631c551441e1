"""Choosing and loading a backend for a model path (project checkpoint or exported bundle)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from taming_deploy.backends.base import Backend
from taming_deploy.errors import UserError
from taming_deploy.model_paths import DEFAULT_MODEL, is_bundle, is_checkpoint

BackendName = Literal["auto", "torch", "ort", "trt"]


def load_torch(path: Path) -> Backend:
    if not is_checkpoint(path):
        raise UserError(f"{path}: the torch backend runs a taming-deploy checkpoint (config.json + model.safetensors)")
    try:
        from taming_deploy.backends.torch_backend import TorchBackend
    except ImportError:
        raise UserError("the torch backend needs PyTorch: pip install 'taming-deploy[train]'") from None
    return TorchBackend(path)


def load_ort(path: Path) -> Backend:
    if not is_bundle(path):
        hint = "; export it first: taming-deploy export" if is_checkpoint(path) else ""
        raise UserError(f"{path}: the ort backend runs an exported bundle (manifest.json){hint}")
    from taming_deploy.backends.ort_backend import OrtBackend

    return OrtBackend(path)


def load_backend(path: Path | str | None, backend: BackendName = "auto") -> Backend:
    """``auto``: a checkpoint runs on torch; a bundle on ONNX Runtime."""
    path = DEFAULT_MODEL if path is None else Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such model (expected an exported bundle or a taming-deploy checkpoint)")
    if backend == "torch" or (backend == "auto" and is_checkpoint(path) and not is_bundle(path)):
        return load_torch(path)
    if backend in ("ort", "auto"):
        return load_ort(path)
    raise UserError(f"{path}: backend {backend!r} is not available")
