"""Throughput and latency of `taming-deploy serve` on the embedded model, with and without batching.

For each server setting (batching off: --max-batch 1; on: --max-batch 8) and each concurrency C, C
client threads send requests back to back until `--requests` have been answered; the table gives
images/s, p50/p95 latency, the mean batch the requests were sampled in (from the replies' stats) and
the replica's CPU seconds per image. The baseline, in the same run: one in-process Pipeline, calling
`generate` once per request (what a service without batching does) and `generate_batch` on the same
requests, 8 at a time (after one warm-up batch; its p50 column is the time of one batch).
A second table splits an image's time into its stages, alone and in a batch of 8. Every request is a
different label map with its own seed, at `--size` pixels; replies are asked for as JSON (the same
PNG encoding, plus base64) so that they carry their stats.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import print_table  # noqa: E402

from taming_deploy.pipeline import Generation, GenerationRequest, Pipeline  # noqa: E402
from taming_deploy.serving import png_bytes  # noqa: E402
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


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a local process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stage_row(label: str, generations: list[Generation]) -> list[str]:
    """Milliseconds per image in each stage; a run's sampling and decoding are shared by its batch."""
    images = sum(len(g.images) for g in generations)
    share = [g.stats["n"] / g.stats["batch"] for g in generations]  # of its run
    started = time.perf_counter()
    for generation in generations:
        for image in generation.images:
            png_bytes(image)
    stages = [sum(g.stats["condition_seconds"] for g in generations),
              sum(g.stats["sample_seconds"] * k for g, k in zip(generations, share)),
              sum(g.stats["decode_seconds"] * k for g, k in zip(generations, share)),
              time.perf_counter() - started]
    return [label, *(f"{1000 * seconds / images:.0f}" for seconds in stages), f"{1000 * sum(stages) / images:.0f}"]


def measure_server(base: str, maps: list[np.ndarray], concurrency: int) -> tuple[float, list[float], float, float]:
    """(images/s, latencies, mean batch, replica CPU s per image) for len(maps) requests sent by
    ``concurrency`` threads."""
    def one(k: int) -> tuple[float, int]:
        started = time.perf_counter()
        reply = call(generate_url(base, seed=k, format="json"), png(maps[k]), timeout=600)
        if reply.status != 200:
            raise RuntimeError(f"request {k}: HTTP {reply.status}: {reply.body[:200]!r}")
        return time.perf_counter() - started, reply.json()["stats"]["batch"]

    one(0)  # warm-up: the replica's first call pays for session start-up
    replica = call(base + "/health").json()["pid"]
    cpu = process_cpu_seconds(replica)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(one, range(len(maps))))
    seconds = time.perf_counter() - started
    cpu = process_cpu_seconds(replica) - cpu
    return (len(maps) / seconds, [latency for latency, _ in answers], float(np.mean([b for _, b in answers])),
            cpu / len(maps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="128x128", help="image size WxH (default 128x128: 16x16 latents)")
    parser.add_argument("--requests", type=int, default=16, help="requests per measured row")
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--max-batch", type=int, default=8, help="the batching server's --max-batch")
    parser.add_argument("--batch-wait-ms", type=float, default=20.0, help="the batching server's --batch-wait-ms (default: serve's)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    load_before = os.getloadavg()

    pipeline = Pipeline.load(None, "ort")
    maps = [label_map(k, (width, height), pipeline.spec.condition.n_labels or 1) for k in range(args.requests)]
    rows = []
    pipeline.generate(maps[0], seed=0)  # warm-up
    started, cpu = time.perf_counter(), time.process_time()
    alone = [pipeline.generate(cond, seed=k) for k, cond in enumerate(maps)]
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    rows.append(["in-process Pipeline.generate, one at a time", "1", f"{len(maps) / seconds:.2f}",
                 f"{seconds / len(maps):.2f}", "", "1", f"{cpu / len(maps):.2f}"])
    requests = [GenerationRequest(cond, seed=k) for k, cond in enumerate(maps)]
    batches = [requests[k : k + args.max_batch] for k in range(0, len(requests), args.max_batch)]
    pipeline.generate_batch(batches[0])  # warm-up at the batch size
    started, cpu = time.perf_counter(), time.process_time()
    together = [generation for batch in batches for generation in pipeline.generate_batch(batch)]
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    rows.append([f"in-process Pipeline.generate_batch of {args.max_batch}", "-", f"{len(maps) / seconds:.2f}",
                 f"{seconds / len(batches):.2f}", "", str(args.max_batch), f"{cpu / len(maps):.2f}"])
    stages = [stage_row("alone (generate)", alone), stage_row(f"batch of {args.max_batch} (generate_batch)", together)]
    del pipeline

    for label, max_batch in (("serve, batching off", 1), (f"serve, batching on (max {args.max_batch})", args.max_batch)):
        with ServerProcess(None, ["--backend", "ort", "--max-batch", str(max_batch), "--batch-wait-ms", str(args.batch_wait_ms)]) as base:
            for concurrency in concurrencies:
                rate, latencies, mean_batch, cpu = measure_server(base, maps, concurrency)
                rows.append([label, str(concurrency), f"{rate:.2f}", f"{np.percentile(latencies, 50):.2f}",
                             f"{np.percentile(latencies, 95):.2f}", f"{mean_batch:.1f}", f"{cpu:.2f}"])
    load_after = os.getloadavg()
    print(f"embedded model, {width}x{height} px, {args.requests} requests per row, ONNX Runtime, {os.cpu_count()} CPUs; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print_table(rows, ["", "concurrency", "images/s", "p50 s", "p95 s", "mean batch", "CPU s/image"])
    print("\nper image, ms (in-process; a run's sampling and decoding divided by its images)")
    print_table(stages, ["", "condition", "sampling", "decode", "PNG encode", "total"])
    off = {r[1]: float(r[2]) for r in rows if r[0] == "serve, batching off"}
    on = {r[1]: float(r[2]) for r in rows if r[0].startswith("serve, batching on")}
    top = str(max(concurrencies))
    print(f"\nbatching at concurrency {top}: {on[top] / off[top]:.2f}x the images/s of batching off")


if __name__ == "__main__":
    main()
