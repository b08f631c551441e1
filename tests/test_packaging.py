"""Installed, the repository's training/, export/ and engines/ folders live under the taming_deploy
namespace: a user's environment gains one top-level package, `taming_deploy`."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pyproject_setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def tree_packages(package_dir: dict[str, str]) -> set[str]:
    """Every folder with an __init__.py under each mapped folder, named as it is installed."""
    names = set()
    for installed, folder in package_dir.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            names.add(".".join([installed, *relative.parts]))
    return names


def test_pyproject_lists_every_package_folder_under_the_namespace():
    setuptools = pyproject_setuptools()
    package_dir = setuptools["package-dir"]
    assert set(package_dir) == {"taming_deploy", "taming_deploy.training", "taming_deploy.export",
                                "taming_deploy.engines"}
    assert set(setuptools["packages"]) == tree_packages(package_dir)


def test_no_generic_top_level_module_is_importable_outside_the_repository(tmp_path: Path):
    """From another folder (so the repository root is not on sys.path), the namespaced names import and
    the generic ones do not."""
    code = ("import importlib.util, taming_deploy.training.models.gpt, taming_deploy.export.exporter, "
            "taming_deploy.engines.runtime\n"
            "print([n for n in ('training', 'export', 'engines') if importlib.util.find_spec(n)])\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.slow
def test_the_wheel_holds_one_top_level_package(tmp_path: Path):
    """What `pip install .` puts in site-packages: the wheel's entries, built from this tree."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                           str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("taming_deploy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"taming_deploy"}
    for expected in ("taming_deploy/engines/runtime.py", "taming_deploy/training/models/gpt.py",
                     "taming_deploy/export/exporter.py", "taming_deploy/default_model/manifest.json",
                     "taming_deploy/training/evaluation/weights/segmenter.safetensors",
                     "taming_deploy/training/configs/default_transformer.yaml", "taming_deploy/py.typed"):
        assert expected in names
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    headers = zipfile.ZipFile(wheel).read(metadata).decode().split("\n\n", 1)[0].splitlines()
    assert "License-Expression: MIT" in headers
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def requirement_names(requirements: list[str]) -> dict[str, str]:
    """['cuda-python>=12.8,<13'] -> {'cuda-python': '>=12.8,<13'}."""
    matches = (re.match(r"([A-Za-z0-9_.-]+)(.*)", r) for r in requirements)
    return {m.group(1).lower(): m.group(2).strip() for m in matches if m}


def test_gpu_extras_match_their_cuda_major_and_leave_onnxruntime_alone():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert "onnxruntime" in requirement_names(project["dependencies"])
    for major in ("12", "13"):
        extra = requirement_names(extras[f"gpu-cu{major}"])
        assert set(extra) == {f"tensorrt-cu{major}", "cuda-python", "onnx"}  # onnx: build folds int8-weight graphs
        assert extra[f"tensorrt-cu{major}"] == ">=10.9"
        assert extra["cuda-python"] == f">={major if major != '12' else '12.8'},<{int(major) + 1}"
    # onnxruntime-gpu owns the onnxruntime module: no extra may install it beside the base onnxruntime
    assert not any("onnxruntime-gpu" in requirement_names(reqs) for reqs in extras.values())


def test_torch_is_pinned_by_the_constraints_file_not_by_the_extras():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name in ("train", "export"):
        assert requirement_names(extras[name])["torch"] == ">=2.13"
    constraints = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert constraints == ["torch==2.13.0"]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = readme.split("# 2. ", 1)[1].splitlines()[1]
    assert "-c constraints.txt" in command
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()
