"""Choosing and loading a backend for a model path (project checkpoint or exported bundle)."""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from taming_deploy.backends.base import Backend
from taming_deploy.errors import UserError
from taming_deploy.model_paths import DEFAULT_MODEL, is_bundle, is_checkpoint
from taming_deploy.validation import check_backend, check_model_path

BackendName = Literal["auto", "torch", "ort", "trt"]
log = logging.getLogger("taming_deploy")


def load_torch(path: Path) -> Backend:
    if not is_checkpoint(path):
        raise UserError(f"{path}: the torch backend runs a taming-deploy checkpoint (config.json + model.safetensors)")
    try:
        from taming_deploy.backends.torch_backend import TorchBackend
    except ImportError:
        raise UserError("the torch backend needs PyTorch: pip install 'taming-deploy[train]'") from None
    return TorchBackend.load(path)


def load_ort(path: Path) -> Backend:
    if not is_bundle(path):
        hint = "; export it first: taming-deploy export" if is_checkpoint(path) else ""
        raise UserError(f"{path}: the ort backend runs an exported bundle (manifest.json){hint}")
    from taming_deploy.backends.ort_backend import OrtBackend

    return OrtBackend(path)


def load_backend(path: Path | str | None, backend: BackendName = "auto", note: Callable[[str], None] = log.info) -> Backend:
    """``auto``: a checkpoint runs on torch; a bundle on its TensorRT engines when they load here,
    else on ONNX Runtime (``note`` is told why)."""
    from taming_deploy.engines import choose_backend, probe_trt_backend
    from taming_deploy.engines.engine_manifest import engines_dir

    check_backend(backend)
    check_model_path(path)
    path = DEFAULT_MODEL if path is None else Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such model (expected an exported bundle or a taming-deploy checkpoint)")
    if backend == "auto" and path == DEFAULT_MODEL and not engines_dir(path).exists():
        # nothing to probe (engines_dir: the user's cache folder for the embedded model)
        note("backend auto: running on ONNX Runtime (the embedded model ships without TensorRT engines; "
             "on a machine with an NVIDIA GPU `taming-deploy build` makes them)")
        return load_ort(path)
    kind = "checkpoint" if is_checkpoint(path) and not is_bundle(path) else "bundle"
    trt_backend, failure = probe_trt_backend(path) if kind == "bundle" and backend in ("auto", "trt") else (None, None)
    choice = choose_backend(backend, kind, failure)
    if choice.note:
        note(choice.note)
    if choice.backend == "trt":
        assert trt_backend is not None
        return trt_backend
    return load_torch(path) if choice.backend == "torch" else load_ort(path)
