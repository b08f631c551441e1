"""`taming-deploy info --system`: what this machine offers the backends, each item its value or
``not available: why``. Reads versions only: no engine is built, no model loaded."""
from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from taming_deploy import __version__
from taming_deploy.engines import cuda, deps
from taming_deploy.errors import UserError


@dataclass(frozen=True)
class Item:
    label: str
    value: Any = None
    missing: str | None = None  # why the value is not available

    def to_json(self) -> Any:
        return self.value if self.missing is None else {"not_available": self.missing}

    def to_line(self) -> str:
        shown = self.value if self.missing is None else f"not available: {self.missing}"
        if isinstance(shown, list):
            shown = ", ".join(map(str, shown))
        return f"{self.label + ':':<23}{shown}"


def probe(label: str, read: Callable[[], Any]) -> Item:
    """``read()``'s value, or why it failed: its UserError's message, or the exception's type and text."""
    try:
        return Item(label, read())
    except UserError as exc:
        return Item(label, missing=str(exc))
    except Exception as exc:  # a library that is installed but cannot load (OSError, RuntimeError, ...)
        return Item(label, missing=f"{type(exc).__name__}: {exc}")


def cuda_version(number: int) -> str:
    """12040 -> '12.4' (the CUDA encoding: 1000 * major + 10 * minor)."""
    return f"{number // 1000}.{number % 1000 // 10}"


def driver_version() -> str:
    number = cuda.check(deps.cudart().cudaDriverGetVersion(), "cudaDriverGetVersion")
    if not number:
        raise UserError("no NVIDIA driver is installed")
    return cuda_version(number)


def runtime_version() -> str:
    return cuda_version(cuda.check(deps.cudart().cudaRuntimeGetVersion(), "cudaRuntimeGetVersion"))


def onnxruntime_module() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise UserError(f"ONNX Runtime is not installed ({exc}); pip install onnxruntime") from None
    return onnxruntime


def gpu_items() -> list[Item]:
    gpu = probe("gpu", cuda.device_info)
    if gpu.missing is not None:
        return [gpu, Item("compute capability", missing=gpu.missing)]
    major, minor = gpu.value.compute_capability
    return [Item("gpu", gpu.value.name), Item("compute capability", f"{major}.{minor}")]


def system_items() -> list[Item]:
    return [
        Item("taming-deploy", __version__),
        Item("python", platform.python_version()),
        Item("platform", platform.platform()),
        probe("tensorrt", lambda: deps.tensorrt().__version__),
        probe("cuda driver", driver_version),
        probe("cuda runtime", runtime_version),
        *gpu_items(),
        probe("onnxruntime", lambda: onnxruntime_module().__version__),
        probe("onnxruntime providers", lambda: list(onnxruntime_module().get_available_providers())),
    ]


def system_json() -> dict[str, Any]:
    return {item.label.replace(" ", "_").replace("-", "_"): item.to_json() for item in system_items()}


def system_lines() -> list[str]:
    return [item.to_line() for item in system_items()]
