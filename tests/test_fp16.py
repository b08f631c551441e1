"""Mixed-precision (strongly typed fp16) graphs: typing, I/O contract, what stays fp32, accuracy.

Accuracy is judged two ways: as ONNX Runtime's CPU provider runs the fp16 graph, and with
fp16_storage_emulation (every fp16 tensor rounded where stored), because ORT's CPU provider computes
most fp16 ops in fp32 between inserted Casts and so hides most fp16 rounding and overflow.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from taming_deploy.export.exporter import past_feeds
from taming_deploy.export.fp16 import DEFAULT_THRESHOLD, Fp16IoRangeError, fp16_storage_emulation, to_mixed_precision
from taming_deploy.export.graphs import past_names

FLOAT, FLOAT16, INT64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64
SIZE = 64  # pixels: the fixture's 16 x 16 latent window at f = 4
CALIBRATION_SEEDS = range(4)
EVALUATION_SEEDS = range(6)  # the calibration scenes and two it did not see
PAST = past_names(2)  # the fixture's transformer has two layers


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def runners(mixed: onnx.ModelProto) -> dict[str, ort.InferenceSession]:
    return {"ort": session(mixed), "emulated": session(fp16_storage_emulation(mixed))}


def scenes(seeds) -> tuple[np.ndarray, np.ndarray]:
    from taming_deploy.training.data.synthetic_landscapes import render_scene

    rendered = [render_scene(seed, SIZE, SIZE) for seed in seeds]
    images = np.stack([s.image.astype(np.float32).transpose(2, 0, 1) / 127.5 - 1.0 for s in rendered])
    return images.astype(np.float32), np.stack([s.labels.astype(np.int64) for s in rendered])


def psnr(actual: np.ndarray, expected: np.ndarray) -> float:
    if not np.isfinite(actual).all():
        return float("-inf")
    mse = float(np.mean((np.clip(actual, -1, 1) - np.clip(expected, -1, 1)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def kv_shape(transformer: onnx.ModelProto, slots: int):
    """batch -> the runtime's cache shape (n_layer, 2, batch, heads, slots, head_dim) for this graph
    (whose past slot axis is dynamic: ``slots``, the block size)."""
    past = [i for i in transformer.graph.input if i.name.startswith("past_key_")]
    heads, _, head_dim = (d.dim_value for d in past[0].type.tensor_type.shape.dim[1:])
    return lambda batch: (len(past), 2, batch, heads, slots, head_dim)


# --- the fixture graphs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graphs(reference_model, tmp_path_factory) -> dict[str, onnx.ModelProto]:
    from taming_deploy.export.graphs import graph_defs
    from taming_deploy.export.onnx_export import export_graph

    out = tmp_path_factory.mktemp("fp16_graphs")
    wanted = ("encoder", "decoder", "transformer")
    exported = {g.name: export_graph(g, out / f"{g.name}.onnx") for g in graph_defs(reference_model, (SIZE, SIZE)) if g.name in wanted}
    return {name: onnx.load(str(out / f"{name}.onnx")) for name in exported}  # weights read back inline


@pytest.fixture(scope="module")
def data(graphs, reference_model) -> dict:
    """Calibration feeds (synthetic landscapes, their tokens, teacher-forced token sequences) and
    evaluation inputs."""
    encoder = session(graphs["encoder"])
    calib_images, _ = scenes(CALIBRATION_SEEDS)
    eval_images, eval_labels = scenes(EVALUATION_SEEDS)
    eval_tokens = encoder.run(None, {"image": eval_images})[0]
    calib_tokens = eval_tokens[: len(CALIBRATION_SEEDS)]
    # condition tokens: the fixture's cond stage has its own codebook; the layout is what matters here
    cond_tokens = (eval_labels[:, ::4, ::4] * 4 + eval_tokens % 4) % 32
    sequences = np.concatenate((cond_tokens.reshape(len(eval_tokens), -1), eval_tokens.reshape(len(eval_tokens), -1)), axis=1)[:, :-1]
    transformer = session(graphs["transformer"])
    cache_shape = kv_shape(graphs["transformer"], reference_model.transformer.config.block_size)
    transformer_feeds = []
    for k in range(0, len(CALIBRATION_SEEDS), 2):  # a prefill, then a step on the cache it wrote
        seq = sequences[k : k + 2]
        cache = np.zeros(cache_shape(2), np.float32)
        prefill = {"tokens": seq[:, :400], "position": np.zeros(2, np.int64), **past_feeds(cache)}
        transformer_feeds.append(prefill)
        cache[:, :, :, :, :400] = transformer.run(None, prefill)[1]
        transformer_feeds.append({"tokens": seq[:, 400:401], "position": np.full(2, 400, np.int64), **past_feeds(cache)})
    return {
        "feeds": {
            "encoder": [{"image": calib_images[k : k + 2]} for k in range(0, len(calib_images), 2)],
            "decoder": [{"indices": calib_tokens[k : k + 2]} for k in range(0, len(calib_tokens), 2)],
            "transformer": transformer_feeds,
        },
        "images": eval_images,
        "tokens": eval_tokens,
        "sequences": sequences,
        "cache_shape": cache_shape,
    }


@pytest.fixture(scope="module")
def mixed(graphs, data) -> dict:
    fp16_io = {"transformer": (*PAST, "new_kv")}
    return {name: to_mixed_precision(graphs[name], data["feeds"][name], fp16_io.get(name, ())) for name in graphs}


def test_every_tensor_has_its_type_and_the_graph_checks(mixed):
    for name, (model, _) in mixed.items():
        onnx.checker.check_model(model, full_check=True)
        types = elem_types(model)
        for node in model.graph.node:
            for tensor in [t for t in node.input if t] + [t for t in node.output if t]:
                assert types.get(tensor, 0) != 0, f"{name}: {tensor} ({node.op_type}) has no type"
        kinds = {t for t in types.values()}
        assert FLOAT16 in kinds, f"{name}: nothing was converted to fp16"


def test_every_node_reads_one_float_type(mixed):
    """Strongly typed: apart from Cast and fixed-type slots (Resize scales), a node's float inputs and
    outputs share one precision."""
    for name, (model, _) in mixed.items():
        types = elem_types(model)
        for node in model.graph.node:
            if node.op_type in ("Cast", "Resize", "Shape"):
                continue
            floats = {types[t] for t in list(node.input) + list(node.output) if t and types[t] in (FLOAT, FLOAT16)}
            assert len(floats) <= 1, f"{name}: {node.name} ({node.op_type}) mixes float types"


def test_graph_io_types(graphs, mixed, data):
    io = lambda m: {v.name: v.type.tensor_type.elem_type for v in list(m.graph.input) + list(m.graph.output)}  # noqa: E731
    assert io(mixed["encoder"][0]) == {"image": FLOAT, "indices": INT64}
    assert io(mixed["decoder"][0]) == {"indices": INT64, "image": FLOAT}
    assert io(mixed["transformer"][0]) == {"tokens": INT64, "position": INT64, **dict.fromkeys(PAST, FLOAT16), "logits": FLOAT, "new_kv": FLOAT16}
    plain, report = to_mixed_precision(graphs["transformer"], data["feeds"]["transformer"])
    assert io(plain) == {"tokens": INT64, "position": INT64, **dict.fromkeys(PAST, FLOAT), "logits": FLOAT, "new_kv": FLOAT}
    assert report.fp16_io == []
    with pytest.raises(ValueError):
        to_mixed_precision(graphs["transformer"], data["feeds"]["transformer"], ("tokens",))


def test_quantizer_stays_fp32(graphs, mixed, data):
    model, report = mixed["encoder"]
    types = elem_types(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    argmins = [n for n in model.graph.node if n.op_type == "ArgMin"]
    assert len(argmins) == 1
    distances = argmins[0].input[0]
    assert types[distances] == FLOAT
    # the distance arithmetic (|z|^2, z.e, the sums) is fp32 back to the Cast of z
    stack, seen = [distances], set()
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen or node.op_type == "Cast":
            continue
        seen.add(node.name)
        assert all(types[o] != FLOAT16 for o in node.output if o), f"{node.op_type} {node.name} in the quantizer is fp16"
        stack.extend(t for t in node.input if t)
    assert {"Pow", "ReduceSum", "MatMul", "Sub"} <= {producer[t].op_type for t in producer if producer[t].name in seen}
    assert report.fp32_reasons.get("quantizer", 0) >= 7
    # forced whatever the threshold
    _, naive_threshold = to_mixed_precision(graphs["encoder"], data["feeds"]["encoder"], threshold=float("inf"))
    assert naive_threshold.fp32_reasons == {"quantizer": report.fp32_reasons["quantizer"]}


def test_report_is_small_json(mixed):
    for name, (_, report) in mixed.items():
        text = json.dumps(report.to_dict())
        assert len(text) < 20_000
        assert report.threshold == DEFAULT_THRESHOLD
        assert report.fp16_nodes + report.fp32_nodes == report.float_nodes
        assert report.fp32_nodes == len(report.fp32) == sum(report.fp32_reasons.values())


def test_encoder_index_agreement(graphs, mixed, data):
    expected = session(graphs["encoder"]).run(None, {"image": data["images"]})[0]
    for how, runner in runners(mixed["encoder"][0]).items():
        got = runner.run(None, {"image": data["images"]})[0]
        assert np.mean(got == expected) >= 0.995, how


def test_decoder_psnr(graphs, mixed, data):
    expected = session(graphs["decoder"]).run(None, {"indices": data["tokens"]})[0]
    for how, runner in runners(mixed["decoder"][0]).items():
        got = runner.run(None, {"indices": data["tokens"]})[0].astype(np.float32)
        assert psnr(got, expected) >= 40.0, how


def stepped_top1(runner: ort.InferenceSession, sequences: np.ndarray, cache_shape, dtype, prefill: int = 256) -> np.ndarray:
    cache = np.zeros(cache_shape(len(sequences)), dtype)
    logits, new_kv = runner.run(None, {"tokens": sequences[:, :prefill], "position": np.zeros(len(sequences), np.int64), **past_feeds(cache)})
    cache[:, :, :, :, :prefill] = new_kv
    top1 = [logits.argmax(-1)]
    for p in range(prefill, sequences.shape[1]):
        logits, new_kv = runner.run(None, {"tokens": sequences[:, p : p + 1], "position": np.full(len(sequences), p, np.int64), **past_feeds(cache)})
        cache[:, :, :, :, p : p + 1] = new_kv
        top1.append(logits.argmax(-1))
    return np.stack(top1, axis=1)


def test_weights_in_a_data_file_give_the_same_fp16_graph_and_emulation(graphs, mixed, data, tmp_path):
    """The exporter's path at released sizes: the fp32 graph's weights in a data file, read from it a
    tensor at a time by the fp16 pass and written out the same way; the emulation reads no weight (a Cast
    that ONNX Runtime folds). Same fp16 graph as the pass on the graph held in memory, same outputs."""
    from taming_deploy.export.graph_files import is_external, model_tensors, save_graph

    fp32 = onnx.ModelProto()
    fp32.CopyFrom(graphs["decoder"])
    save_graph(fp32, tmp_path / "decoder.onnx", threshold=0)
    skeleton = onnx.load(str(tmp_path / "decoder.onnx"), load_external_data=False)
    assert sum(is_external(t) for t in model_tensors(skeleton)) > 10
    fp16, _ = to_mixed_precision(skeleton, data["feeds"]["decoder"], base_dir=tmp_path)
    save_graph(fp16, tmp_path / "decoder.fp16.onnx", threshold=0, base_dir=tmp_path)
    written, in_memory = onnx.load(str(tmp_path / "decoder.fp16.onnx")), mixed["decoder"][0]
    assert list(written.graph.node) == list(in_memory.graph.node)
    arrays = lambda m: {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}  # noqa: E731
    got, expected = arrays(written), arrays(in_memory)
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)

    emulation = fp16_storage_emulation(onnx.load(str(tmp_path / "decoder.fp16.onnx"), load_external_data=False))
    onnx.save_model(emulation, str(tmp_path / "emulation.onnx"))  # names decoder.fp16.onnx.data beside it
    from_file = ort.InferenceSession(str(tmp_path / "emulation.onnx"), providers=["CPUExecutionProvider"])
    feed = {"indices": data["tokens"]}
    np.testing.assert_array_equal(from_file.run(None, feed)[0], runners(in_memory)["emulated"].run(None, feed)[0])


def test_transformer_greedy_agreement(graphs, mixed, data):
    sequences = data["sequences"]
    expected = stepped_top1(session(graphs["transformer"]), sequences, data["cache_shape"], np.float32)
    for how, runner in runners(mixed["transformer"][0]).items():
        got = stepped_top1(runner, sequences, data["cache_shape"], np.float16)
        assert np.mean(got == expected) >= 0.99, how


# --- a graph with a layer that leaves fp16's range ---------------------------------------------------


def large_scale_graph() -> onnx.ModelProto:
    """x (N, 4, 8, 8) -> Conv with weights ~ 2e4 (|y| ~ 1e5, beyond fp16) -> LayerNormalization over
    the last axis -> Conv with ordinary weights -> Sigmoid -> y."""
    rng = np.random.default_rng(0)
    big = numpy_helper.from_array((rng.standard_normal((8, 4, 1, 1)) * 2e4).astype(np.float32), "w_big")
    small = numpy_helper.from_array((rng.standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float32), "w_small")
    scale = numpy_helper.from_array(np.ones(8, np.float32), "ln_scale")
    bias = numpy_helper.from_array(np.zeros(8, np.float32), "ln_bias")
    nodes = [
        helper.make_node("Conv", ["x", "w_big"], ["big"], name="big_conv"),
        helper.make_node("LayerNormalization", ["big", "ln_scale", "ln_bias"], ["normed"], name="norm", axis=-1, epsilon=1e-5),
        helper.make_node("Conv", ["normed", "w_small"], ["small"], name="small_conv"),
        helper.make_node("Sigmoid", ["small"], ["y"], name="sigmoid"),
    ]
    graph = helper.make_graph(
        nodes, "large_scale", [helper.make_tensor_value_info("x", FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("y", FLOAT, ["N", 4, 8, 8])], initializer=[big, small, scale, bias],
        value_info=[helper.make_tensor_value_info(n, FLOAT, ["N", c, 8, 8]) for n, c in (("big", 8), ("normed", 8), ("small", 4))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_node_beyond_threshold_stays_fp32_and_naive_fp16_breaks():
    model = large_scale_graph()
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.uniform(-1, 1, (2, 4, 8, 8)).astype(np.float32)} for _ in range(2)]
    x = rng.uniform(-1, 1, (3, 4, 8, 8)).astype(np.float32)
    expected = session(model).run(None, {"x": x})[0]

    mixed, report = to_mixed_precision(model, feeds)
    types = elem_types(mixed)
    assert types["big"] == FLOAT
    kept = {row["node"]: row for row in report.fp32}
    assert set(kept) == {"big_conv", "norm"} and all(row["reason"] == "range" for row in kept.values())
    assert kept["big_conv"]["max_abs"] > FP16_LIMIT
    assert types["small"] == FLOAT16  # the ordinary part is fp16
    for how, runner in runners(mixed).items():
        got = runner.run(None, {"x": x})[0]
        assert np.abs(got - expected).max() < 2e-3, how

    # everything in fp16: the big Conv's output overflows. Judged with the emulation only: ORT's CPU
    # provider runs this Conv -> LayerNormalization -> Conv chain in fp32 (no fp16 kernels) and
    # would not show it.
    naive, naive_report = to_mixed_precision(model, feeds, threshold=float("inf"), keep_quantizer_fp32=False)
    assert naive_report.fp32_nodes == 0
    assert elem_types(naive)["big"] == FLOAT16
    got = session(fp16_storage_emulation(naive)).run(None, {"x": x})[0].astype(np.float32)
    assert not np.isfinite(got).all() or np.abs(got - expected).max() > 0.1


FP16_LIMIT = 65504.0


def test_fp16_io_beyond_threshold_is_refused():
    model = large_scale_graph()
    model.graph.output.append(helper.make_tensor_value_info("big", FLOAT, ["N", 8, 8, 8]))
    feeds = [{"x": np.ones((1, 4, 8, 8), np.float32)}]
    with pytest.raises(Fp16IoRangeError):
        to_mixed_precision(model, feeds, ("big",))


def test_emulation_rounds_every_fp16_tensor():
    """(x*x in fp16) / x in fp16: the emulation matches numpy's per-op fp16 rounding; 300^2 overflows
    fp16, so y = inf there (computed in fp32 without rounding it would be 300)."""
    nodes = [helper.make_node("Mul", ["x", "x"], ["sq"]), helper.make_node("Div", ["sq", "x"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", FLOAT16, [4])], [helper.make_tensor_value_info("y", FLOAT16, [4])],
                              value_info=[helper.make_tensor_value_info("sq", FLOAT16, [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    x = np.array([1.0009766, 300.0, 0.1, -3.0], np.float16)
    with np.errstate(over="ignore"):
        expected = (x * x).astype(np.float16) / x
    assert np.isinf(expected[1])
    got = session(fp16_storage_emulation(model)).run(None, {"x": x})[0]
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, expected)
