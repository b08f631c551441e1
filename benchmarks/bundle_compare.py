"""Bundles side by side on ONNX Runtime: size on disk and the time of each graph's work.

    python benchmarks/bundle_compare.py --bundle taming_deploy/default_model --bundle OTHER [--threads N]

Made for weight storage (an fp32 bundle against its ``export --int8-weights`` twin): the first
``--bundle`` is the baseline, every row's ``x`` columns are its time over the row's. Per bundle:
MB of graph files; the time to open all sessions; one transformer step at position 300 and one
prefill of 256 tokens; decoding and encoding one image of ``--size``; and one whole ``generate``
(exact mode, top-k 100, seed 0) at that size. Times are the best of ``--repeat``, the bundles
interleaved so that load changes hit all alike.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchlib import print_table, timed
from taming_deploy.backends.ort_backend import OrtBackend
from taming_deploy.bundle import GRAPH_NAMES
from taming_deploy.pipeline import Pipeline


def bundle_megabytes(backend: OrtBackend) -> float:
    return sum(backend.bundle.graph_path(name).stat().st_size for name in GRAPH_NAMES if backend.bundle.has_graph(name)) / 1e6


def open_seconds(path: Path, threads: int) -> float:
    started = time.perf_counter()
    backend = OrtBackend(path, threads=threads)
    for name in GRAPH_NAMES:
        if backend.bundle.has_graph(name):
            backend.session(name)
    return time.perf_counter() - started


def workloads(backend: OrtBackend, pipeline: Pipeline, size: tuple[int, int]) -> dict[str, Callable[[], object]]:
    """Name -> a call doing that work once on ``backend``."""
    spec = backend.spec
    rng = np.random.default_rng(0)
    width, height = size
    f = spec.downsample_factor
    tokens = rng.integers(0, spec.image_codebook_size, size=(1, height // f, width // f))
    image = rng.uniform(-1, 1, size=(1, 3, height, width)).astype(np.float32)
    sequence = rng.integers(0, spec.vocab_size, size=(1, 301))
    cache = backend.new_cache(1)
    backend.transformer_step(sequence[:, :300], 0, cache)
    labels = np.zeros((height, width), np.int64)
    labels[height // 2 :] = min(5, (spec.condition.n_labels or 1) - 1)
    condition = labels if spec.condition.kind == "segmentation" else None
    return {
        "step ms": lambda: backend.transformer_step(sequence[:, 300:301], 300, cache),
        "prefill 256 ms": lambda: backend.transformer_step(sequence[:, :256], 0, backend.new_cache(1)),
        "decode s": lambda: backend.decode(tokens),
        "encode s": lambda: backend.encode(image),
        "generate s": lambda: pipeline.generate(condition, size=size, seed=0),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, action="append", required=True, help="a bundle (repeat; the first is the baseline)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per measure (default: %(default)s)")
    parser.add_argument("--size", default="256x256", help="image width x height in pixels (default: %(default)s)")
    args = parser.parse_args(argv)
    size = tuple(int(v) for v in args.size.split("x"))
    seconds: list[dict[str, float]] = [{"open s": min(open_seconds(path, args.threads) for _ in range(args.repeat))} for path in args.bundle]
    backends = [OrtBackend(path, threads=args.threads) for path in args.bundle]
    work = [workloads(backend, Pipeline(backend), size) for backend in backends]
    for calls in work:  # warm-up: sessions opened, first-run allocations made
        for name, call in calls.items():
            if name != "generate s":
                call()
    for name in work[0]:
        for _ in range(args.repeat):
            for k, calls in enumerate(work):  # interleaved: one run of each bundle in turn
                elapsed = timed(calls[name])[1]
                seconds[k][name] = min(seconds[k].get(name, elapsed), elapsed)
    print(f"ONNX Runtime, {args.threads} thread(s), best of {args.repeat}, {size[0]}x{size[1]} images; (x) = the first bundle's time over the row's")
    rows = []
    for path, backend, measured in zip(args.bundle, backends, seconds):
        row = [str(path), f"{bundle_megabytes(backend):.1f}"]
        for name, value in measured.items():
            row.append(f"{value * 1e3 if name.endswith('ms') else value:.3g} ({seconds[0][name] / value:.2f}x)")
        rows.append(row)
    print_table(rows, ["bundle", "MB", *seconds[0]])


if __name__ == "__main__":
    main()
