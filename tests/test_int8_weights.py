"""int8 weight storage (export --int8-weights): which weights convert, their per-channel scales, the
rounding bound, that the graph still computes nearly the same, and the export/build around it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from taming_deploy.engines.build import build_engines
from taming_deploy.export.exporter import export_bundle
from taming_deploy.export.int8_weights import int8_weight_storage
from taming_deploy.errors import UserError
from taming_deploy.info import describe_bundle
from taming_deploy.pipeline import Pipeline

RNG = np.random.default_rng(0)
WEIGHTS = {  # name -> (array, the output-channel axis the conversion must use, or None: stays float)
    "matmul_w": (RNG.normal(size=(16, 300)).astype(np.float32), 1),
    "gemm_w": (RNG.normal(size=(300, 16)).astype(np.float32), 0),  # transB=1: rows are outputs
    "conv_w": (RNG.normal(size=(70, 1, 8, 8)).astype(np.float32), 0),
    "embedding": (RNG.normal(size=(100, 64)).astype(np.float32), 0),
    "codebook": (RNG.normal(size=(100, 64)).astype(np.float32), None),  # also read by Pow: not a weight only
    "small_w": (RNG.normal(size=(16, 16)).astype(np.float32), None),  # below the size limit
    "bias": (RNG.normal(size=(300,)).astype(np.float32), None),
}
# per-channel magnitudes that differ by 1000x: one scale for the whole tensor would round the small channels away
WEIGHTS["matmul_w"][0][:, :150] *= 1e-3


def weights_graph() -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "matmul_w"], ["mm"]),
        helper.make_node("Add", ["mm", "bias"], ["matmul_out"]),
        helper.make_node("Gemm", ["x", "gemm_w"], ["gemm_out"], transB=1),
        helper.make_node("Conv", ["image", "conv_w"], ["conv_out"]),
        helper.make_node("Gather", ["embedding", "ids"], ["embedding_out"]),
        helper.make_node("Gather", ["codebook", "ids"], ["code_rows"]),
        helper.make_node("Pow", ["codebook", "two"], ["codebook_sq"]),
        helper.make_node("MatMul", ["x", "small_w"], ["small_out"]),
    ]
    initializers = [numpy_helper.from_array(array, name) for name, (array, _) in WEIGHTS.items()]
    initializers.append(numpy_helper.from_array(np.array(2.0, np.float32), "two"))
    graph = helper.make_graph(
        nodes,
        "weights",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16]),
            helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 12, 12]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [5]),
        ],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
            for name, shape in (("matmul_out", [2, 300]), ("gemm_out", [2, 300]), ("conv_out", [1, 70, 5, 5]), ("embedding_out", [5, 64]),
                                ("code_rows", [5, 64]), ("codebook_sq", [100, 64]), ("small_out", [2, 16]))
        ],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_large_weights_become_int8_with_one_scale_per_output_channel_within_half_a_step():
    stored = int8_weight_storage(weights_graph())
    onnx.checker.check_model(stored, full_check=True)
    initializers = {init.name: numpy_helper.to_array(init) for init in stored.graph.initializer}
    dequantize = {node.output[0]: node for node in stored.graph.node if node.op_type == "DequantizeLinear"}
    expected_converted = {name for name, (_, axis) in WEIGHTS.items() if axis is not None}
    assert len(dequantize) == len(expected_converted) and set(dequantize) == expected_converted
    for name, (weight, axis) in WEIGHTS.items():
        if axis is None:
            np.testing.assert_array_equal(initializers[name], weight)
            continue
        node = dequantize[name]
        values, scale = initializers[node.input[0]], initializers[node.input[1]]
        assert name not in initializers and values.dtype == np.int8
        assert next(a.i for a in node.attribute if a.name == "axis") == axis and scale.shape == (weight.shape[axis],)
        shape = [1] * weight.ndim
        shape[axis] = -1
        error = np.abs(values * scale.reshape(shape) - weight)
        assert np.all(error <= scale.reshape(shape) / 2 * (1 + 1e-5))
        assert np.abs(values).max() == 127  # each channel's largest value uses the whole int8 range


def test_converted_graph_computes_nearly_the_same_even_for_small_channels():
    model = weights_graph()
    feeds = {"x": RNG.normal(size=(2, 16)).astype(np.float32), "image": RNG.normal(size=(1, 1, 12, 12)).astype(np.float32), "ids": np.array([0, 3, 99, 3, 7])}
    expected, got = run(model, feeds), run(int8_weight_storage(model), feeds)
    for name, e, g in zip(("matmul", "gemm", "conv", "embedding", "code_rows", "codebook_sq", "small"), expected, got):
        assert np.abs(g - e).max() <= 0.01 * np.abs(e).max(), name
    small_channels = slice(0, 150)  # 1000x smaller weights: still right to 1% of their own size
    e, g = expected[0][:, small_channels] - WEIGHTS["bias"][0][small_channels], got[0][:, small_channels] - WEIGHTS["bias"][0][small_channels]
    assert np.abs(g - e).max() <= 0.01 * np.abs(e).max()


@pytest.fixture(scope="module")
def int8_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "bundle"
    export_bundle(tiny_checkpoint, out, calibration_count=4, int8_weights=True, echo=lambda line: None)
    return out


def test_export_stores_fp32_graphs_as_int8_validated_and_keeps_fp16_float(int8_bundle: Path):
    manifest = json.loads((int8_bundle / "manifest.json").read_text())
    file_bytes = float32_bytes = 0
    for name, by_precision in manifest["graphs"].items():
        assert by_precision["fp32"]["weight_storage"] == "int8" and by_precision["fp16"]["weight_storage"] == "float"
        path = int8_bundle / by_precision["fp32"]["file"]
        graph = onnx.load(str(path)).graph
        assert "DequantizeLinear" in [node.op_type for node in graph.node], name
        file_bytes += path.stat().st_size
        float32_bytes += 4 * sum(int(np.prod(init.dims)) for init in graph.initializer)  # every stored value as fp32
    assert file_bytes < 0.5 * float32_bytes
    rows = [c for c in manifest["validation"]["checks"] if c["precision"] == "int8 weights"]
    assert {c["graph"] for c in rows} == set(manifest["graphs"]) and all(c["passed"] for c in rows)
    assert any("KL" in c["check"] for c in rows) and not (int8_bundle / "int8_weights").exists()
    described = [line for line in describe_bundle(int8_bundle) if line.startswith("graph ")]
    assert sum("(int8 weights)" in line for line in described) == len(manifest["graphs"]) == sum(" fp16 " in line for line in described)


def test_int8_bundle_generates_and_tensorrt_build_accepts_its_int8_graphs(int8_bundle: Path):
    pipeline = Pipeline.load(int8_bundle, backend="ort")
    labels = np.zeros((16, 16), np.int64)
    labels[8:] = 3
    generation = pipeline.generate(labels, seed=0)
    assert generation.images[0].size == (16, 16) and generation.tokens.shape == (1, 4, 4)
    # the bundle's checks pass; here the build stops only at the missing TensorRT (the folding of its
    # int8 weights for TensorRT is tested in test_engines_int8.py)
    with pytest.raises(UserError, match="TensorRT is not installed"):
        build_engines(int8_bundle, precision="fp32", max_size=(32, 32), max_batch=1)


def test_int8_weights_that_move_the_outputs_fail_the_export_and_write_nothing(tiny_checkpoint: Path, tmp_path: Path, monkeypatch):
    import taming_deploy.export.exporter as exporter

    def off_by_half(model: onnx.ModelProto, base_dir: Path) -> onnx.ModelProto:
        """The real conversion with every scale 1.5x too large: weights 50% off."""
        stored = int8_weight_storage(model, base_dir)
        for init in stored.graph.initializer:
            if init.name.endswith(".scale"):
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
        return stored

    monkeypatch.setattr(exporter, "int8_weight_storage", off_by_half)
    out = tmp_path / "bundle"
    with pytest.raises(UserError, match=r"export failed validation.*int8 weights"):
        export_bundle(tiny_checkpoint, out, calibration_count=4, fp16=False, int8_weights=True, echo=lambda line: None)
    assert not out.exists()
