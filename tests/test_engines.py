"""The TensorRT code that runs without a GPU: profiles, engines.json compatibility, buffer sizes and
offsets, the new_kv scatter arithmetic, the decode-step bound, backend choice, ONNX op support, and the
errors on a machine without TensorRT."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from taming_deploy.engines import deps, onnx_support
from taming_deploy.engines.buffers import (Copy2D, cache_bytes, new_kv_bytes, past_offsets, scatter_new_kv, scatter_new_kv_view,
                                           step_buffers, tensor_bytes, view_past_offsets)
from taming_deploy.engines.build import build_engines, check_options, network_flags, reusable_timing_cache
from taming_deploy.engines.engine_manifest import (
    ENGINES_MANIFEST,
    TIMING_CACHE,
    EngineEntry,
    EngineManifest,
    Environment,
    environment_difference,
    incompatibility,
    io_mismatch,
    read_engine_manifest,
)
from taming_deploy.engines.profiles import (
    Limits,
    Profile,
    TensorRange,
    graph_profiles,
    past_names,
    transformer_io_problem,
    transformer_profile_index,
    transformer_shapes,
)
from taming_deploy.engines.roofline import decode_step_bound, embedding_weight_count, peak_bandwidth, streamed_weight_count
from taming_deploy.engines.runtime import load_trt_backend, probe_trt_backend
from taming_deploy.engines.select import choose_backend
from taming_deploy.bundle import GraphFile, Manifest, TensorSpec
from taming_deploy.errors import UserError
from taming_deploy.spec import ConditionSpec, ModelSpec

REPO = Path(__file__).resolve().parent.parent

SPEC = ModelSpec(
    downsample_factor=16, image_codebook_size=1024, vocab_size=1024, block_size=512, n_layer=4, n_head=8,
    n_embd=256, condition=ConditionSpec("segmentation", codebook_size=1024, n_labels=182), window=(16, 16),
)


def graph_file(name: str, precision: str, sha: str = "a" * 64) -> GraphFile:
    """A manifest entry with the I/O of export/graphs.py."""
    t = lambda n, dtype, shape: TensorSpec(n, dtype, shape)  # noqa: E731
    f = "float16" if precision == "fp16" else "float32"
    slots = ("batch", SPEC.n_head, SPEC.block_size, SPEC.head_dim)
    new_kv = (SPEC.n_layer, 2, "batch", SPEC.n_head, "tokens", SPEC.head_dim)
    io = {
        "encoder": ([t("image", "float32", ("batch", 3, "height", "width"))],
                    [t("indices", "int64", ("batch", "latent_height", "latent_width"))]),
        "decoder": ([t("indices", "int64", ("batch", "latent_height", "latent_width"))],
                    [t("image", "float32", ("batch", 3, "height", "width"))]),
        "cond_encoder": ([t("labels", "int64", ("batch", "height", "width"))],
                         [t("indices", "int64", ("batch", "latent_height", "latent_width"))]),
        "transformer": ([t("tokens", "int64", ("batch", "tokens")), t("position", "int64", ()),
                         *(t(name, f, slots) for name in past_names(SPEC.n_layer))],
                        [t("logits", "float32", ("batch", SPEC.vocab_size)), t("new_kv", f, new_kv)]),
    }[name]
    suffix = ".fp16" if precision == "fp16" else ""
    return GraphFile(f"{name}{suffix}.onnx", sha, precision, tuple(io[0]), tuple(io[1]))


def bundle_manifest(sha: str = "a" * 64) -> Manifest:
    names = ("encoder", "decoder", "cond_encoder", "transformer")
    return Manifest(SPEC, {n: {p: graph_file(n, p, sha) for p in ("fp32", "fp16")} for n in names})


def write_bundle(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(json.dumps(bundle_manifest().to_dict()))
    return path


ENV = Environment("10.9.0.34", "NVIDIA A10", (8, 6))


def engine_manifest(bundle: Manifest, env: Environment = ENV, precision: str = "fp16") -> EngineManifest:
    limits = Limits((512, 512), 2)
    entries = {
        name: EngineEntry(f"{name}.plan", "b" * 64, by_p[precision].file, by_p[precision].sha256,
                          tuple(graph_profiles(name, by_p[precision], bundle.model, limits)))
        for name, by_p in bundle.graphs.items()
    }
    return EngineManifest(env, precision, entries, build={"max_batch": 2})


# -- profiles -----------------------------------------------------------------------------------


def test_image_graph_profiles_follow_the_limits():
    (profile,) = graph_profiles("encoder", graph_file("encoder", "fp16"), SPEC, Limits((1024, 512), 4))
    assert profile.name == "images"
    assert profile.shapes == {"image": TensorRange((1, 3, 16, 16), (1, 3, 256, 256), (4, 3, 512, 1024))}
    (profile,) = graph_profiles("decoder", graph_file("decoder", "fp16"), SPEC, Limits((1024, 512), 4))
    assert profile.shapes["indices"] == TensorRange((1, 1, 1), (1, 16, 16), (4, 32, 64))


def test_optimum_image_size_is_clipped_to_the_maximum():
    (profile,) = graph_profiles("cond_encoder", graph_file("cond_encoder", "fp16"), SPEC, Limits((128, 64), 1))
    assert profile.shapes["labels"].opt == (1, 64, 128)


def test_transformer_gets_a_prefill_and_a_decode_profile():
    profiles = graph_profiles("transformer", graph_file("transformer", "fp16"), SPEC, Limits(max_batch=3))
    assert [p.name for p in profiles] == ["prefill", "decode"]
    prefill, decode = profiles
    past = past_names(4)
    assert past == ("past_key_0", "past_key_1", "past_key_2", "past_key_3",
                    "past_value_0", "past_value_1", "past_value_2", "past_value_3")
    assert set(prefill.shapes) == {"tokens", *past}  # the 0-d position is static: no profile entry
    assert prefill.shapes["tokens"] == TensorRange((1, 1), (1, 512), (3, 512))
    assert decode.shapes["tokens"] == TensorRange((1, 1), (1, 1), (3, 1))
    for profile in profiles:  # every layer's slots: only the batch is dynamic
        for name in past:
            assert profile.shapes[name] == TensorRange((1, 8, 512, 32), (1, 8, 512, 32), (3, 8, 512, 32)), name
    assert transformer_profile_index(profiles, 1) == 1
    assert transformer_profile_index(profiles, 7) == 0
    assert decode.violation(transformer_shapes(SPEC, 3, 1)) is None
    assert prefill.violation(transformer_shapes(SPEC, 2, 512)) is None
    assert decode.violation(transformer_shapes(SPEC, 2, 2)) is not None
    too_many = decode.violation(transformer_shapes(SPEC, 4, 1))
    assert too_many is not None and "--max-batch" in too_many
    assert "rebuild" in decode.violation({"tokens": (1, 1)})  # an input the engine has and the caller lacks


def test_past_names_are_the_exporters():
    pytest.importorskip("torch", reason="export.graphs needs PyTorch")
    from taming_deploy.export.graphs import past_names as exported_names

    assert past_names(3) == exported_names(3)


def test_transformer_interface_check():
    for precision in ("fp32", "fp16"):
        assert transformer_io_problem(graph_file("transformer", precision), SPEC) is None
    good = graph_file("transformer", "fp16")
    cache = (SPEC.n_layer, 2, "batch", SPEC.n_head, SPEC.block_size, SPEC.head_dim)
    old = GraphFile(good.file, good.sha256, "fp16",
                    (good.inputs[0], good.inputs[1], TensorSpec("cache", "float16", cache)),
                    (good.outputs[0], TensorSpec("new_cache", "float16", cache)))
    reason = transformer_io_problem(old, SPEC)
    assert reason is not None and "'cache'" in reason and "past_key_i" in reason
    mixed = GraphFile(good.file, good.sha256, "fp16", good.inputs,
                      (good.outputs[0], TensorSpec("new_kv", "float32", good.outputs[1].shape)))
    assert "one float dtype" in transformer_io_problem(mixed, SPEC)
    short = GraphFile(good.file, good.sha256, "fp16", (*good.inputs[:-1], TensorSpec("past_value_3", "float16", ("batch", 8, 256, 32))),
                      good.outputs)
    assert "'past_value_3'" in transformer_io_problem(short, SPEC)
    assert transformer_io_problem(good, dataclasses.replace(SPEC, n_layer=3)) is not None
    assert transformer_io_problem(good, dataclasses.replace(SPEC, block_size=256)) is not None


@pytest.mark.parametrize("limits, message", [
    (Limits((1000, 512), 1), "multiple of the model's downsampling factor 16"),
    (Limits((8, 512), 1), "multiple"),
    (Limits((512, 512), 0), "--max-batch"),
])
def test_bad_limits_are_user_errors(limits, message):
    with pytest.raises(UserError, match=message):
        graph_profiles("encoder", graph_file("encoder", "fp32"), SPEC, limits)


def test_unknown_axis_name_is_a_user_error():
    graph = GraphFile("x.onnx", "0", "fp32", (TensorSpec("image", "float32", ("batch", 3, "rows", "cols")),), ())
    with pytest.raises(UserError, match="'rows'"):
        graph_profiles("encoder", graph, SPEC, Limits())


def test_profile_violation_names_the_input_and_the_option():
    (profile,) = graph_profiles("encoder", graph_file("encoder", "fp16"), SPEC, Limits((512, 512), 2))
    assert profile.violation({"image": (2, 3, 512, 256)}) is None
    too_big = profile.violation({"image": (1, 3, 528, 256)})
    assert too_big is not None and "'image'" in too_big and "--max-size" in too_big
    assert profile.violation({"image": (3, 3, 64, 64)}) is not None
    assert profile.violation({"image": (1, 64, 64)}) is not None  # wrong rank


def test_profile_round_trips_through_json():
    profiles = graph_profiles("transformer", graph_file("transformer", "fp16"), SPEC, Limits())
    assert [Profile.from_dict(json.loads(json.dumps(p.to_dict()))) for p in profiles] == profiles


# -- engines.json -------------------------------------------------------------------------------


def test_engine_manifest_round_trips_and_matches_its_bundle(tmp_path):
    bundle = bundle_manifest()
    manifest = engine_manifest(bundle)
    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / ENGINES_MANIFEST).write_text(json.dumps(manifest.to_dict()))
    loaded = read_engine_manifest(tmp_path)
    assert loaded == manifest
    assert incompatibility(loaded, ENV, bundle) is None


@pytest.mark.parametrize("current, expected", [
    (Environment("10.10.0.31", "NVIDIA A10", (8, 6)), "TensorRT 10.9.0.34, this is TensorRT 10.10.0.31"),
    (Environment("10.9.0.34", "NVIDIA L4", (8, 9)), "built for NVIDIA A10 (compute capability 8.6), this GPU is NVIDIA L4 (8.9)"),
    (Environment("10.9.0.34", "NVIDIA A10G", (8, 6)), "NVIDIA A10G"),
])
def test_engines_from_another_tensorrt_or_gpu_are_incompatible(current, expected):
    reason = incompatibility(engine_manifest(bundle_manifest()), current, bundle_manifest())
    assert reason is not None and expected in reason
    assert environment_difference(ENV, current) == reason


def test_engines_from_other_graphs_are_incompatible():
    reason = incompatibility(engine_manifest(bundle_manifest()), ENV, bundle_manifest(sha="c" * 64))
    assert reason is not None and "encoder" in reason and "exported again" in reason


def test_a_missing_engine_or_precision_is_incompatible():
    bundle = bundle_manifest()
    manifest = engine_manifest(bundle)
    del manifest.engines["cond_encoder"]
    assert incompatibility(manifest, ENV, bundle) == "there is no cond_encoder engine"
    fp32_only = Manifest(SPEC, {n: {"fp32": g["fp32"]} for n, g in bundle.graphs.items()})
    reason = incompatibility(engine_manifest(bundle), ENV, fp32_only)
    assert reason is not None and "no fp16 graphs" in reason


def test_engine_manifest_errors_say_what_to_do(tmp_path):
    with pytest.raises(UserError, match="no TensorRT engines.*taming-deploy build"):
        read_engine_manifest(tmp_path)
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / ENGINES_MANIFEST).write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON.*rebuild the engines"):
        read_engine_manifest(tmp_path)
    (tmp_path / "engines" / ENGINES_MANIFEST).write_text(json.dumps({"format": "taming-deploy-engines", "format_version": 1}))
    with pytest.raises(UserError, match="malformed"):
        read_engine_manifest(tmp_path)


def test_io_mismatch_compares_names_directions_and_dtypes():
    graph = graph_file("transformer", "fp16")
    good = [("tokens", True, "int64"), ("position", True, "int64"), *((n, True, "float16") for n in past_names(4)),
            ("logits", False, "float32"), ("new_kv", False, "float16")]
    assert io_mismatch(good, graph) is None
    assert io_mismatch(list(reversed(good)), graph) is None  # engine tensor order is TensorRT's
    assert io_mismatch([*good[:2], ("past_key_0", True, "float32"), *good[3:]], graph) is not None
    assert io_mismatch(good[:-1], graph) is not None
    old = [("tokens", True, "int64"), ("position", True, "int64"), ("cache", True, "float16"),
           ("logits", False, "float32"), ("new_cache", False, "float16")]
    assert io_mismatch(old, graph) is not None


def test_timing_cache_is_reused_only_from_the_same_tensorrt_and_gpu(tmp_path):
    assert reusable_timing_cache(tmp_path, ENV) == b""
    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / TIMING_CACHE).write_bytes(b"timings")
    assert reusable_timing_cache(tmp_path, ENV) == b""  # no engines.json: unknown origin
    (engines / ENGINES_MANIFEST).write_text(json.dumps(engine_manifest(bundle_manifest()).to_dict()))
    assert reusable_timing_cache(tmp_path, ENV) == b"timings"
    assert reusable_timing_cache(tmp_path, Environment("11.0.0.1", "NVIDIA A10", (8, 6))) == b""


# -- buffers and the bandwidth bound ------------------------------------------------------------


def test_buffer_sizes():
    assert tensor_bytes((2, 3), "float16") == 12
    assert tensor_bytes((), np.int64) == 8
    with pytest.raises(ValueError):
        tensor_bytes((-1, 3), "float32")
    assert cache_bytes(SPEC, 2, "float16") == 4 * 2 * 2 * 8 * 512 * 32 * 2
    assert new_kv_bytes(SPEC, 2, 1, "float32") == 4 * 2 * 2 * 8 * 1 * 32 * 4
    sizes = step_buffers(SPEC, 3, "float16", "float32")
    # one cache (no second buffer to swap with) and new_kv with room for a whole-block prefill
    assert sizes == {"tokens": 3 * 512 * 8, "position": 8, "logits": 3 * 1024 * 4,
                     "kv": cache_bytes(SPEC, 3, "float16"), "new_kv": 4 * 2 * 3 * 8 * 512 * 32 * 2}


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_past_offsets_address_each_layers_slots_in_the_one_cache(dtype):
    spec = ModelSpec(4, 32, 40, 6, 3, 2, 8, ConditionSpec("unconditional"))  # 3 layers, 2 heads, head_dim 4, block 6
    batch = 2
    cache = np.arange(np.prod(spec.cache_shape(batch))).astype(dtype).reshape(spec.cache_shape(batch))
    flat = cache.reshape(-1).view(np.uint8)
    offsets = past_offsets(spec, batch, dtype)
    assert set(offsets) == set(past_names(3))
    block = tensor_bytes((batch, 2, 6, 4), dtype)
    assert offsets["past_key_0"] == 0 and offsets["past_value_0"] == block and offsets["past_key_1"] == 2 * block
    for layer in range(3):
        for kind, name in enumerate((f"past_key_{layer}", f"past_value_{layer}")):
            start = offsets[name]
            view = flat[start : start + block].view(dtype).reshape(batch, 2, 6, 4)
            np.testing.assert_array_equal(view, cache[layer, kind])  # what the engine reads as that input


def apply_copy_2d(dst: np.ndarray, src: np.ndarray, copy: Copy2D) -> None:
    """cudaMemcpy2D's documented semantics on byte arrays: ``height`` rows of ``width`` bytes, row r
    from src + r * spitch to dst + r * dpitch; width may not exceed either pitch."""
    assert copy.width <= copy.dst_pitch and copy.width <= copy.src_pitch
    assert copy.extent(copy.dst_pitch, copy.dst_offset) <= dst.size and copy.extent(copy.src_pitch, copy.src_offset) <= src.size
    for r in range(copy.height):
        d, s_ = copy.dst_offset + r * copy.dst_pitch, copy.src_offset + r * copy.src_pitch
        dst[d : d + copy.width] = src[s_ : s_ + copy.width]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("batch, tokens, position", [(1, 1, 0), (2, 1, 5), (2, 3, 2), (3, 7, 0), (1, 4, 3), (2, 1, 6)])
def test_new_kv_scatter_is_the_numpy_slice_assignment(dtype, batch, tokens, position):
    """The runtime's one cudaMemcpy2DAsync does what OrtCache does with numpy:
    kv[:, :, :, :, position:position + T] = new_kv."""
    spec = ModelSpec(4, 32, 40, 7, 3, 2, 6, ConditionSpec("unconditional"))  # block 7, 3 layers, 2 heads, head_dim 3
    rng = np.random.default_rng(batch * 100 + tokens * 10 + position)
    cache = rng.standard_normal(spec.cache_shape(batch)).astype(dtype)
    new_kv = rng.standard_normal((3, 2, batch, 2, tokens, 3)).astype(dtype)
    expected = cache.copy()
    expected[:, :, :, :, position : position + tokens] = new_kv
    # the device buffer holds new_kv for T tokens at its start; the rest (room for a whole block) is stale
    src = np.full(new_kv_bytes(spec, batch, spec.block_size, dtype), 0xAB, np.uint8)
    src[: new_kv.nbytes] = new_kv.reshape(-1).view(np.uint8)
    dst = cache.reshape(-1).view(np.uint8).copy()
    copy = scatter_new_kv(spec, batch, tokens, position, dtype)
    itemsize = np.dtype(dtype).itemsize
    assert copy == Copy2D(dst_offset=position * 3 * itemsize, dst_pitch=7 * 3 * itemsize, src_pitch=tokens * 3 * itemsize,
                          width=tokens * 3 * itemsize, height=3 * 2 * batch * 2)
    apply_copy_2d(dst, src, copy)
    np.testing.assert_array_equal(dst.view(dtype).reshape(cache.shape), expected)


@pytest.mark.parametrize("kv_batch, start, batch", [(5, 1, 3), (5, 0, 5), (4, 3, 1), (3, 0, 2)])
def test_new_kv_scatter_into_a_view_writes_only_its_sequences(kv_batch, start, batch):
    """cache[:, :, start:start + batch, :, position:position + T] = new_kv, the other sequences kept."""
    spec = ModelSpec(4, 32, 40, 7, 3, 2, 6, ConditionSpec("unconditional"))
    rng = np.random.default_rng(kv_batch * 10 + start)
    tokens, position = 2, 3
    cache = rng.standard_normal(spec.cache_shape(kv_batch)).astype(np.float32)
    new_kv = rng.standard_normal((3, 2, batch, 2, tokens, 3)).astype(np.float32)
    expected = cache.copy()
    expected[:, :, start : start + batch, :, position : position + tokens] = new_kv
    src = np.full(new_kv_bytes(spec, kv_batch, spec.block_size, np.float32), 0xAB, np.uint8)
    src[: new_kv.nbytes] = new_kv.reshape(-1).view(np.uint8)
    dst = cache.reshape(-1).view(np.uint8).copy()
    copies = scatter_new_kv_view(spec, batch, tokens, position, np.float32, kv_batch, start)
    assert len(copies) == (1 if (start, batch) == (0, kv_batch) else 3 * 2)
    for copy in copies:
        apply_copy_2d(dst, src, copy)
    np.testing.assert_array_equal(dst.view(np.float32).reshape(cache.shape), expected)
    # and the engine reads the view's sequences where view_past_offsets says
    offsets = view_past_offsets(spec, kv_batch, start, np.float32)
    block = batch * 2 * 7 * 3 * 4
    flat = expected.reshape(-1).view(np.uint8)
    for name, (layer, kind) in {"past_key_1": (1, 0), "past_value_2": (2, 1)}.items():
        view = flat[offsets[name] : offsets[name] + block].view(np.float32).reshape(batch, 2, 7, 3)
        np.testing.assert_array_equal(view, expected[layer, kind, start : start + batch])


def test_new_kv_scatter_refuses_positions_outside_the_block():
    spec = ModelSpec(4, 32, 40, 7, 3, 2, 6, ConditionSpec("unconditional"))
    for tokens, position in ((1, 7), (3, 5), (0, 0), (1, -1)):
        with pytest.raises(ValueError, match="block size 7"):
            scatter_new_kv(spec, 1, tokens, position, np.float32)


def test_weight_counts_match_the_pytorch_model():
    torch = pytest.importorskip("torch", reason="the parameter count is checked against the PyTorch GPT")
    from taming_deploy.training.models.gpt import GPT, GPTConfig

    spec = ModelSpec(4, 32, 40, 24, 2, 2, 16, ConditionSpec("unconditional"))
    gpt = GPT(GPTConfig(vocab_size=40, block_size=24, n_layer=2, n_head=2, n_embd=16))
    with torch.no_grad():
        total = sum(p.numel() for p in gpt.parameters())
    assert streamed_weight_count(spec) + embedding_weight_count(spec) == total
    assert embedding_weight_count(spec) == gpt.tok_emb.weight.numel() + gpt.pos_emb.numel()


def test_decode_step_bound():
    assert peak_bandwidth(1_000_000, 256) == 64e9  # 1 GHz x 2 transfers x 32 bytes
    bound = decode_step_bound(SPEC, 1, np.float16, np.float16, 100e9)
    assert bound.weight_bytes == streamed_weight_count(SPEC) * 2
    assert bound.cache_read_bytes == cache_bytes(SPEC, 1, np.float16)  # read once; no longer rewritten
    assert bound.new_kv_bytes == SPEC.n_layer * 2 * SPEC.n_head * SPEC.head_dim * 2  # one token's keys and values
    assert bound.seconds == pytest.approx((bound.weight_bytes + bound.cache_read_bytes + bound.new_kv_bytes) / 100e9)
    fp32_cache = decode_step_bound(SPEC, 2, np.float16, np.float32, 100e9)  # fp16 weights may keep an fp32 cache
    assert fp32_cache.cache_read_bytes == cache_bytes(SPEC, 2, np.float32) and fp32_cache.weight_bytes == bound.weight_bytes


# -- backend choice -----------------------------------------------------------------------------


def test_auto_prefers_tensorrt_and_explains_a_fallback():
    assert choose_backend("auto", "bundle", None).backend == "trt"
    fallback = choose_backend("auto", "bundle", "no TensorRT engines in b/engines")
    assert fallback.backend == "ort"
    assert "ONNX Runtime" in fallback.note and "no TensorRT engines in b/engines" in fallback.note
    assert choose_backend("auto", "checkpoint", "irrelevant").backend == "torch"


def test_explicit_backends():
    assert choose_backend("ort", "bundle", "whatever").backend == "ort"
    assert choose_backend("torch", "checkpoint", None).backend == "torch"
    assert choose_backend("trt", "bundle", None).backend == "trt"
    with pytest.raises(UserError, match="TensorRT is not installed"):
        choose_backend("trt", "bundle", "TensorRT is not installed")
    with pytest.raises(UserError, match="exported bundle"):
        choose_backend("trt", "checkpoint", None)


# -- ONNX op support ----------------------------------------------------------------------------


def model(nodes, opset=21, functions=()):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], functions=list(functions))


def test_supported_ops_pass_and_unsupported_ones_are_listed():
    ok = model([helper.make_node("Gelu", ["x"], ["a"]), helper.make_node("GroupNormalization", ["a", "s", "b"], ["y"], num_groups=1)])
    assert onnx_support.unsupported_ops(ok) == []
    bad = model([helper.make_node("Unique", ["x"], ["a"]), helper.make_node("Det", ["a"], ["b"]),
                 helper.make_node("Gelu", ["b"], ["c"], domain="com.microsoft"), helper.make_node("Unique", ["c"], ["y"])])
    assert onnx_support.unsupported_ops(bad) == ["Det", "Unique", "com.microsoft::Gelu"]


def test_subgraphs_and_local_functions_are_searched():
    branch = helper.make_graph([helper.make_node("StringSplit", ["x"], ["z"])], "then", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])])
    function = helper.make_function("local", "Block", ["i"], ["o"], [helper.make_node("Col2Im", ["i"], ["o"])],
                                    [helper.make_opsetid("", 21)])
    m = model([helper.make_node("If", ["x"], ["a"], then_branch=branch, else_branch=branch),
               helper.make_node("Block", ["a"], ["y"], domain="local")], functions=[function])
    assert onnx_support.unsupported_ops(m) == ["Col2Im", "StringSplit"]


def test_opset_range():
    assert onnx_support.opset_problem(model([], opset=21)) is None
    assert "opset 25" in onnx_support.opset_problem(model([], opset=25))
    assert "opset 8" in onnx_support.opset_problem(model([], opset=8))
    no_default = helper.make_model(helper.make_graph([], "g", [], []), opset_imports=[helper.make_opsetid("x", 1)])
    assert onnx_support.opset_problem(no_default) is not None


def test_every_op_the_exporter_emits_is_supported():
    """The op types of the current exporter (issue 5's inventory of the four graphs)."""
    emitted = ("Conv GroupNormalization Reshape Sigmoid Mul Add Transpose MatMul Softmax Shape Concat Squeeze Div Pow "
               "ReduceSum Sub ArgMin Gather Unsqueeze Where LayerNormalization Clip Range GreaterOrEqual Less And "
               "LessOrEqual Not Gelu Gemm Equal Cast Resize").split()
    assert set(emitted) <= onnx_support.SUPPORTED_OPS


@pytest.mark.slow
def test_exported_graphs_parse_as_far_as_the_op_table_tells(reference_model, tmp_path):
    from taming_deploy.export.graphs import graph_defs
    from taming_deploy.export.onnx_export import export_graph

    for graph in graph_defs(reference_model):
        if graph.name in ("encoder", "decoder"):
            continue  # to save time: the condition encoder has the encoder's ops; the decoder adds only Resize
        exported = export_graph(graph, tmp_path / f"{graph.name}.onnx")
        assert onnx_support.opset_problem(exported) is None
        assert onnx_support.unsupported_ops(exported) == [], graph.name


# -- without TensorRT ---------------------------------------------------------------------------


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


def test_build_without_tensorrt_names_it_and_the_install_command(no_tensorrt, tmp_path):
    with pytest.raises(UserError) as info:
        build_engines(write_bundle(tmp_path / "bundle"))
    message = str(info.value)
    assert "TensorRT" in message and "\n" not in message
    assert "pip install 'taming-deploy[gpu-cu12]' or 'taming-deploy[gpu-cu13]'" in message and "pypi.nvidia.com" in message


@pytest.mark.parametrize("version, ok", [("8.6.1", False), ("10.8.0.43", False), ("10.9.0.34", True), ("11.4.0.106", True)])
def test_tensorrt_version_floor(monkeypatch, version, ok):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version))
    if ok:
        assert deps.tensorrt().__version__ == version
    else:
        with pytest.raises(UserError, match=f"TensorRT {version} is too old.*>= 10.9"):
            deps.tensorrt()


@pytest.mark.parametrize("version, flags", [("10.9.0.34", 1 << 1), ("10.16.1.11", 1 << 1), ("11.4.0.106", 0)])
def test_strongly_typed_flag_only_on_tensorrt_10(version, flags):
    # 11.x keeps STRONGLY_TYPED in the enum, deprecated and ignored (test_tensorrt_bindings.py: the real enums)
    enum = types.SimpleNamespace(STRONGLY_TYPED=1)
    assert network_flags(types.SimpleNamespace(__version__=version, NetworkDefinitionCreationFlag=enum)) == flags


@pytest.mark.parametrize("args, message", [(("fp8", 4.0, 3), "--precision"), (("fp16", 0, 3), "--workspace"),
                                           (("fp16", 4.0, 6), "--opt-level")])
def test_build_options_are_checked(args, message):
    with pytest.raises(UserError, match=message):
        check_options(*args)


def test_loading_without_engines_says_to_build_them(tmp_path):
    bundle = write_bundle(tmp_path / "bundle")
    with pytest.raises(UserError, match="no TensorRT engines.*taming-deploy build"):
        load_trt_backend(bundle)
    backend, reason = probe_trt_backend(bundle)
    assert backend is None and "no TensorRT engines" in reason


def test_loading_engines_without_tensorrt_says_to_install_it(no_tensorrt, tmp_path):
    bundle = write_bundle(tmp_path / "bundle")
    (bundle / "engines").mkdir()
    (bundle / "engines" / ENGINES_MANIFEST).write_text(json.dumps(engine_manifest(bundle_manifest()).to_dict()))
    backend, reason = probe_trt_backend(bundle)
    assert backend is None and "TensorRT is not installed" in reason
    assert "pip install 'taming-deploy[gpu-cu12]' or 'taming-deploy[gpu-cu13]'" in choose_backend("auto", "bundle", reason).note


def test_cuda_status_is_checked():
    rt = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    from taming_deploy.engines import cuda

    assert cuda.check((rt.cudaError_t.cudaSuccess, 7), "cudaX") == 7
    assert cuda.check((rt.cudaError_t.cudaSuccess,), "cudaX") is None
    with pytest.raises(cuda.CudaError, match="cudaMalloc failed: cudaErrorMemoryAllocation"):
        cuda.check((rt.cudaError_t.cudaErrorMemoryAllocation, None), "cudaMalloc")


def gpu_present() -> bool:
    try:
        from cuda.bindings import runtime
    except ImportError:
        return False
    status, count = runtime.cudaGetDeviceCount()
    return status == runtime.cudaError_t.cudaSuccess and count > 0


@pytest.mark.skipif(gpu_present(), reason="checks the message on machines without a GPU")
def test_gpu_benchmark_without_a_gpu_fails_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_benchmark.py"), str(tmp_path)],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the GPU benchmark needs an NVIDIA GPU")
