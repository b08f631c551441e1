"""The one place that imports TensorRT and cuda-python.

Both are optional (the ``gpu`` extra): every other module of the runtime imports without them, and
asking for either here on a machine that lacks it is a one-line UserError with the install command.
"""
from __future__ import annotations

from types import ModuleType

from taming_deploy.errors import UserError

INSTALL_HINT = ("pip install 'taming-deploy[gpu-cu12]' or 'taming-deploy[gpu-cu13]' (the CUDA major of the NVIDIA driver) "
                "--extra-index-url https://pypi.nvidia.com")

# The bundles' graphs are opset 21 and use GroupNormalization-21 (per-channel scale and bias). The
# ONNX parser handles that form from TensorRT 10.9 on (ONNX-TensorRT changelog, "TensorRT 10.9 GA":
# "Added support for opset 21 GroupNorm", NVIDIA/TensorRT#4336); 10.0-10.8 reject the node.
MIN_TENSORRT = (10, 9)


def parse_version(text: str) -> tuple[int, ...]:
    """'10.9.0.34' -> (10, 9, 0, 34); non-numeric parts (e.g. 'post1') end the version."""
    parts: list[int] = []
    for piece in text.split("."):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


def tensorrt() -> ModuleType:
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:  # OSError: the wheel is there but libnvinfer is not loadable
        raise UserError(f"TensorRT is not installed or cannot load ({exc}); install it with {INSTALL_HINT}") from None
    version = parse_version(getattr(trt, "__version__", ""))
    if version[:2] < MIN_TENSORRT:
        need = ".".join(map(str, MIN_TENSORRT))
        raise UserError(
            f"TensorRT {trt.__version__} is too old: the bundle's opset-21 graphs need TensorRT >= {need} "
            f"(10.x or 11.x); upgrade with {INSTALL_HINT}"
        )
    return trt


def cudart() -> ModuleType:
    """cuda-python's runtime API module (``cuda.bindings.runtime``)."""
    try:
        from cuda.bindings import runtime
    except ImportError as exc:
        raise UserError(f"cuda-python is not installed ({exc}); install it with {INSTALL_HINT}") from None
    return runtime
