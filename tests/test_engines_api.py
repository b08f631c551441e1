"""The TensorRT code must not use APIs that TensorRT 10.x or 11.x removed.

Sources: TensorRT 10 migration guide ("Removed Python APIs": binding-index calls, execute_async_v2,
build_engine, max_workspace_size -> set_memory_pool_limit) and the 10.x -> 11.x Python migration
page ("Removed Python APIs": BuilderFlag.FP16/INT8/FP8/BF16/INT4/FP4, OBEY_/PREFER_PRECISION_
CONSTRAINTS, DIRECT_IO); STRICT_TYPES went in 10.0. pycuda is out by design (DESIGN.md: device memory
through cuda-python). The scan reads the syntax tree, so comments and docstrings that name these
APIs (like this one) do not count, and attribute access, getattr/hasattr strings, keywords and
imports do.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCANNED = sorted((REPO / "engines").glob("*.py")) + [REPO / "benchmarks" / "gpu_benchmark.py"]

REMOVED_MEMBERS = {
    "execute_async", "execute_async_v2", "execute", "enqueue", "enqueue_v2",  # implicit-batch / binding-array execution
    "get_binding_index", "get_binding_name", "get_binding_shape", "get_binding_dtype", "get_binding_format",
    "get_binding_vectorized_dim", "binding_is_input", "num_bindings", "set_binding_shape", "get_binding_bytes_per_component",
    "max_batch_size", "max_workspace_size", "build_engine", "build_cuda_engine",
}
WEAK_TYPING_FLAGS = {
    "FP16", "INT8", "BF16", "FP8", "INT4", "FP4", "STRICT_TYPES", "OBEY_PRECISION_CONSTRAINTS",
    "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO",
}
REMOVED_MODULES = ("pycuda",)


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def removed_api_uses(source: str, filename: str = "<snippet>") -> list[str]:
    """Every use of a removed TensorRT API or of pycuda in ``source``, as 'file:line: what'."""
    found = []

    def report(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{getattr(node, 'lineno', 0)}: {what}")

    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Attribute):
            if node.attr in REMOVED_MEMBERS:
                report(node, f".{node.attr}")
            elif node.attr in WEAK_TYPING_FLAGS and dotted(node.value).split(".")[-1] == "BuilderFlag":
                report(node, f"BuilderFlag.{node.attr}")
        elif isinstance(node, ast.keyword) and node.arg in REMOVED_MEMBERS:
            report(node, f"keyword {node.arg}=")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr", "setattr"):
            if len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                name = node.args[1].value
                if name in REMOVED_MEMBERS or (name in WEAK_TYPING_FLAGS and dotted(node.args[0]).endswith("BuilderFlag")):
                    report(node, f"{node.func.id}(..., {name!r})")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in REMOVED_MODULES:
                    report(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in REMOVED_MODULES:
            report(node, f"from {node.module} import")
    return found


def test_the_tensorrt_code_uses_no_removed_api():
    assert len(SCANNED) >= 10, SCANNED  # the engines package and the benchmark are really scanned
    found = [hit for path in SCANNED for hit in removed_api_uses(path.read_text(), str(path.relative_to(REPO)))]
    assert found == []


@pytest.mark.parametrize("snippet", [
    "context.execute_async_v2(bindings, stream)",
    "i = engine.get_binding_index('x')",
    "shape = engine.get_binding_shape(0)",
    "if engine.binding_is_input(i): pass",
    "for i in range(engine.num_bindings): pass",
    "config.set_flag(trt.BuilderFlag.FP16)",
    "config.set_flag(tensorrt.BuilderFlag.INT8)",
    "from tensorrt import BuilderFlag\nconfig.set_flag(BuilderFlag.BF16)",
    "config.set_flag(trt.BuilderFlag.FP8)",
    "config.set_flag(trt.BuilderFlag.STRICT_TYPES)",
    "config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)",
    "config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)",
    "config.set_flag(getattr(trt.BuilderFlag, 'FP16'))",
    "config.max_workspace_size = 1 << 30",
    "make(max_workspace_size=1)",
    "engine = builder.build_engine(network, config)",
    "f = getattr(builder, 'build_engine')",
    "import pycuda.driver as cuda",
    "import pycuda.autoinit",
    "from pycuda import gpuarray",
])
def test_the_scanner_catches_removed_apis(snippet):
    assert removed_api_uses(snippet) != []


@pytest.mark.parametrize("snippet", [
    "# config.set_flag(trt.BuilderFlag.FP16) was removed in TensorRT 11",
    '"""we never call execute_async_v2 or build_engine"""',
    "context.execute_async_v3(stream)",
    "plan = builder.build_serialized_network(network, config)",
    "config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)",
    "config.clear_flag(trt.BuilderFlag.TF32)",
    "dtype = trt.DataType.HALF",
    "name = engine.get_tensor_name(0)",
    "from cuda.bindings import runtime",
])
def test_the_scanner_lets_current_apis_and_prose_pass(snippet):
    assert removed_api_uses(snippet) == []
