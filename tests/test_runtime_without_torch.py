"""The runtime (taming_deploy, engines) works on a box without torch, onnx or the training code."""
from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import engines
import taming_deploy

BLOCK = "import sys\nfor name in ('torch', 'onnx', 'safetensors', 'yaml', 'training', 'export'):\n    sys.modules[name] = None\n"
NEEDS_TORCH = {"taming_deploy.backends.torch_backend"}


def runtime_modules() -> list[str]:
    names = []
    for package in (taming_deploy, engines):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name not in NEEDS_TORCH:
                names.append(info.name)
    return names


def test_every_runtime_module_imports_without_torch():
    modules = runtime_modules()
    assert "taming_deploy.pipeline" in modules and "engines.runtime" in modules
    code = BLOCK + "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_generate_from_a_bundle_without_torch(fixture_bundle, label_png, tmp_path):
    code = BLOCK + (
        "from taming_deploy.cli import main\n"
        f"sys.argv = ['taming-deploy', 'generate', '--model', {str(fixture_bundle)!r}, '--cond', {str(label_png)!r},"
        f" '--greedy', '--out', {str(tmp_path / 'out.png')!r}]\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.png").is_file()


def test_torch_backend_without_torch_says_what_to_install(tiny_checkpoint, tmp_path):
    code = BLOCK + (
        "from taming_deploy.cli import main\n"
        f"sys.argv = ['taming-deploy', 'generate', '--model', {str(tiny_checkpoint)!r}, '--backend', 'torch',"
        f" '--out', {str(tmp_path / 'o.png')!r}]\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "pip install 'taming-deploy[train]'" in proc.stderr
