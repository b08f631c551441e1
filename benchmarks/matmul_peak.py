"""The CPU's measured fp32 matrix-multiply throughput: the ceiling the token loop is compared with.

    python benchmarks/matmul_peak.py [--size 1024] [--repeat 10] [--threads N]

One square GEMM (size x size x size, 2 * size^3 FLOPs), best of --repeat runs after a warm-up, with
torch (its bundled BLAS/oneDNN), numpy (its BLAS) and ONNX Runtime (a one-node MatMul graph, the
kernel the ORT backend's transformer uses). Prints GFLOP/s per library.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import numpy as np

from benchlib import CLOCKS, Clock, best_seconds, print_table, set_threads


def gemm_flops(size: int) -> int:
    return 2 * size**3


def torch_gemm(size: int, threads: int | None) -> Callable[[], object]:
    import torch

    set_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    return lambda: torch.mm(a, b, out=out)


def numpy_gemm(size: int, threads: int | None) -> Callable[[], object]:
    """numpy's BLAS threads are fixed when numpy loads (OPENBLAS_NUM_THREADS); ``threads`` is not applied."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((size, size), np.float32), rng.standard_normal((size, size), np.float32)
    out = np.empty((size, size), np.float32)
    return lambda: np.matmul(a, b, out=out)


def ort_gemm(size: int, threads: int | None) -> Callable[[], object]:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["y"])], "gemm",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [size, size]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size, size])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    onnx.checker.check_model(model)
    rng = np.random.default_rng(0)
    binding = session.io_binding()
    for name in ("a", "b"):
        binding.bind_cpu_input(name, rng.standard_normal((size, size), np.float32))
    binding.bind_ortvalue_output("y", ort.OrtValue.ortvalue_from_numpy(np.empty((size, size), np.float32)))
    return lambda: session.run_with_iobinding(binding)


LIBRARIES: dict[str, Callable[[int, int | None], Callable[[], object]]] = {
    "torch": torch_gemm, "numpy": numpy_gemm, "onnxruntime": ort_gemm,
}


def measured_gflops(library: str, size: int = 1024, repeat: int = 10, threads: int | None = None) -> float:
    run = LIBRARIES[library](size, threads)
    return gemm_flops(size) / best_seconds(run, repeat, warmup=2) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch and ORT threads (default: all cores)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall", help="wall (default) or cpu: this process's CPU time")
    args = parser.parse_args(argv)
    Clock.use(args.clock)
    rows = [[name, f"{measured_gflops(name, args.size, args.repeat, args.threads):.1f}"] for name in LIBRARIES]
    print(f"fp32 GEMM {args.size}x{args.size}x{args.size}, best of {args.repeat}, {os.cpu_count()} cores visible, "
          f"threads {args.threads or 'all'}, {Clock.name} clock")
    print_table(rows, ["library", "GFLOP/s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
