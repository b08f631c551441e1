"""GPU benchmark of a bundle's TensorRT engines.

    python benchmarks/gpu_benchmark.py BUNDLE [--batch 1] [--size 256x256] [--repeat 50] [--images 4] [--cuda-graph]

Prints the median latency of every graph, the cached decode step against its memory-bandwidth
bound (weights + one read of the cache + the new token's keys and values written, per step, over the
GPU's theoretical DRAM bandwidth; the transformer graph returns only the fed tokens' keys and values,
which the runtime scatters into its one cache buffer, so the cache is no longer rewritten), and
end-to-end images/s of greedy sliding-window generation plus decoding. Needs an NVIDIA GPU,
TensorRT, cuda-python and engines built by `taming-deploy build BUNDLE`; without them it stops with
one line saying what is missing (exit code 2).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def median_seconds(fn: Callable[[], object], repeat: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()  # every backend call ends with a stream synchronize, so wall time is GPU time + overhead
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", default=None, help="WxH pixels (default: one sampling window)")
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--images", type=int, default=2, help="generations timed for images/s")
    parser.add_argument("--cuda-graph", action="store_true", help="replay the decode step as a CUDA graph")
    args = parser.parse_args(argv)

    from taming_deploy.errors import UserError
    from taming_deploy.validation import parse_size

    try:
        size = parse_size(args.size)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from taming_deploy.engines import cuda
    from taming_deploy.engines.roofline import decode_step_bound, embedding_weight_count, peak_bandwidth, streamed_weight_count
    from taming_deploy.engines.runtime import load_trt_backend
    from taming_deploy.sampler import sample_tokens
    from taming_deploy.sampling import SamplingOptions, TokenStream

    try:
        gpu = cuda.device_info()
        backend = load_trt_backend(args.bundle, cuda_graph=args.cuda_graph)
    except UserError as exc:
        print(f"error: the GPU benchmark needs an NVIDIA GPU, TensorRT and built engines: {exc}", file=sys.stderr)
        return 2

    spec, b, rng = backend.spec, args.batch, np.random.default_rng(0)
    f = spec.downsample_factor
    width, height = size or (spec.window[1] * f, spec.window[0] * f)
    h, w = height // f, width // f
    cond = spec.condition
    print(f"{gpu.name} (sm_{gpu.compute_capability[0]}{gpu.compute_capability[1]}, {gpu.total_memory / 2**30:.0f} GiB), "
          f"engines {backend.precision}, "
          f"batch {b}, {width}x{height} px, cuda graph {'on' if args.cuda_graph else 'off'}")

    def condition_tokens() -> np.ndarray:
        if cond.kind == "segmentation":
            return backend.condition_tokens(rng.integers(0, cond.n_labels, (b, height, width)))
        if cond.kind in ("depth", "image"):
            channels = 1 if cond.kind == "depth" else 3
            return backend.condition_tokens(rng.uniform(-1, 1, (b, channels, height, width)).astype(np.float32))
        return np.full((b, 1), cond.sos_token if cond.kind == "unconditional" else 0, dtype=np.int64)

    latency: dict[str, float] = {}
    if cond.spatial:
        latency["cond_encoder"] = median_seconds(condition_tokens, args.repeat)
    images = rng.uniform(-1, 1, (b, 3, height, width)).astype(np.float32)
    latency["encoder"] = median_seconds(lambda: backend.encode(images), args.repeat)
    grid = rng.integers(0, spec.image_codebook_size, (b, h, w))
    latency["decoder"] = median_seconds(lambda: backend.decode(grid), args.repeat)
    cache = backend.new_cache(b)
    prefill = rng.integers(0, spec.vocab_size, (b, spec.block_size // 2))
    latency[f"transformer prefill (T={prefill.shape[1]})"] = median_seconds(
        lambda: backend.transformer_step(prefill, 0, cache), args.repeat
    )
    steps = spec.block_size - prefill.shape[1]
    counter = iter(range(10**9))
    token = rng.integers(0, spec.vocab_size, (b, 1))
    decode_step = lambda: backend.transformer_step(token, prefill.shape[1] + next(counter) % steps, cache)  # noqa: E731
    latency["transformer decode step (T=1)"] = median_seconds(decode_step, args.repeat)
    for name, seconds in latency.items():
        print(f"  {name:34s} {seconds * 1e3:9.3f} ms")

    weight_dtype = np.float16 if backend.precision == "fp16" else np.float32
    cache_dtype = cache.dtype  # of the past_* inputs and new_kv: fp16 graphs may keep the cache in fp32
    bound = decode_step_bound(spec, b, weight_dtype, cache_dtype, peak_bandwidth(gpu.memory_clock_khz, gpu.memory_bus_bits))
    measured = latency["transformer decode step (T=1)"]
    print(f"decode step: {measured * 1e3:.3f} ms measured, {bound.seconds * 1e3:.3f} ms bandwidth bound "
          f"({bound.weight_bytes / 1e6:.1f} MB weights of {(streamed_weight_count(spec) + embedding_weight_count(spec)) / 1e6:.2f} M "
          f"parameters + {bound.cache_read_bytes / 1e6:.1f} MB cache read + {bound.new_kv_bytes / 1e3:.1f} kB new keys/values "
          f"written, {np.dtype(cache_dtype).name} cache, at {bound.bandwidth / 1e9:.0f} GB/s): "
          f"{bound.seconds / measured:.0%} of the bound")
    if backend.cuda_graph_error:
        print(f"  cuda graph disabled: {backend.cuda_graph_error}")

    options = SamplingOptions(greedy=True)
    started = time.perf_counter()
    for _ in range(args.images):
        tokens, _ = sample_tokens(backend, condition_tokens(), (h, w), options, TokenStream.for_batch(0, b))
        backend.decode(tokens)
    seconds = time.perf_counter() - started
    print(f"generation: {args.images * b / seconds:.3f} images/s ({args.images} x batch {b}, greedy, {width}x{height} px)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
