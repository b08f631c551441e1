"""kill -9 during export and generate (training: tests/test_training.py's SIGKILL test): the output is the
old one or the new one, never half of one, and the next run removes what the killed one left."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from helpers import assert_one_line_error, run_cli
from taming_deploy.bundle import Bundle

CLI = [sys.executable, "-m", "taming_deploy.cli"]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((".tmp-", ".old-")) or p.name.endswith(".lock"))


def kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the command ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_a_second_export_is_refused_while_one_runs_and_a_killed_one_is_cleaned_up(tiny_checkpoint, tmp_path):
    """Two real processes on one --out: the first is frozen (SIGSTOP) halfway, holding its lock and half a
    bundle; the second is refused in one line and writes nothing; the first is then killed (-9), and a
    third export writes the bundle and removes what the killed one left."""
    out = tmp_path / "b"
    export = [*CLI, "export", str(tiny_checkpoint), "--out", str(out), "--no-fp16", "--calibration-count", "1"]
    first = subprocess.Popen(export, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not any(tmp_path.glob(f".tmp-b-{first.pid}-*/*.onnx")) and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first export ended before it could be frozen"
        first.send_signal(signal.SIGSTOP)
        before = sorted(p.name for p in tmp_path.iterdir())
        second = subprocess.run(export, capture_output=True, text=True, timeout=600)
        assert_one_line_error(second, "being written by another taming-deploy process")
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert not out.exists()
    assert any(name.startswith(f".tmp-b-{first.pid}-") for name in leftovers(tmp_path))
    done = subprocess.run(export, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    Bundle(out).verify_all()
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_killed_generate_writes_no_partial_image_and_the_next_run_cleans_up(imported_checkpoint, label_png, tmp_path):
    out = tmp_path / "o.png"
    generate = [*CLI, "generate", "--model", str(imported_checkpoint), "--backend", "torch", "--cond", str(label_png),
                "--size", "256x256", "--out", str(out)]
    proc = subprocess.Popen(generate, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.time()
    kill_when(proc, lambda: time.time() - started > 6 or any(tmp_path.iterdir()))
    assert not out.exists() or Image.open(out).size == (256, 256)  # never half an image
    done = subprocess.run([*generate[:-4], "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    Image.open(out).load()
    assert leftovers(tmp_path) == []


def test_train_with_zero_steps_leaves_nothing(tmp_path):
    config = Path(__file__).resolve().parents[1] / "training" / "configs" / "default_vqgan.yaml"
    proc = run_cli("train", "vqgan", "--config", str(config), "--out", str(tmp_path / "run"), "--steps", "0")
    assert_one_line_error(proc, "train.steps", "0")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sigterm_during_an_export_removes_its_temporary_bundle(tiny_checkpoint, tmp_path):
    """SIGTERM halfway through an export: the command exits 143 through its cleanup, leaving no
    temporary directory, lock or bundle behind."""
    out = tmp_path / "b"
    export = [*CLI, "export", str(tiny_checkpoint), "--out", str(out), "--no-fp16", "--calibration-count", "1"]
    proc = subprocess.Popen(export, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not any(tmp_path.glob(f".tmp-b-{proc.pid}-*/*.onnx")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the export ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert leftovers(tmp_path) == []
    assert not out.exists()
