"""Which backend runs a model: a pure decision from what was asked for and what loaded.

``--backend auto`` prefers TensorRT for a bundle whose engines load on this machine and otherwise
falls back to ONNX Runtime with a one-line note saying why; an explicit ``--backend trt`` that
cannot load is an error carrying the same reason. A project checkpoint runs on PyTorch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from taming_deploy.errors import UserError

Requested = Literal["auto", "torch", "ort", "trt"]
ModelKind = Literal["bundle", "checkpoint"]


@dataclass(frozen=True)
class Choice:
    backend: Literal["torch", "ort", "trt"]
    note: str | None = None  # for the user when ``auto`` did not get TensorRT


def choose_backend(requested: Requested, kind: ModelKind, trt_failure: str | None) -> Choice:
    """``trt_failure``: None when the TensorRT backend loaded, else why it did not (only consulted
    for a bundle with ``auto`` or ``trt``)."""
    if requested == "torch":
        return Choice("torch")
    if kind == "checkpoint":
        if requested == "auto":
            return Choice("torch")
        raise UserError(
            f"--backend {requested} runs an exported bundle, not a checkpoint; export one with `taming-deploy export`"
        )
    if requested == "ort":
        return Choice("ort")
    if trt_failure is None:
        return Choice("trt")
    if requested == "trt":
        raise UserError(trt_failure)
    return Choice("ort", note=f"backend auto: running on ONNX Runtime because the TensorRT engines cannot be used: {trt_failure}")
