"""TensorRT engines from int8-weight graphs (the embedded model): the DequantizeLinear folding, checked
with ONNX Runtime, and `build` up to the parser input with the stand-ins of test_engines_fake.py."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from helpers import assert_one_line_error, run_cli
from taming_deploy.bundle import GRAPH_NAMES, Bundle
from taming_deploy.engines import build_engines, deps
from taming_deploy.engines.dequantize import fold_weight_dequantization
from taming_deploy.engines.engine_manifest import engines_dir, read_engine_manifest
from taming_deploy.info import describe
from taming_deploy.model_paths import DEFAULT_MODEL
from tensorrt_api import Restricted
from test_engines_fake import FakeCudart, FakeTensorRT


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], fuse: bool = True) -> list[np.ndarray]:
    """ONNX Runtime's outputs; ``fuse=False`` turns its graph optimisations off, so DequantizeLinear runs as
    the ONNX operator instead of inside the fused int8 MatMul kernel (MatMulNBits), whose numbers differ."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not fuse:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_folding_computes_dequantize_linear_by_hand():
    """Per-axis scale with a zero point (axis 0) and a per-tensor scale, against (q - zp) * s worked out here."""
    q = np.array([[-127, 0, 5], [10, 20, 127]], np.int8)
    scale = np.array([0.5, 2.0], np.float32)
    zero_point = np.array([1, -2], np.int8)
    nodes = [
        helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["w"], axis=0),
        helper.make_node("DequantizeLinear", ["q", "one_scale"], ["v"]),
        helper.make_node("Add", ["w", "v"], ["sum"]),
        helper.make_node("MatMul", ["x", "sum"], ["y"]),
    ]
    inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "scale"),
             numpy_helper.from_array(zero_point, "zp"), numpy_helper.from_array(np.array(0.25, np.float32), "one_scale")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    folded, count = fold_weight_dequantization(model)
    assert count == 2 and [n.op_type for n in folded.graph.node] == ["Add", "MatMul"]
    values = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    assert set(values) == {"w", "v"}  # the int8 values, scales and zero points are gone
    np.testing.assert_array_equal(values["w"], [[-64.0, -0.5, 2.0], [24.0, 44.0, 258.0]])
    np.testing.assert_array_equal(values["v"], [[-31.75, 0.0, 1.25], [2.5, 5.0, 31.75]])
    x = np.array([[1.0, -1.0]], np.float32)
    np.testing.assert_allclose(run(folded, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-6)


def embedded_feeds(name: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    spec = Bundle(DEFAULT_MODEL).spec
    if name == "encoder":
        return {"image": rng.uniform(-1, 1, (1, 3, 64, 96)).astype(np.float32)}
    if name == "decoder":
        return {"indices": rng.integers(0, spec.image_codebook_size, (1, 6, 8))}
    if name == "cond_encoder":
        return {"labels": np.asarray(Image.open(DEFAULT_MODEL.parents[1] / "examples" / "landscape_01.png")).astype(np.int64)[None]}
    past = np.zeros((1, spec.n_head, spec.block_size, spec.head_dim), np.float32)
    feeds = {"tokens": rng.integers(0, spec.vocab_size, (1, 40)), "position": np.array(0, np.int64)}
    feeds.update({f"past_{kind}_{i}": past for kind in ("key", "value") for i in range(spec.n_layer)})
    return feeds


@pytest.mark.parametrize("name", ["encoder", "decoder", "cond_encoder", "transformer"])
def test_the_embedded_models_folded_graphs_compute_what_its_int8_graphs_compute(name):
    bundle = Bundle(DEFAULT_MODEL)
    model = onnx.load(str(bundle.graph_path(name)))
    dequantize_nodes = sum(n.op_type == "DequantizeLinear" for n in model.graph.node)
    folded, count = fold_weight_dequantization(model)
    assert count == dequantize_nodes > 0
    assert not any(n.op_type == "DequantizeLinear" for n in folded.graph.node)
    assert {i.data_type for i in folded.graph.initializer} <= {TensorProto.FLOAT, TensorProto.INT64}
    onnx.checker.check_model(folded)
    feeds = embedded_feeds(name, np.random.default_rng(0))
    for got, want in zip(run(folded, feeds), run(model, feeds, fuse=False)):
        if want.dtype.kind == "f":  # fp32 rounding: measured 4e-6 on transformer logits of magnitude 5.5
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
        else:  # codebook indices: an argmin over distances that agree to fp32 rounding
            assert (got == want).mean() >= 0.99


@pytest.fixture
def fake_trt_capturing_parser_input(monkeypatch, tmp_path):
    """The stand-in TensorRT, whose parser keeps the ONNX model it was given; the user cache in tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cudart = FakeCudart()
    bundle = Bundle(DEFAULT_MODEL)
    trt = FakeTensorRT(cudart, {bundle.graph(name).file: bundle.graph(name) for name in GRAPH_NAMES})
    trt.parsed = {}
    parse = trt.OnnxParser.parse_from_file

    def parse_and_keep(self, path):
        trt.parsed[str(path).rsplit("/", 1)[-1]] = onnx.load(str(path))
        return parse(self, path)

    monkeypatch.setattr(trt.OnnxParser, "parse_from_file", parse_and_keep)
    monkeypatch.setattr(deps, "tensorrt", lambda: Restricted(trt, "", set()))  # only what the real TensorRT has
    monkeypatch.setattr(deps, "cudart", lambda: cudart)
    return trt


def test_build_on_the_embedded_model_parses_fp32_weights_and_writes_to_the_user_cache(fake_trt_capturing_parser_input, tmp_path):
    trt = fake_trt_capturing_parser_input
    log: list[str] = []
    target = build_engines(DEFAULT_MODEL, max_size=(256, 128), max_batch=1, log=log.append)
    assert target.parent == tmp_path / "cache" / "taming-deploy" / "engines" and len(target.name) == 16
    assert target == engines_dir(DEFAULT_MODEL) and not (DEFAULT_MODEL / "engines").exists()  # site-packages untouched
    assert "precision fp32: the bundle has no fp16 graphs" in log
    bundle = Bundle(DEFAULT_MODEL)
    assert set(trt.parsed) == {"encoder.onnx", "decoder.onnx", "cond_encoder.onnx", "transformer.onnx"}
    for file, model in trt.parsed.items():
        assert not any(n.op_type == "DequantizeLinear" for n in model.graph.node), file
        assert not any(i.data_type == TensorProto.INT8 for i in model.graph.initializer), file
        original = onnx.load(str(DEFAULT_MODEL / file))
        assert [i.name for i in model.graph.input] == [i.name for i in original.graph.input]
        assert [o.name for o in model.graph.output] == [o.name for o in original.graph.output]
    assert f"engines:      TensorRT 10.9.0.34 for Fake GPU in {target}" in describe(None)
    manifest = read_engine_manifest(DEFAULT_MODEL)  # what the runtime reads: found in the cache
    assert manifest.precision == "fp32"
    for name, entry in manifest.engines.items():  # tied to the shipped graphs, so a new version rebuilds
        assert (entry.source_file, entry.source_sha256) == (bundle.graph(name).file, bundle.graph(name).sha256)


def test_the_trt_hint_for_the_embedded_model_names_build_and_a_writable_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    proc = run_cli("generate", "--backend", "trt", "--cond", str(DEFAULT_MODEL.parents[1] / "examples" / "landscape_01.png"),
                   "--out", str(tmp_path / "out.png"))
    assert_one_line_error(proc, f"no TensorRT engines in {tmp_path / 'cache' / 'taming-deploy' / 'engines'}",
                          "`taming-deploy build`")
    assert str(DEFAULT_MODEL) not in proc.stderr
    proc = run_cli("build")  # the command the hint names: here it stops at the missing TensorRT, not at its arguments
    assert_one_line_error(proc, "TensorRT is not installed")
