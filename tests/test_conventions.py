"""What users expect of a command-line tool and a package: --version, info --json and --system,
progress bars on stderr, py.typed and the license."""
from __future__ import annotations

import json
import sys
import tomllib
import types
from importlib.metadata import version
from pathlib import Path

import onnxruntime

from helpers import assert_one_line_error, run_cli
from taming_deploy import system_info
from taming_deploy.engines import deps
from taming_deploy.progress import progress_bar
from test_engines_fake import FakeCudart

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "taming_deploy" / "default_model"


def test_version_is_the_installed_distribution_version():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout == f"taming-deploy {version('taming-deploy')}\n"


def test_info_json_is_the_bundle_manifest_with_file_sizes():
    proc = run_cli("info", str(DEFAULT_MODEL), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    manifest = json.loads((DEFAULT_MODEL / "manifest.json").read_text())
    assert data["kind"] == "bundle" and data["engines"] is None
    assert data["manifest"]["model"] == manifest["model"]
    assert data["manifest"]["graphs"] == manifest["graphs"]
    files = {entry["file"] for by_precision in manifest["graphs"].values() for entry in by_precision.values()}
    assert data["file_bytes"] == {f: (DEFAULT_MODEL / f).stat().st_size for f in files}
    text = run_cli("info", str(DEFAULT_MODEL)).stdout  # the text form names the same graphs
    assert sum(line.startswith("graph ") for line in text.splitlines()) == len(files)


def test_info_json_of_a_checkpoint(tiny_checkpoint):
    proc = run_cli("info", str(tiny_checkpoint), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["kind"] == "checkpoint"
    assert data["config"] == json.loads((tiny_checkpoint / "config.json").read_text())
    from taming_deploy.training.checkpoint import load_model

    model = load_model(tiny_checkpoint)
    assert sum(data["parameters"].values()) == sum(p.numel() for p in model.parameters())


def test_info_system_says_what_is_missing_and_why():
    proc = run_cli("info", "--system", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["onnxruntime"] == onnxruntime.__version__
    assert data["onnxruntime_providers"] == onnxruntime.get_available_providers()
    for key in ("tensorrt", "cuda_driver", "cuda_runtime", "gpu", "compute_capability"):
        value = data[key]
        assert isinstance(value, str) or value["not_available"], key  # a value, or a reason
    text = run_cli("info", "--system").stdout.splitlines()
    assert [line.split(":")[0] for line in text] == [item.label for item in system_info.system_items()]
    assert_one_line_error(run_cli("info", "--system", str(DEFAULT_MODEL)), "takes no PATH")


def test_info_system_on_a_gpu_machine(monkeypatch):
    cudart = FakeCudart()  # driver 12.4, runtime 12.8, an sm_86 "Fake GPU"
    monkeypatch.setattr(deps, "cudart", lambda: cudart)
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.16.1.11"))
    data = system_info.system_json()
    assert (data["tensorrt"], data["cuda_driver"], data["cuda_runtime"]) == ("10.16.1.11", "12.4", "12.8")
    assert (data["gpu"], data["compute_capability"]) == ("Fake GPU", "8.6")
    monkeypatch.setattr(cudart, "cudaDriverGetVersion", lambda: (0, 0))  # the runtime's answer without a driver
    assert system_info.system_json()["cuda_driver"] == {"not_available": "no NVIDIA driver is installed"}


def test_progress_bars_draw_on_stderr_only(capsys):
    with progress_bar("sampling", "tok", enabled=True) as update:
        for done in range(1, 4):
            update(done, 3)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "sampling" in captured.err and "3/3" in captured.err


def test_the_package_is_typed_and_mit_licensed():
    assert (ROOT / "taming_deploy" / "py.typed").is_file()
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")


def test_exporter_metadata_is_stripped_everywhere_and_ours_is_kept():
    import onnx
    from onnx import TensorProto, helper

    from taming_deploy.export.onnx_export import strip_exporter_metadata

    def tagged(entry, *keys):
        for key in keys:
            entry.metadata_props.add(key=key, value="x" * 100)
        return entry

    exporter = ("pkg.torch.onnx.stack_trace", "pkg.onnxscript.optimizer.folded_from", "namespace")
    inner = helper.make_graph([tagged(helper.make_node("Constant", [], ["b"], value_floats=[1.0]), *exporter)], "inner",
                              [], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
    node = tagged(helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=inner), *exporter, "ours")
    value = tagged(helper.make_tensor_value_info("c", TensorProto.BOOL, []), "pkg.torch.onnx.original_node_name")
    graph = tagged(helper.make_graph([node], "g", [value], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]),
                   "pkg.torch.export.ExportedProgram.graph_signature")
    model = helper.make_model(graph)
    before = model.ByteSize()
    strip_exporter_metadata(model)
    assert [p.key for p in model.graph.node[0].metadata_props] == ["ours"]
    assert not model.graph.input[0].metadata_props and not model.graph.metadata_props
    assert not model.graph.node[0].attribute[0].g.node[0].metadata_props  # inside the subgraph too
    assert before - model.ByteSize() > 8 * 100
    onnx.checker.check_model(model)


def test_info_names_a_missing_graph_file(tmp_path):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(DEFAULT_MODEL, bundle)
    (bundle / "encoder.onnx").unlink()
    proc = run_cli("info", str(bundle))
    assert proc.returncode == 0, proc.stderr
    encoder = next(line for line in proc.stdout.splitlines() if line.startswith("graph encoder"))
    assert "missing" in encoder and "nan" not in encoder
    assert "encoder.onnx" not in json.loads(run_cli("info", str(bundle), "--json").stdout)["file_bytes"]
