"""benchmarks/gpu_check.py: its no-GPU exit, and its buffer and KV-scatter checks run end to end on the
in-memory CUDA stand-in of test_engines_fake.py (the real run needs a GPU)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from taming_deploy.engines import buffers, deps
from test_engines import gpu_present
from test_engines_fake import FakeCudart

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


@pytest.mark.skipif(gpu_present(), reason="checks the message on machines without a GPU")
def test_without_a_gpu_it_says_so_in_one_line_and_writes_the_reason(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: gpu_check needs an NVIDIA GPU and cuda-python: ")
    results = json.loads(out.read_text())
    assert results["no_gpu"] and set(results) == {"system", "no_gpu"}
    assert "not_available" in results["system"]["gpu"]


@pytest.fixture
def fake_cuda(monkeypatch):
    cudart = FakeCudart()
    monkeypatch.setattr(deps, "cudart", lambda: cudart)
    yield cudart


def test_a_run_on_the_cuda_stand_in_passes_its_checks(fake_cuda, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # TensorRT absent: its checks are skipped with the reason
    out = tmp_path / "results.json"
    assert gpu_check.main(["--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["buffers"]["passed"] and results["buffers"]["graph_replays"] == 2
    assert results["kv_scatter"]["passed"] and results["kv_scatter"]["cases"] == 12
    assert "skipped" in results["torch_decode"]  # this torch has no CUDA device
    assert results["tensorrt"]["pytest_gpu"]["skipped"].startswith("TensorRT is not usable here")
    # every scatter case went through the device copy, and the graph's copy was issued once, at capture
    assert sum(kind == "2D" for kind, *_ in fake_cuda.copies) == 12 + 1


def test_the_scatter_check_fails_on_a_wrong_copy(fake_cuda, monkeypatch):
    """A scatter one row off (a planted bug in the offset) is caught by the comparison with numpy."""
    right = buffers.scatter_new_kv

    def one_row_late(spec, batch, tokens, position, dtype):
        return right(spec, batch, tokens, min(position + 1, spec.block_size - tokens), dtype)

    monkeypatch.setattr(buffers, "scatter_new_kv", one_row_late)
    result = gpu_check.guarded(gpu_check.check_kv_scatter)
    assert result["failed"] == "AssertionError: float32 batch 1 T=1 at 0"  # the first case, named
