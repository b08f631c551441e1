"""build.py and runtime.py driven end to end against in-memory stand-ins for TensorRT and the CUDA runtime.

The stand-ins implement only the calls the engines package makes, with the documented signatures;
device memory is host bytes, an "engine" is a small NumPy kernel. They cannot tell whether
TensorRT itself behaves as documented (the GPU tests do that); they check the logic around it: the
build writes what engines.json promises, only strong typing and no precision flag is used, the
timing cache is carried over, every CUDA status is checked, the transformer cache stays in the two
device buffers and swaps correctly, T = 1 runs on the decode profile, and a CUDA-graph replay gives
the same tokens.
"""
from __future__ import annotations

import ctypes
import enum
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from engines import build_engines, cuda, deps, load_trt_backend
from taming_deploy.bundle import GraphFile, Manifest, TensorSpec
from taming_deploy.errors import UserError
from taming_deploy.sampler import sample_tokens
from taming_deploy.sampling import SamplingOptions
from taming_deploy.spec import ConditionSpec, ModelSpec

SPEC = ModelSpec(downsample_factor=4, image_codebook_size=16, vocab_size=16, block_size=32, n_layer=1, n_head=1,
                 n_embd=2, condition=ConditionSpec("segmentation", codebook_size=16, n_labels=5), window=(3, 3))


class Status(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2


class FakeCudart:
    """cuda.bindings.runtime: (status, *results) tuples; device memory is a dict of bytearrays."""

    cudaError_t = Status
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
    cudaDeviceAttr = SimpleNamespace(cudaDevAttrMemoryClockRate="clock", cudaDevAttrGlobalMemoryBusWidth="bus")
    cudaStreamCaptureMode = SimpleNamespace(cudaStreamCaptureModeThreadLocal=2)
    OK = (Status.cudaSuccess,)

    def __init__(self) -> None:
        self.memory: dict[int, bytearray] = {}
        self.next_ptr = 1 << 16
        self.capturing: list | None = None
        self.launches = 0
        self.fail_malloc = False

    def array(self, ptr: int, dtype, shape) -> np.ndarray:
        return np.frombuffer(self.memory[ptr], dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def cudaGetDeviceCount(self): return (Status.cudaSuccess, 1)
    def cudaGetDevice(self): return (Status.cudaSuccess, 0)
    def cudaGetDeviceProperties(self, device):
        return (Status.cudaSuccess, SimpleNamespace(name=b"Fake GPU\0\0\0", major=8, minor=6, totalGlobalMem=1 << 34))
    def cudaDeviceGetAttribute(self, attr, device): return (Status.cudaSuccess, {"clock": 1_000_000, "bus": 256}[attr])
    def cudaGetErrorName(self, status): return (Status.cudaSuccess, Status(status).name.encode())
    def cudaGetErrorString(self, status): return (Status.cudaSuccess, b"fake error")

    def cudaMalloc(self, nbytes):
        if self.fail_malloc:
            return (Status.cudaErrorMemoryAllocation, None)
        ptr, self.next_ptr = self.next_ptr, self.next_ptr + nbytes + 256
        self.memory[ptr] = bytearray(nbytes)
        return (Status.cudaSuccess, ptr)

    def cudaFree(self, ptr):
        del self.memory[ptr]
        return self.OK

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
            self.memory[dst][:count] = ctypes.string_at(src, count)
        else:
            ctypes.memmove(dst, bytes(self.memory[src][:count]), count)
        return self.OK

    def cudaMemsetAsync(self, ptr, value, count, stream):
        self.memory[ptr][:count] = bytes([value]) * count
        return self.OK

    def cudaStreamCreate(self): return (Status.cudaSuccess, 7)
    def cudaStreamSynchronize(self, stream): return self.OK
    def cudaStreamDestroy(self, stream): return self.OK

    def cudaStreamBeginCapture(self, stream, mode):
        self.capturing = []
        return self.OK

    def cudaStreamEndCapture(self, stream):
        graph, self.capturing = self.capturing, None
        return (Status.cudaSuccess, graph)

    def cudaGraphInstantiate(self, graph, flags): return (Status.cudaSuccess, list(graph))
    def cudaGraphDestroy(self, graph): return self.OK
    def cudaGraphExecDestroy(self, graph_exec): return self.OK

    def cudaGraphLaunch(self, graph_exec, stream):
        self.launches += 1
        for op in graph_exec:
            op()
        return self.OK


def toy_step(tokens: np.ndarray, position: int, cache: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A transformer stand-in whose next token depends on every token fed so far, through the cache."""
    new = cache.copy()
    t = tokens.shape[1]
    new[0, 0, :, 0, position : position + t, 0] = tokens
    seen = new[0, 0, :, 0, : position + t, 0]
    score = (seen * np.arange(1, position + t + 1)).sum(axis=1).astype(np.int64)
    logits = np.zeros((tokens.shape[0], SPEC.vocab_size), np.float32)
    logits[np.arange(len(score)), score % SPEC.vocab_size] = 1.0
    return logits, new


class ToyBackend:
    """The same toy model on the host: the oracle the TensorRT runtime is compared with."""

    name, spec = "toy", SPEC

    def condition_tokens(self, labels):
        return labels[:, :: SPEC.downsample_factor, :: SPEC.downsample_factor].astype(np.int64)

    def new_cache(self, batch):
        return {"cache": np.zeros(SPEC.cache_shape(batch), np.float32)}

    def transformer_step(self, tokens, position, cache):
        logits, cache["cache"] = toy_step(tokens, position, cache["cache"])
        return logits


class FakeContext:
    def __init__(self, engine: "FakeEngine", trt: "FakeTensorRT"):
        self.engine, self.trt = engine, trt
        self.profile: int | None = None
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}

    def set_optimization_profile_async(self, index, stream):
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return self.engine.output_shape(name, self.shapes)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return name in {t.name for t, _ in self.engine.tensors}

    def execute_async_v3(self, stream_handle):
        assert isinstance(stream_handle, int)
        self.trt.executions.append((self.engine.graph.file, self.profile, dict(self.shapes)))
        op = self.engine.kernel(dict(self.shapes), dict(self.addresses))
        if self.trt.cudart.capturing is not None:
            self.trt.cudart.capturing.append(op)
        else:
            op()
        return True


class FakeEngine:
    def __init__(self, graph: GraphFile, profiles: int, trt: "FakeTensorRT"):
        self.graph, self.num_optimization_profiles, self.trt = graph, profiles, trt
        self.tensors = [(t, True) for t in graph.inputs] + [(t, False) for t in graph.outputs]
        self.num_io_tensors = len(self.tensors)

    def get_tensor_name(self, i): return self.tensors[i][0].name
    def get_tensor_mode(self, name): return "in" if self._spec(name)[1] else "out"
    def get_tensor_dtype(self, name): return np.dtype(self._spec(name)[0].dtype)
    def is_shape_inference_io(self, name): return False
    def create_execution_context(self): return FakeContext(self, self.trt)

    def _spec(self, name):
        return next((t, is_input) for t, is_input in self.tensors if t.name == name)

    def output_shape(self, name, shapes):
        f, kind = SPEC.downsample_factor, self.graph.file.split(".")[0]
        if kind == "cond_encoder":
            b, h, w = shapes["labels"]
            return (b, h // f, w // f)
        if kind == "decoder":
            b, h, w = shapes["indices"]
            return (b, 3, h * f, w * f)
        raise AssertionError(name)

    def kernel(self, shapes, addresses):
        mem, kind = self.trt.cudart, self.graph.file.split(".")[0]
        if kind == "transformer":
            (b, t), cache_shape = shapes["tokens"], shapes["cache"]

            def op():
                tokens = mem.array(addresses["tokens"], np.int64, (b, t))
                position = int(mem.array(addresses["position"], np.int64, ()))
                logits, new = toy_step(tokens, position, mem.array(addresses["cache"], np.float32, cache_shape))
                mem.array(addresses["logits"], np.float32, logits.shape)[...] = logits
                mem.array(addresses["new_cache"], np.float32, cache_shape)[...] = new
            return op
        (src_name,), (dst_name,) = [t.name for t in self.graph.inputs], [t.name for t in self.graph.outputs]
        src_shape, dst_shape = shapes[src_name], self.output_shape(dst_name, shapes)

        def op():
            src = mem.array(addresses[src_name], self.get_tensor_dtype(src_name), src_shape)
            out = mem.array(addresses[dst_name], self.get_tensor_dtype(dst_name), dst_shape)
            f = SPEC.downsample_factor
            out[...] = src[:, ::f, ::f] if kind == "cond_encoder" else np.repeat(np.repeat(src, f, 1), f, 2)[:, None]
        return op


class FakeTensorRT:
    """The tensorrt module, as far as engines/ uses it."""

    __version__ = "10.9.0.34"
    Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity: None})
    NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=5)
    MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")
    BuilderFlag = SimpleNamespace(TF32="tf32")
    TensorIOMode = SimpleNamespace(INPUT="in", OUTPUT="out")

    def __init__(self, cudart: FakeCudart, graphs: dict[str, GraphFile]):
        self.cudart, self.graphs = cudart, graphs
        self.configs: list[SimpleNamespace] = []
        self.network_flags: list[int] = []
        self.executions: list = []
        trt = self

        class TimingCache:
            def __init__(self, data): self.data = bytes(data)
            def serialize(self): return self.data + b"t"

        class Config(SimpleNamespace):
            def set_memory_pool_limit(self, pool, size): self.pool = (pool, size)
            def clear_flag(self, flag): self.cleared.append(flag)
            def set_flag(self, flag): self.set_flags.append(flag)
            def create_timing_cache(self, data): return TimingCache(data)
            def set_timing_cache(self, cache, ignore_mismatch):
                self.timing = cache
                return True
            def add_optimization_profile(self, profile):
                self.profiles.append(profile.shapes)
                return len(self.profiles) - 1

        class Profile:
            def __init__(self): self.shapes = {}
            def set_shape(self, name, lo, opt, hi): self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

        class Builder:
            def __init__(self, logger): pass
            def create_network(self, flags):
                trt.network_flags.append(flags)
                return SimpleNamespace(num_inputs=0, parsed=None)
            def create_builder_config(self):
                config = Config(cleared=[], set_flags=[], profiles=[], builder_optimization_level=None)
                trt.configs.append(config)
                return config
            def create_optimization_profile(self): return Profile()
            def build_serialized_network(self, network, config):
                return json.dumps({"graph": network.parsed, "profiles": len(config.profiles)}).encode()

        class OnnxParser:
            num_errors = 0
            def __init__(self, network, logger): self.network = network
            def parse_from_file(self, path):
                self.network.parsed = Path(path).name
                return True

        class Runtime:
            def __init__(self, logger): pass
            def deserialize_cuda_engine(self, data):
                plan = json.loads(bytes(data))
                return FakeEngine(trt.graphs[plan["graph"]], plan["profiles"], trt)

        self.Builder, self.OnnxParser, self.Runtime = Builder, OnnxParser, Runtime

    @staticmethod
    def nptype(dtype):
        return dtype


def graph(name: str) -> GraphFile:
    t = TensorSpec
    cache = (SPEC.n_layer, 2, "batch", SPEC.n_head, SPEC.block_size, SPEC.head_dim)
    latent = ("batch", "latent_height", "latent_width")
    io = {
        "encoder": ((t("image", "float32", ("batch", 3, "height", "width")),), (t("indices", "int64", latent),)),
        "decoder": ((t("indices", "int64", latent),), (t("image", "float32", ("batch", 3, "height", "width")),)),
        "cond_encoder": ((t("labels", "int64", ("batch", "height", "width")),), (t("indices", "int64", latent),)),
        "transformer": ((t("tokens", "int64", ("batch", "tokens")), t("position", "int64", ()), t("cache", "float32", cache)),
                        (t("logits", "float32", ("batch", SPEC.vocab_size)), t("new_cache", "float32", cache))),
    }[name]
    return GraphFile(f"{name}.onnx", "", "fp32", *io)


@pytest.fixture
def fake_gpu(tmp_path, monkeypatch):
    """A bundle with placeholder graph files, and the fake TensorRT + CUDA in place of the real ones."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    graphs = {}
    for name in ("encoder", "decoder", "cond_encoder", "transformer"):
        data = f"graph {name}".encode()
        (bundle / f"{name}.onnx").write_bytes(data)
        g = graph(name)
        graphs[g.file] = GraphFile(g.file, hashlib.sha256(data).hexdigest(), "fp32", g.inputs, g.outputs)
    manifest = Manifest(SPEC, {g.file.removesuffix(".onnx"): {"fp32": g} for g in graphs.values()})
    (bundle / "manifest.json").write_text(json.dumps(manifest.to_dict()))
    cudart = FakeCudart()
    trt = FakeTensorRT(cudart, graphs)
    monkeypatch.setattr(deps, "tensorrt", lambda: trt)
    monkeypatch.setattr(deps, "cudart", lambda: cudart)
    return SimpleNamespace(bundle=bundle, trt=trt, cudart=cudart)


def test_build_writes_strongly_typed_engines_and_keeps_the_timing_cache(fake_gpu):
    engines = build_engines(fake_gpu.bundle, precision="fp32", max_size=(24, 16), max_batch=2, workspace_gib=0.5, opt_level=2)
    manifest = json.loads((engines / "engines.json").read_text())
    assert manifest["tensorrt_version"] == "10.9.0.34"
    assert manifest["gpu"] == {"name": "Fake GPU", "compute_capability": [8, 6]}
    assert set(manifest["engines"]) == {"encoder", "decoder", "cond_encoder", "transformer"}
    transformer = manifest["engines"]["transformer"]
    assert [p["name"] for p in transformer["profiles"]] == ["prefill", "decode"]
    assert transformer["source"]["sha256"] == fake_gpu.trt.graphs["transformer.onnx"].sha256
    plan = (engines / "transformer.plan").read_bytes()
    assert transformer["sha256"] == hashlib.sha256(plan).hexdigest()
    assert fake_gpu.trt.network_flags == [1 << 5] * 4  # STRONGLY_TYPED
    for config in fake_gpu.trt.configs:
        assert config.set_flags == [] and config.cleared == ["tf32"]  # no precision flag; fp32 is real fp32
        assert config.pool == ("workspace", 1 << 29) and config.builder_optimization_level == 2
    decode_profile = fake_gpu.trt.configs[-1].profiles[1]
    assert decode_profile["tokens"] == ((1, 1), (1, 1), (2, 1))
    assert (engines / "timing.cache").read_bytes() == b"t"
    build_engines(fake_gpu.bundle, precision="fp32", max_size=(24, 16), max_batch=2)
    assert (engines / "timing.cache").read_bytes() == b"tt"  # the previous cache was loaded and extended
    assert sorted(p.name for p in fake_gpu.bundle.iterdir()) == ["cond_encoder.onnx", "decoder.onnx", "encoder.onnx",
                                                                 "engines", "manifest.json", "transformer.onnx"]


def test_a_failed_build_leaves_the_previous_engines(fake_gpu):
    engines = build_engines(fake_gpu.bundle, precision="fp32", max_size=(24, 16), max_batch=2)
    before = (engines / "engines.json").read_text()
    with pytest.raises(UserError, match="no fp16 graphs"):
        build_engines(fake_gpu.bundle, precision="fp16")
    fake_gpu.trt.Builder.build_serialized_network = lambda self, network, config: None
    with pytest.raises(UserError, match="could not build an engine"):
        build_engines(fake_gpu.bundle, precision="fp32", max_size=(24, 16), max_batch=2)
    assert (engines / "engines.json").read_text() == before


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_generation_matches_the_host_model(fake_gpu, cuda_graph):
    build_engines(fake_gpu.bundle, precision="fp32", max_size=(24, 16), max_batch=2)
    backend = load_trt_backend(fake_gpu.bundle, cuda_graph=cuda_graph)
    labels = np.random.default_rng(1).integers(0, 5, (2, 16, 24))
    cond = backend.condition_tokens(labels)
    np.testing.assert_array_equal(cond, ToyBackend().condition_tokens(labels))
    fed = []  # tokens per transformer call
    step = backend.transformer_step
    backend.transformer_step = lambda tokens, position, cache: fed.append(tokens.shape[1]) or step(tokens, position, cache)
    options, latent = SamplingOptions(greedy=True), (4, 6)
    tokens, stats = sample_tokens(backend, cond, latent, options, np.random.default_rng(0))
    expected, _ = sample_tokens(ToyBackend(), cond, latent, options, np.random.default_rng(0))
    np.testing.assert_array_equal(tokens, expected)
    decode_calls = fed.count(1)
    assert decode_calls > 3 and len(fed) > decode_calls  # both profiles were exercised
    runs = [e for e in fake_gpu.trt.executions if e[0] == "transformer.onnx"]
    assert all((profile == 1) == (shapes["tokens"][1] == 1) for _, profile, shapes in runs)  # T = 1 -> decode profile
    if cuda_graph:
        assert backend.cuda_graph_error is None
        # the first decode step of each buffer parity runs (and is captured); the others replay
        assert decode_calls - 2 <= fake_gpu.cudart.launches < decode_calls
    else:
        assert fake_gpu.cudart.launches == 0
    image = backend.decode(tokens)
    assert image.dtype == np.float32 and image.shape == (2, 3, 16, 24)


def test_requests_beyond_the_profiles_and_cuda_failures_are_user_errors(fake_gpu):
    build_engines(fake_gpu.bundle, precision="fp32", max_size=(24, 16), max_batch=2)
    backend = load_trt_backend(fake_gpu.bundle)
    with pytest.raises(UserError, match="--max-size / --max-batch"):
        backend.new_cache(3)
    with pytest.raises(UserError, match="--max-size"):
        backend.condition_tokens(np.zeros((1, 20, 16), np.int64))
    fake_gpu.cudart.fail_malloc = True
    with pytest.raises(cuda.CudaError, match="cudaMalloc failed: cudaErrorMemoryAllocation"):
        backend.new_cache(1)


def test_engines_for_another_gpu_or_damaged_plans_are_refused(fake_gpu):
    engines = build_engines(fake_gpu.bundle, precision="fp32", max_size=(24, 16), max_batch=2)
    (engines / "decoder.plan").write_bytes(b"garbage")
    with pytest.raises(UserError, match="decoder.plan: the engine file does not match.*taming-deploy build"):
        load_trt_backend(fake_gpu.bundle)
    engines = build_engines(fake_gpu.bundle, precision="fp32", max_size=(24, 16), max_batch=2)
    manifest = json.loads((engines / "engines.json").read_text())
    manifest["gpu"]["compute_capability"] = [9, 0]
    (engines / "engines.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"compute capability 9\.0.*rebuild"):
        load_trt_backend(fake_gpu.bundle)
