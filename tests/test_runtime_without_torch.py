"""The runtime (taming_deploy, engines) works on a box without torch, onnx or the training code."""
from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import taming_deploy
from taming_deploy import engines

BLOCK = "import sys\nfor name in ('torch', 'onnx', 'safetensors', 'yaml', 'taming_deploy.training', 'taming_deploy.export'):\n    sys.modules[name] = None\n"
NEEDS_TORCH = {"taming_deploy.backends.torch_backend"}
NEEDS_RAY = {"taming_deploy.serving"}  # the serve extra (Ray imports PyYAML)
BUILD_TIME = ("taming_deploy.training", "taming_deploy.export")


def runtime_modules() -> list[str]:
    """Every module of the runtime, whether the install maps engines/ under taming_deploy (editable) or
    copies it there (a wheel, where walking taming_deploy also meets the training and export code)."""
    names = set()
    for package in (taming_deploy, engines):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name not in NEEDS_TORCH | NEEDS_RAY and not info.name.startswith(BUILD_TIME):
                names.add(info.name)
    return sorted(names)


def test_every_runtime_module_imports_without_torch():
    modules = runtime_modules()
    assert "taming_deploy.pipeline" in modules and "taming_deploy.engines.runtime" in modules
    code = BLOCK + "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def run_cli_without_torch(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """`taming-deploy ARGS` in a fresh interpreter where importing torch and the training code fails."""
    code = BLOCK + f"from taming_deploy.cli import main\nsys.argv = {['taming-deploy', *args]!r}\nmain()\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_generate_from_a_bundle_without_torch(fixture_bundle, label_png, tmp_path):
    proc = run_cli_without_torch("generate", "--model", str(fixture_bundle), "--cond", str(label_png), "--greedy",
                                 "--out", str(tmp_path / "out.png"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.png").is_file()


def test_torch_backend_without_torch_says_what_to_install(tiny_checkpoint, tmp_path):
    proc = run_cli_without_torch("generate", "--model", str(tiny_checkpoint), "--backend", "torch",
                                 "--out", str(tmp_path / "o.png"), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "pip install 'taming-deploy[train]'" in proc.stderr
