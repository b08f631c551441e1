"""The checks for a machine with an NVIDIA GPU, in one run (under 10 minutes), results in one JSON file.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--skip-tensorrt]

Without TensorRT (cuda-python, and torch with CUDA for the last one):
  - buffers: device allocation, host <-> device round trips, cudaMemsetAsync, a CUDA graph replay;
  - kv_scatter: the runtime's strided new_kv -> cache copy (engines.buffers.scatter_new_kv and
    engines.cuda.copy_2d_on_device) on the device, against the same assignment in numpy, for fp32
    and fp16 caches and several (tokens, position) pairs;
  - torch_decode: the torch backend on CUDA (the reference fixture's checkpoint): the median decode
    step (T = 1) against its memory-bandwidth bound (engines.roofline).
Where TensorRT imports: ``pytest -m gpu`` and benchmarks/gpu_benchmark.py on the embedded model
(engines built into a temporary copy). Every check records "passed", "failed" (with the why) or
"skipped" (with the why). Without a usable GPU it writes the file with the reason and stops with one
line (exit code 2). Exit code 1 when a check failed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEADLINE_SECONDS = 540  # the whole run stays under 10 minutes


def check_buffers() -> dict[str, Any]:
    from taming_deploy.engines import cuda

    stream, rng = cuda.Stream(), np.random.default_rng(0)
    data = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    buffer, back = cuda.DeviceBuffer(data.nbytes), np.empty_like(data)
    cuda.copy_to_device(buffer, data, stream)
    cuda.copy_to_host(back, buffer, stream)
    stream.synchronize()
    assert np.array_equal(back, data), "host -> device -> host changed the bytes"
    cuda.fill_zero(buffer, stream)
    cuda.copy_to_host(back, buffer, stream)
    stream.synchronize()
    assert not back.any(), "cudaMemsetAsync left non-zero bytes"
    # a captured 2-D copy replays onto the buffer's current contents
    source = cuda.DeviceBuffer(4096)
    graph = cuda.CudaGraph(stream, lambda: cuda.copy_2d_on_device(buffer, 0, 4096, source, 4096, 4096, 1, stream))
    for value in (3, 7):
        cuda.copy_to_device(source, np.full(4096, value, np.uint8), stream)
        graph.launch()
        cuda.copy_to_host(back, buffer, stream)
        stream.synchronize()
        assert (back[:4096] == value).all() and not back[4096:].any(), f"graph replay {value}"
    return {"bytes": int(data.nbytes), "graph_replays": 2}


def check_kv_scatter() -> dict[str, Any]:
    from taming_deploy.engines import cuda
    from taming_deploy.engines.buffers import scatter_new_kv
    from taming_deploy.spec import ConditionSpec, ModelSpec

    spec = ModelSpec(downsample_factor=8, image_codebook_size=64, vocab_size=64, block_size=64, n_layer=3, n_head=4,
                     n_embd=64, condition=ConditionSpec("unconditional", sos_token=0), window=(4, 4))
    stream, rng, cases = cuda.Stream(), np.random.default_rng(1), 0
    for dtype in (np.float32, np.float16):
        for batch, tokens, position in [(1, 1, 0), (2, 1, 37), (2, 5, 10), (3, 64, 0), (1, 1, 63), (2, 17, 47)]:
            cache = rng.standard_normal(spec.cache_shape(batch)).astype(dtype)
            new_kv = rng.standard_normal((spec.n_layer, 2, batch, spec.n_head, tokens, spec.head_dim)).astype(dtype)
            device_cache, device_new = cuda.DeviceBuffer(cache.nbytes), cuda.DeviceBuffer(new_kv.nbytes)
            cuda.copy_to_device(device_cache, cache, stream)
            cuda.copy_to_device(device_new, new_kv, stream)
            copy = scatter_new_kv(spec, batch, tokens, position, dtype)
            cuda.copy_2d_on_device(device_cache, copy.dst_offset, copy.dst_pitch, device_new, copy.src_pitch,
                                   copy.width, copy.height, stream)
            result = np.empty_like(cache)
            cuda.copy_to_host(result, device_cache, stream)
            stream.synchronize()
            expected = cache.copy()
            expected[:, :, :, :, position : position + tokens] = new_kv
            assert np.array_equal(result, expected), f"{np.dtype(dtype).name} batch {batch} T={tokens} at {position}"
            cases += 1
    return {"cases": cases}


def check_torch_decode(repeat: int = 200) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"skipped": "torch is not installed (pip install 'taming-deploy[train]' with a CUDA build of torch)"}
    if not torch.cuda.is_available():
        return {"skipped": f"torch {torch.__version__} has no CUDA device (a CPU build, or no driver)"}
    from taming_deploy.backends.torch_backend import TorchBackend
    from taming_deploy.engines import cuda
    from taming_deploy.engines.roofline import decode_step_bound, peak_bandwidth
    from taming_deploy.training.import_taming import import_taming

    reference = REPO / "tests" / "data" / "segcond_small"
    with tempfile.TemporaryDirectory() as tmp:
        import_taming(reference / "last.ckpt", reference / "project.yaml", Path(tmp) / "checkpoint")
        backend = TorchBackend.load(Path(tmp) / "checkpoint", device="cuda")
    spec, batch, rng = backend.spec, 1, np.random.default_rng(2)
    cache = backend.new_cache(batch)
    prefill = rng.integers(0, spec.vocab_size, (batch, 8))
    backend.transformer_step(prefill, 0, cache)
    token = rng.integers(0, spec.vocab_size, (batch, 1))
    times = []
    for step in range(repeat):
        started = time.perf_counter()
        backend.transformer_step(token, 8 + step % (spec.block_size - 8), cache)  # returns host logits: synchronised
        times.append(time.perf_counter() - started)
    measured = statistics.median(times[10:])
    gpu = cuda.device_info()
    bound = decode_step_bound(spec, batch, np.float32, np.float32, peak_bandwidth(gpu.memory_clock_khz, gpu.memory_bus_bits))
    # a small model: launch overheads, not DRAM traffic, are expected to set the time
    return {"gpu": gpu.name, "torch": torch.__version__, "decode_step_ms": measured * 1e3, "bound_ms": bound.seconds * 1e3,
            "fraction_of_bound": bound.seconds / measured, "bound_bytes": bound.total_bytes}


def run_command(command: list[str], timeout: float) -> dict[str, Any]:
    started = time.monotonic()
    try:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {timeout:.0f} s", "command": command}
    outcome = {"command": command, "returncode": proc.returncode, "seconds": round(time.monotonic() - started, 1),
               "stdout_tail": proc.stdout[-4000:], "stderr_tail": proc.stderr[-2000:]}
    if proc.returncode != 0:
        outcome["failed"] = f"exit code {proc.returncode}"
    return outcome


def tensorrt_checks(remaining: Callable[[], float]) -> dict[str, Any]:
    try:
        from taming_deploy.engines import deps

        version = deps.tensorrt().__version__
    except Exception as exc:  # UserError (not installed, too old) or a library that cannot load
        reason = f"TensorRT is not usable here: {exc}"
        return {"pytest_gpu": {"skipped": reason}, "gpu_benchmark": {"skipped": reason}}
    results: dict[str, Any] = {"tensorrt": version}
    results["pytest_gpu"] = run_command([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"], remaining() * 0.6)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        shutil.copytree(REPO / "taming_deploy" / "default_model", bundle)
        build = run_command([sys.executable, "-m", "taming_deploy.cli", "build", str(bundle), "--max-size", "512x256",
                             "--max-batch", "2"], remaining() * 0.6)
        results["build_default_model"] = build
        if "failed" in build:
            results["gpu_benchmark"] = {"skipped": "the engines of the embedded model did not build"}
        else:
            results["gpu_benchmark"] = run_command([sys.executable, str(REPO / "benchmarks" / "gpu_benchmark.py"), str(bundle),
                                                    "--cuda-graph", "--repeat", "30"], remaining())
    return results


def guarded(check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A check's results with "passed", or "failed" with the assertion or error and its traceback."""
    started = time.monotonic()
    try:
        result = check()
    except Exception as exc:
        return {"failed": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    if "skipped" not in result:
        result["passed"] = True
    result["seconds"] = round(time.monotonic() - started, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--skip-tensorrt", action="store_true", help="leave out pytest -m gpu and the engine benchmark")
    args = parser.parse_args(argv)
    started = time.monotonic()
    remaining = lambda: DEADLINE_SECONDS - (time.monotonic() - started)  # noqa: E731

    from taming_deploy.engines import cuda
    from taming_deploy.system_info import system_json

    results: dict[str, Any] = {"system": system_json()}
    try:
        cuda.device_info()
    except Exception as exc:  # CudaError (no device, no driver) or UserError (no cuda-python)
        results["no_gpu"] = str(exc)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"error: gpu_check needs an NVIDIA GPU and cuda-python: {exc} (wrote {args.out})", file=sys.stderr)
        return 2
    results["buffers"] = guarded(check_buffers)
    results["kv_scatter"] = guarded(check_kv_scatter)
    results["torch_decode"] = guarded(check_torch_decode)
    if args.skip_tensorrt:
        results["tensorrt"] = {"skipped": "--skip-tensorrt"}
    else:
        results["tensorrt"] = tensorrt_checks(remaining)
    results["seconds"] = round(time.monotonic() - started, 1)
    args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    failed = [name for name, value in results.items() if isinstance(value, dict) and _failed(value)]
    for name in ("buffers", "kv_scatter", "torch_decode"):
        print(f"{name:14s} {_status(results[name])}")
    print(f"tensorrt       {json.dumps({k: _status(v) if isinstance(v, dict) else v for k, v in results['tensorrt'].items()})}")
    print(f"wrote {args.out} in {results['seconds']} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _failed(value: dict[str, Any]) -> bool:
    return "failed" in value or any(isinstance(v, dict) and "failed" in v for v in value.values())


def _status(value: dict[str, Any]) -> str:
    if "failed" in value:
        return f"failed: {value['failed']}"
    if "skipped" in value:
        return f"skipped: {value['skipped']}"
    return "passed"


if __name__ == "__main__":
    sys.exit(main())
