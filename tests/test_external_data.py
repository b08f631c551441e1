"""Graphs with ONNX external data (what a model over protobuf's 2 GB limit needs), exercised on a tiny
model with the threshold lowered to 0 bytes: export writes each graph's weights beside it and the
manifest hashes them; ONNX Runtime, `verify` and `build` (TensorRT stand-in) use them; a changed
data file, a data file the manifest does not list and a graph naming a file outside the bundle are refused."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from taming_deploy.backends.ort_backend import OrtBackend
from taming_deploy.bundle import GRAPH_NAMES, Bundle
from taming_deploy.engines import build_engines, deps
from taming_deploy.errors import UserError
from taming_deploy.export.exporter import export_bundle
from taming_deploy.export.graph_files import EXTERNAL_DATA_ENV, save_graph
from taming_deploy.external_data import external_data_locations
from taming_deploy.fileutil import sha256_file
from taming_deploy.pipeline import Pipeline
from taming_deploy.verify import bundle_problems
from tensorrt_api import Restricted
from test_engines_fake import FakeCudart, FakeTensorRT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def external_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny model exported (fp32 + fp16, int8-stored fp32 weights) with every weight as external data."""
    out = tmp_path_factory.mktemp("external") / "bundle"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(EXTERNAL_DATA_ENV, "0")
        export_bundle(tiny_checkpoint, out, calibration_count=2, echo=lambda line: None, int8_weights=True)
    return out


def copied(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


def test_every_graph_keeps_its_weights_in_a_hashed_data_file(external_bundle):
    bundle = Bundle(external_bundle)
    files = sorted(p.name for p in external_bundle.iterdir())
    for name, by_precision in bundle.manifest.graphs.items():
        for precision, entry in by_precision.items():
            data_name = f"{entry.file}.data"
            assert [d.file for d in entry.data] == [data_name], (name, precision)
            assert entry.data[0].sha256 == sha256_file(external_bundle / data_name)
            assert external_data_locations(external_bundle / entry.file) == {data_name}
            # the graph file holds the structure only: the weights are in the data file
            assert (external_bundle / entry.file).stat().st_size < (external_bundle / data_name).stat().st_size
    assert len([f for f in files if f.endswith(".data")]) == sum(len(p) for p in bundle.manifest.graphs.values())
    assert not (external_bundle / "int8_weights").exists()  # the int8 staging folder moved its data files too


def test_onnx_runtime_loads_the_external_weights(external_bundle, label_png):
    """Each graph run from its file (ONNX Runtime reading the data file) computes what the same graph
    with its weights put back inline computes; both precisions sample and the bundle passes `verify`."""
    assert bundle_problems(external_bundle) == []
    bundle = Bundle(external_bundle)
    images = np.random.default_rng(0).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    for precision in ("fp32", "fp16"):
        path = bundle.graph_path("encoder", precision)
        from_file = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        inline = ort.InferenceSession(onnx.load(str(path)).SerializeToString(), providers=["CPUExecutionProvider"])
        np.testing.assert_array_equal(from_file.run(None, {"image": images})[0], inline.run(None, {"image": images})[0])
        tokens = Pipeline(OrtBackend(external_bundle, precision)).generate(label_png, greedy=True).tokens
        assert len(np.unique(tokens)) > 1


def test_a_changed_data_file_is_found_by_verify_and_refused_by_the_runtime(external_bundle, tmp_path):
    bundle_dir = copied(external_bundle, tmp_path)
    data = bundle_dir / "decoder.fp16.onnx.data"
    content = bytearray(data.read_bytes())
    content[len(content) // 2] ^= 0xFF
    data.write_bytes(bytes(content))
    problems = bundle_problems(bundle_dir)
    assert len(problems) == 1 and "decoder.fp16.onnx.data does not match the manifest" in problems[0]
    with pytest.raises(UserError, match="decoder.fp16.onnx.data does not match"):
        Bundle(bundle_dir).graph_path("decoder", "fp16")
    Bundle(bundle_dir).graph_path("decoder", "fp32")  # the other graphs stay usable


def relocated(graph_path: Path, location: str) -> None:
    """Point every external tensor of the graph at ``location`` (the graph file is rewritten)."""
    model = onnx.load(str(graph_path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(graph_path))


def rehash(bundle_dir: Path, graph_file: str, data: list[dict] | None) -> None:
    """Make the manifest agree with a rewritten graph, as a hostile bundle's author would."""
    manifest_path = bundle_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for by_precision in manifest["graphs"].values():
        for entry in by_precision.values():
            if entry["file"] == graph_file:
                entry["sha256"] = sha256_file(bundle_dir / graph_file)
                if data is None:
                    entry.pop("data")
                else:
                    entry["data"] = data
    manifest_path.write_text(json.dumps(manifest))


def test_a_graph_naming_a_file_outside_the_bundle_as_its_data_is_refused(external_bundle, label_png, tmp_path):
    bundle_dir = copied(external_bundle, tmp_path)
    relocated(bundle_dir / "decoder.onnx", "../../etc/passwd")
    rehash(bundle_dir, "decoder.onnx", None)
    with pytest.raises(UserError, match=r"decoder.onnx: external data location: the file name '../../etc/passwd' is not a plain relative path"):
        Bundle(bundle_dir).graph_path("decoder")
    problems = bundle_problems(bundle_dir)
    assert len(problems) == 1 and "../../etc/passwd" in problems[0]
    with pytest.raises(UserError, match="etc/passwd"):
        Pipeline.load(bundle_dir, backend="ort").generate(label_png, greedy=True)


def test_a_data_file_the_manifest_does_not_list_is_refused(external_bundle, tmp_path):
    """The graph names a file inside the bundle (the fp16 decoder's data), which is not its own listed data."""
    bundle_dir = copied(external_bundle, tmp_path)
    relocated(bundle_dir / "decoder.onnx", "decoder.fp16.onnx.data")
    rehash(bundle_dir, "decoder.onnx", None)
    with pytest.raises(UserError, match="name the external data file 'decoder.fp16.onnx.data', which the manifest does not list"):
        Bundle(bundle_dir).graph_path("decoder")


def test_a_listed_data_file_that_is_a_symlink_out_of_the_bundle_is_refused(external_bundle, tmp_path):
    bundle_dir = copied(external_bundle, tmp_path)
    outside = tmp_path / "outside.data"
    shutil.move(bundle_dir / "encoder.onnx.data", outside)
    os.symlink(outside, bundle_dir / "encoder.onnx.data")
    with pytest.raises(UserError, match="encoder.onnx.data points outside"):
        Bundle(bundle_dir).graph_path("encoder")


def test_build_parses_from_the_bundle_path_so_the_parser_finds_the_data(external_bundle, tmp_path, monkeypatch):
    """fp16 graphs are parsed where they lie; the int8-stored fp32 graphs are dequantized into a scratch
    copy whose fp32 weights (past the threshold) are external data beside it. The stand-in parser
    loads each file as TensorRT does, resolving the data relative to the path it was given."""
    bundle_dir = copied(external_bundle, tmp_path)
    bundle = Bundle(bundle_dir)
    monkeypatch.setenv(EXTERNAL_DATA_ENV, "0")
    for precision in ("fp16", "fp32"):
        cudart = FakeCudart()
        names = [n for n in GRAPH_NAMES if bundle.has_graph(n, precision)]
        trt = FakeTensorRT(cudart, {bundle.graph(n, precision).file: bundle.graph(n, precision) for n in names})
        parsed: dict[str, tuple[onnx.ModelProto, set[str]]] = {}
        parse = trt.OnnxParser.parse_from_file

        def parse_and_keep(self, path, parse=parse, parsed=parsed):
            parsed[Path(path).name] = (onnx.load(str(path)), external_data_locations(Path(path)))
            return parse(self, path)

        monkeypatch.setattr(trt.OnnxParser, "parse_from_file", parse_and_keep)
        monkeypatch.setattr(deps, "tensorrt", lambda trt=trt: Restricted(trt, "", set()))
        monkeypatch.setattr(deps, "cudart", lambda cudart=cudart: cudart)
        build_engines(bundle_dir, precision=precision, max_size=(64, 64), max_batch=1)
        assert set(parsed) == {bundle.graph(n, precision).file for n in names}
        for file, (model, locations) in parsed.items():
            assert locations == {f"{file}.data"}, (precision, file)
            assert not any(i.data_type == TensorProto.INT8 for i in model.graph.initializer), file
            assert sum(numpy_helper.to_array(i).size for i in model.graph.initializer) > 1000  # the weights were read


def test_the_location_reader_agrees_with_onnx_on_nodes_subgraphs_and_small_tensors(tmp_path):
    """Constant nodes, an If's subgraphs and initializers under the minimum size: the reader finds exactly
    the locations onnx writes."""
    big = numpy_helper.from_array(np.arange(600, dtype=np.float32), "big")
    small = numpy_helper.from_array(np.ones(4, np.float32), "small")
    branch_constant = helper.make_node("Constant", [], ["y"], value=numpy_helper.from_array(np.full(600, 2, np.float32)))
    then_graph = helper.make_graph([branch_constant], "then", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [600])])
    else_graph = helper.make_graph([helper.make_node("Identity", ["big"], ["y"])], "else", [],
                                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [600])])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [600])], initializer=[big, small])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    path = tmp_path / "g.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=1024,
                    convert_attribute=True)
    written = {p.name for p in tmp_path.iterdir() if p.name != "g.onnx"}
    assert external_data_locations(path) == written and len(written) == 2  # "small" (16 bytes) stayed inline
    save_graph(onnx.load(str(path)), tmp_path / "inline.onnx", threshold=1 << 30)  # onnx.save moved model's weights out
    assert external_data_locations(tmp_path / "inline.onnx") == set()


def test_save_graph_streams_weights_between_data_files_and_keeps_them_on_failure(tmp_path):
    """save_graph reads a graph's external tensors a tensor at a time, also when it rewrites the data file
    they come from (the exporter does: its fp32 graph is exported to NAME.onnx.data, then given its final
    layout); large tensors start on 4096-byte boundaries; an external graph without its base_dir is
    refused; a failed write leaves no partial file and the old data as it was; under the threshold the
    graph is written inline and its old data file removed."""
    from onnx.external_data_helper import ExternalDataInfo

    rng = np.random.default_rng(0)
    values = {"mid": rng.standard_normal(300).astype(np.float32),  # 1200 bytes: external, not aligned
              "big": rng.standard_normal((600, 600)).astype(np.float32),  # 1.44 MB: aligned, after mid
              "small": np.ones(3, np.float32)}  # under 1024 bytes: stays inline
    nodes = [helper.make_node("MatMul", ["x", "big"], ["y"]), helper.make_node("Identity", ["mid"], ["m"]),
             helper.make_node("Identity", ["small"], ["s"])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "m", "s")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 600])], outputs,
                              initializer=[numpy_helper.from_array(v, k) for k, v in values.items()])
    path = tmp_path / "g.onnx"
    save_graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path, threshold=0)
    data = tmp_path / "g.onnx.data"

    def written() -> dict[str, np.ndarray]:
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}

    save_graph(onnx.load(str(path), load_external_data=False), path, threshold=0, base_dir=tmp_path)  # onto its own source
    assert written().keys() == values.keys()
    for name, value in written().items():
        np.testing.assert_array_equal(value, values[name], err_msg=name)
    infos = {t.name: t for t in onnx.load(str(path), load_external_data=False).graph.initializer}
    assert ExternalDataInfo(infos["big"]).offset % 4096 == 0 and not infos["small"].external_data
    x = rng.standard_normal((1, 600)).astype(np.float32)
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    np.testing.assert_allclose(y, x @ values["big"], rtol=1e-5, atol=1e-4)

    with pytest.raises(ValueError, match="base_dir"):
        save_graph(onnx.load(str(path), load_external_data=False), tmp_path / "other.onnx")
    assert not (tmp_path / "other.onnx").exists()

    before = sha256_file(data)
    shortened = onnx.load(str(path), load_external_data=False)
    (tmp_path / "short.data").write_bytes(data.read_bytes()[:4096])
    for tensor in shortened.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "short.data"
    with pytest.raises(RuntimeError, match="past the end"):
        save_graph(shortened, path, threshold=0, base_dir=tmp_path)
    assert sha256_file(data) == before and not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]

    save_graph(onnx.load(str(path), load_external_data=False), path, threshold=1 << 30, base_dir=tmp_path)
    assert not data.exists() and external_data_locations(path) == set()
    for name, value in written().items():
        np.testing.assert_array_equal(value, values[name], err_msg=name)
