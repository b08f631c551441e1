"""Throughput and latency of `taming-deploy serve` on the embedded model, with and without batching.

For each server setting (batching off: --max-batch 1; on: --max-batch 8) and each concurrency C, C
client threads send requests back to back until `--requests` have been answered; the table gives
images/s and p50/p95 latency. The baseline, in the same run: one in-process Pipeline, calling
`generate` once per request (what a service without batching does) and `generate_batch` on 8 requests.
Every request is a different label map with its own seed, at `--size` pixels.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import print_table  # noqa: E402

from taming_deploy.pipeline import GenerationRequest, Pipeline  # noqa: E402
from taming_deploy.service_client import ServerProcess, call, generate_url  # noqa: E402


def label_map(k: int, size: tuple[int, int], n_labels: int) -> np.ndarray:
    rng = np.random.default_rng(k)
    width, height = size
    blocks = rng.integers(0, n_labels, (max(1, height // 32), max(1, width // 32)))
    return np.asarray(Image.fromarray(blocks.astype(np.uint8)).resize((width, height), Image.Resampling.NEAREST))


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def measure_server(base: str, maps: list[np.ndarray], concurrency: int) -> tuple[float, list[float]]:
    """(images/s, latencies) for len(maps) requests sent by `concurrency` threads."""
    def one(k: int) -> float:
        started = time.perf_counter()
        reply = call(generate_url(base, seed=k), png(maps[k]), timeout=600)
        if reply.status != 200:
            raise RuntimeError(f"request {k}: HTTP {reply.status}: {reply.body[:200]!r}")
        return time.perf_counter() - started

    one(0)  # warm-up: the replica's first call pays for session start-up
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, range(len(maps))))
    return len(maps) / (time.perf_counter() - started), latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="128x128", help="image size WxH (default 128x128: 16x16 latents)")
    parser.add_argument("--requests", type=int, default=16, help="requests per measured row")
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--max-batch", type=int, default=8, help="the batching server's --max-batch")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    pipeline = Pipeline.load(None, "ort")
    maps = [label_map(k, (width, height), pipeline.spec.condition.n_labels or 1) for k in range(args.requests)]
    rows = []
    pipeline.generate(maps[0], seed=0)  # warm-up
    started = time.perf_counter()
    for k, cond in enumerate(maps):
        pipeline.generate(cond, seed=k)
    seconds = time.perf_counter() - started
    rows.append(["in-process Pipeline.generate, one at a time", "1", f"{len(maps) / seconds:.2f}", f"{seconds / len(maps):.2f}", ""])
    batch = [GenerationRequest(cond, seed=k) for k, cond in enumerate(maps[: args.max_batch])]
    started = time.perf_counter()
    pipeline.generate_batch(batch)
    seconds = time.perf_counter() - started
    rows.append([f"in-process Pipeline.generate_batch of {len(batch)}", "-", f"{len(batch) / seconds:.2f}", f"{seconds:.2f}", ""])
    del pipeline

    for label, max_batch in (("serve, batching off", 1), (f"serve, batching on (max {args.max_batch})", args.max_batch)):
        with ServerProcess(None, ["--backend", "ort", "--max-batch", str(max_batch), "--batch-wait-ms", "20"]) as base:
            for concurrency in concurrencies:
                rate, latencies = measure_server(base, maps, concurrency)
                rows.append([label, str(concurrency), f"{rate:.2f}", f"{percentile(latencies, 50):.2f}",
                             f"{percentile(latencies, 95):.2f}"])
    print(f"embedded model, {width}x{height} px, {args.requests} requests per row, ONNX Runtime")
    print_table(rows, ["", "concurrency", "images/s", "p50 s", "p95 s"])
    off = {r[1]: float(r[2]) for r in rows if r[0] == "serve, batching off"}
    on = {r[1]: float(r[2]) for r in rows if r[0].startswith("serve, batching on")}
    top = str(max(concurrencies))
    print(f"batching at concurrency {top}: {on[top] / off[top]:.2f}x the images/s of batching off")


if __name__ == "__main__":
    main()
