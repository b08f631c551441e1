"""TensorRT engines on a GPU, checked against ONNX Runtime on the reference fixture's bundle.

Skipped, with the reason, where TensorRT, cuda-python or an NVIDIA GPU is missing (every machine of
the project's CI), and until export.exporter.export_bundle exists.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from taming_deploy.errors import UserError


def missing_gpu_stack() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # ImportError, or OSError when the TensorRT libraries cannot load
        return f"TensorRT is not installed ({exc}); pip install 'taming-deploy[gpu-cu12]' (or [gpu-cu13]) on a GPU machine"
    try:
        from cuda.bindings import runtime
    except ImportError:
        return "cuda-python is not installed; pip install 'taming-deploy[gpu-cu12]' (or [gpu-cu13])"
    status, count = runtime.cudaGetDeviceCount()
    if status != runtime.cudaError_t.cudaSuccess or not count:
        return f"no usable NVIDIA GPU ({status})"
    return None


MISSING = missing_gpu_stack()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]

MAX_SIZE = (128, 128)  # the fixture's label map is 96 x 80 px


@pytest.fixture(scope="module")
def bundle(imported_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    exporter = pytest.importorskip("taming_deploy.export.exporter", reason="taming_deploy.export.exporter.export_bundle is not available yet")
    out = tmp_path_factory.mktemp("trt") / "bundle"
    exporter.export_bundle(imported_checkpoint, out)
    return out


def greedy_tokens(backend, label_png: Path) -> np.ndarray:
    from taming_deploy.pipeline import Pipeline

    return Pipeline(backend).generate(label_png, greedy=True).tokens


def ort_tokens(bundle: Path, label_png: Path) -> np.ndarray:
    from taming_deploy.backends.ort_backend import OrtBackend

    return greedy_tokens(OrtBackend(bundle, "fp32"), label_png)


def test_fp32_engines_reproduce_onnx_runtime(bundle, label_png):
    from taming_deploy.engines import build_engines, load_trt_backend
    from taming_deploy.backends.ort_backend import OrtBackend

    build_engines(bundle, precision="fp32", max_size=MAX_SIZE, max_batch=2)
    trt = load_trt_backend(bundle)
    tokens = greedy_tokens(trt, label_png)
    np.testing.assert_array_equal(tokens, ort_tokens(bundle, label_png))
    np.testing.assert_allclose(trt.decode(tokens), OrtBackend(bundle, "fp32").decode(tokens), atol=2e-3)


def test_fp16_engines_agree_on_99_percent_of_greedy_tokens(bundle, label_png):
    from taming_deploy.engines import build_engines, load_trt_backend

    build_engines(bundle, precision="fp16", max_size=MAX_SIZE, max_batch=2)
    tokens = greedy_tokens(load_trt_backend(bundle), label_png)
    agreement = float(np.mean(tokens == ort_tokens(bundle, label_png)))
    assert agreement >= 0.99, agreement


def test_cuda_graph_decode_gives_the_same_tokens(bundle, label_png):
    from taming_deploy.engines import build_engines, load_trt_backend

    build_engines(bundle, precision="fp32", max_size=MAX_SIZE, max_batch=2)
    graphed = load_trt_backend(bundle, cuda_graph=True)
    tokens = greedy_tokens(graphed, label_png)
    assert graphed.cuda_graph_error is None
    np.testing.assert_array_equal(tokens, greedy_tokens(load_trt_backend(bundle), label_png))


def test_device_cache_matches_onnx_runtime_slot_for_slot(bundle):
    """The engine's new_kv scattered by cudaMemcpy2DAsync leaves the same cache as OrtCache's numpy
    slice assignment, through a prefill and decode steps (replayed from a CUDA graph after the first)."""
    from taming_deploy.engines import build_engines, cuda, load_trt_backend
    from taming_deploy.backends.ort_backend import OrtBackend

    build_engines(bundle, precision="fp32", max_size=MAX_SIZE, max_batch=2)
    trt, ort = load_trt_backend(bundle, cuda_graph=True), OrtBackend(bundle, "fp32")
    spec, rng = trt.spec, np.random.default_rng(0)
    trt_cache, ort_cache = trt.new_cache(2), ort.new_cache(2)
    position = 0
    for count in (spec.block_size // 2, 1, 1, 1, 3, 1):
        tokens = rng.integers(0, spec.vocab_size, (2, count))
        np.testing.assert_allclose(trt.transformer_step(tokens, position, trt_cache),
                                   ort.transformer_step(tokens, position, ort_cache), atol=2e-3)
        position += count
    assert trt.cuda_graph_error is None
    device = np.empty(spec.cache_shape(2), trt_cache.dtype)
    cuda.copy_to_host(device, trt_cache.kv, trt.stream)
    trt.stream.synchronize()
    np.testing.assert_allclose(device, ort_cache.kv, atol=2e-3)
    assert not device[:, :, :, :, position:].any()  # slots not yet fed are still the zeros new_cache wrote


def test_stale_engines_and_out_of_range_requests_are_user_errors(bundle):
    from taming_deploy.engines import build_engines, load_trt_backend

    engines = build_engines(bundle, precision="fp32", max_size=MAX_SIZE, max_batch=2)
    assert (engines / "timing.cache").stat().st_size > 0
    backend = load_trt_backend(bundle)
    with pytest.raises(UserError, match="--max-size / --max-batch"):
        backend.new_cache(3)
    with pytest.raises(UserError, match="--max-size"):
        backend.decode(np.zeros((1, 64, 64), dtype=np.int64))
    manifest_path = engines / "engines.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["gpu"]["name"] = "Some Other GPU"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="Some Other GPU.*taming-deploy build"):
        load_trt_backend(bundle)
