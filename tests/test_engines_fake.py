"""build.py and runtime.py driven end to end against in-memory stand-ins for TensorRT and the CUDA runtime.

The stand-ins implement only the calls the engines package makes, with the real signatures: engines/
sees the TensorRT one through tests/tensorrt_api.py's list, which test_tensorrt_bindings.py checks
against the real bindings, and the CUDA one is checked against cuda-python here. Device memory is host bytes, an "engine" is a small NumPy kernel. They cannot tell whether
TensorRT itself behaves as documented (the GPU tests do that); they check the logic around it: the
build writes what engines.json promises, only strong typing and no precision flag is used, the
timing cache is carried over, every CUDA status is checked, the transformer cache is one device
buffer whose per-layer slots are bound as the past inputs and into which each step's new_kv is
scattered by one strided copy (the fake engine never writes the cache), T = 1 runs on the decode
profile, and a CUDA-graph replay gives the same tokens.
"""
from __future__ import annotations

import ctypes
import enum
import gc
import hashlib
import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from taming_deploy.engines import build_engines, cuda, deps, load_trt_backend
from tensorrt_api import USED, Restricted, unwrap
from taming_deploy.bundle import GraphFile, Manifest, TensorSpec
from taming_deploy.cache_writes import entry_positions, write_new_kv
from taming_deploy.errors import UserError
from taming_deploy.sampler import sample_tokens
from taming_deploy.sampling import TokenStream
from taming_deploy.sampling import SamplingOptions
from taming_deploy.spec import ConditionSpec, ModelSpec

# two layers and two heads of head_dim 2: the per-layer offsets and the 2-D copy have rows to get wrong
SPEC = ModelSpec(downsample_factor=4, image_codebook_size=16, vocab_size=16, block_size=32, n_layer=2, n_head=2,
                 n_embd=4, condition=ConditionSpec("segmentation", codebook_size=16, n_labels=5), window=(3, 3))


class Status(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidPitchValue = 12


class FakeCudart:
    """cuda.bindings.runtime: (status, *results) tuples; device memory is a dict of bytearrays keyed
    by allocation address, and a pointer may point anywhere inside an allocation."""

    cudaError_t = Status
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3)
    cudaDeviceAttr = SimpleNamespace(cudaDevAttrMemoryClockRate="clock", cudaDevAttrGlobalMemoryBusWidth="bus")
    cudaStreamCaptureMode = SimpleNamespace(cudaStreamCaptureModeThreadLocal=2)
    OK = (Status.cudaSuccess,)

    def __init__(self) -> None:
        self.memory: dict[int, bytearray] = {}
        self.next_ptr = 1 << 16
        self.capturing: list | None = None
        self.launches = 0
        self.fail_malloc = False
        self.mallocs_left: int | None = None  # fail after this many more allocations
        self.fail_copy_2d = False
        self.copies: list[tuple] = []  # ("H2D" | "D2H", nbytes) and ("2D", dst, dpitch, src, spitch, width, height)

    def locate(self, ptr: int, nbytes: int) -> tuple[bytearray, int] | None:
        """The allocation holding [ptr, ptr + nbytes) and the offset of ptr in it, or None."""
        for base, block in self.memory.items():
            if base <= ptr and ptr + nbytes <= base + len(block):
                return block, ptr - base
        return None

    def array(self, ptr: int, dtype, shape) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        found = self.locate(ptr, nbytes)
        assert found is not None, f"{nbytes} bytes at {ptr:#x} are outside every allocation"
        block, offset = found
        return np.frombuffer(block, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)

    def cudaDriverGetVersion(self): return (Status.cudaSuccess, 12040)
    def cudaRuntimeGetVersion(self): return (Status.cudaSuccess, 12080)
    def cudaGetDeviceCount(self): return (Status.cudaSuccess, 1)
    def cudaGetDevice(self): return (Status.cudaSuccess, 0)
    def cudaGetDeviceProperties(self, device):
        return (Status.cudaSuccess, SimpleNamespace(name=b"Fake GPU\0\0\0", major=8, minor=6, totalGlobalMem=1 << 34))
    def cudaDeviceGetAttribute(self, attr, device): return (Status.cudaSuccess, {"clock": 1_000_000, "bus": 256}[attr])
    def cudaGetErrorName(self, error): return (Status.cudaSuccess, Status(error).name.encode())
    def cudaGetErrorString(self, error): return (Status.cudaSuccess, b"fake error")

    def cudaMalloc(self, size):
        if self.mallocs_left is not None:
            self.fail_malloc, self.mallocs_left = self.mallocs_left <= 0, self.mallocs_left - 1
        if self.fail_malloc:
            return (Status.cudaErrorMemoryAllocation, None)
        ptr, self.next_ptr = self.next_ptr, self.next_ptr + size + 256
        self.memory[ptr] = bytearray(b"\xff" * size)  # cudaMalloc does not clear memory: NaN until written
        return (Status.cudaSuccess, ptr)

    def cudaFree(self, devPtr):
        del self.memory[devPtr]
        return self.OK

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
            self.copies.append(("H2D", count))
            self.array(dst, np.uint8, (count,))[...] = np.frombuffer(ctypes.string_at(src, count), np.uint8)
        elif kind == self.cudaMemcpyKind.cudaMemcpyDeviceToHost:
            self.copies.append(("D2H", count))
            ctypes.memmove(dst, self.array(src, np.uint8, (count,)).tobytes(), count)
        else:
            return (Status.cudaErrorInvalidValue,)
        return self.OK

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        """The documented semantics: ``height`` rows of ``width`` bytes from src + r * spitch to
        dst + r * dpitch; width may not exceed either pitch."""
        if self.fail_copy_2d or kind != self.cudaMemcpyKind.cudaMemcpyDeviceToDevice:
            return (Status.cudaErrorInvalidValue,)
        if width > dpitch or width > spitch:
            return (Status.cudaErrorInvalidPitchValue,)
        extent = lambda pitch: (height - 1) * pitch + width  # noqa: E731
        if self.locate(dst, extent(dpitch)) is None or self.locate(src, extent(spitch)) is None:
            return (Status.cudaErrorInvalidValue,)  # a real GPU would write out of bounds; the fake refuses
        self.copies.append(("2D", dst, dpitch, src, spitch, width, height))

        def op():
            for r in range(height):
                self.array(dst + r * dpitch, np.uint8, (width,))[...] = self.array(src + r * spitch, np.uint8, (width,))
        if self.capturing is not None:
            self.capturing.append(op)
        else:
            op()
        return self.OK

    def cudaMemsetAsync(self, devPtr, value, count, stream):
        self.memory[devPtr][:count] = bytes([value]) * count
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
    def cudaGraphExecDestroy(self, graphExec): return self.OK

    def cudaGraphLaunch(self, graphExec, stream):
        self.launches += 1
        for op in graphExec:
            op()
        return self.OK


KV_SCALE = 1 + np.arange(SPEC.n_layer * 2 * SPEC.n_head * SPEC.head_dim).reshape(SPEC.n_layer, 2, SPEC.n_head, SPEC.head_dim)


def toy_step(tokens: np.ndarray, position, keys: list[np.ndarray], values: list[np.ndarray], dtype) -> tuple[np.ndarray, np.ndarray]:
    """A transformer stand-in with the graph's interface: per-layer past keys/values (B, H, S, D) ->
    logits (B, V) and the fed tokens' new_kv (L, 2, B, H, T, D). Token x's key/value entry (l, k, h, d)
    is x * KV_SCALE[l, k, h, d], a different multiple for every layer, kind, head and dim; the next
    token depends on every slot before ``position`` through sum(past * KV_SCALE * (slot + 1)), so a
    cache entry written to the wrong layer, kind, head, dim or slot changes the tokens (the pairing of
    KV_SCALE with itself is maximal only for the right arrangement). Slots at or past ``position`` are
    ignored, as the real graph masks them. ``position``: one for all entries, or (B,) one each."""
    b, t = tokens.shape
    new_kv = (tokens[None, None, :, None, :, None] * KV_SCALE[:, :, None, :, None, :]).astype(dtype)
    past = np.stack([np.stack((k, v)) for k, v in zip(keys, values)])  # (L, 2, B, H, S, D)
    score = np.zeros(b, np.int64)
    for e, p in enumerate(entry_positions(position, b).tolist()):
        seen = np.rint(past[:, :, e, :, :p].astype(np.float64)).astype(np.int64)
        score[e] = np.einsum("lkhsd,s,lkhd->", seen, np.arange(1, p + 1), KV_SCALE)
        score[e] += np.einsum("lkhtd,t,lkhd->", new_kv[:, :, e].astype(np.int64), np.arange(p + 1, p + t + 1), KV_SCALE)
    logits = np.zeros((b, SPEC.vocab_size), np.float32)
    logits[np.arange(b), score % SPEC.vocab_size] = 1.0
    return logits, new_kv


class ToyBackend:
    """The same toy model on the host with the ORT backend's cache handling: the oracle the TensorRT
    runtime is compared with."""

    name, spec = "toy", SPEC

    def __init__(self, dtype=np.float32, per_entry: bool = False):
        self.dtype, self.positions_per_entry = dtype, per_entry

    def condition_tokens(self, labels):
        return labels[:, :: SPEC.downsample_factor, :: SPEC.downsample_factor].astype(np.int64)

    def new_cache(self, batch):
        return np.zeros(SPEC.cache_shape(batch), self.dtype)

    def cache_view(self, cache, start, stop):
        return cache[:, :, start:stop]

    def transformer_step(self, tokens, position, cache):
        logits, new_kv = toy_step(tokens, position, list(cache[:, 0]), list(cache[:, 1]), self.dtype)
        write_new_kv(cache, new_kv, entry_positions(position, tokens.shape[0]))
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
        names = {t.name for t, _ in self.engine.tensors}
        dynamic = {t.name for t, is_input in self.engine.tensors if is_input and any(isinstance(a, str) for a in t.shape)}
        if set(self.addresses) != names or not dynamic <= set(self.shapes):
            return False  # TensorRT refuses to run with an unbound tensor or an unset input shape
        self.trt.executions.append((self.engine.graph.file, self.profile, dict(self.shapes)))
        op = self.engine.kernel(dict(self.shapes), dict(self.addresses))
        if self.trt.cudart.capturing is None:
            op()
            return True
        shapes, addresses = dict(self.shapes), dict(self.addresses)

        def replay():
            # the runtime's promise: a graph replays only while the context is as it was at capture
            assert (self.shapes, self.addresses) == (shapes, addresses), "graph replayed after its context was rebound"
            op()
        self.trt.cudart.capturing.append(replay)
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
            (b, t), layers = shapes["tokens"], SPEC.n_layer
            per_entry = self._spec("position")[0].shape == ("batch",)
            slots = shapes["past_key_0"] if per_entry else (b, SPEC.n_head, SPEC.block_size, SPEC.head_dim)
            assert slots[:2] == (b, SPEC.n_head) and 1 <= slots[2] <= SPEC.block_size and slots[3] == SPEC.head_dim
            assert shapes.get("position", ()) == ((b,) if per_entry else ())
            for i in range(layers):
                assert shapes[f"past_key_{i}"] == shapes[f"past_value_{i}"] == slots
            dtype = self.get_tensor_dtype("new_kv")

            def op():  # reads the past inputs, writes only logits and new_kv: never the cache
                tokens = mem.array(addresses["tokens"], np.int64, (b, t))
                position = mem.array(addresses["position"], np.int64, (b,) if per_entry else ()).copy()
                keys = [mem.array(addresses[f"past_key_{i}"], self.get_tensor_dtype(f"past_key_{i}"), slots).copy() for i in range(layers)]
                values = [mem.array(addresses[f"past_value_{i}"], self.get_tensor_dtype(f"past_value_{i}"), slots).copy() for i in range(layers)]
                logits, new_kv = toy_step(tokens, position, keys, values, dtype)
                mem.array(addresses["logits"], np.float32, logits.shape)[...] = logits
                mem.array(addresses["new_kv"], dtype, new_kv.shape)[...] = new_kv
            return op
        (src_name,), (dst_name,) = [t.name for t in self.graph.inputs], [t.name for t in self.graph.outputs]
        src_shape, dst_shape = shapes[src_name], self.output_shape(dst_name, shapes)

        def op():
            src = mem.array(addresses[src_name], self.get_tensor_dtype(src_name), src_shape)
            out = mem.array(addresses[dst_name], self.get_tensor_dtype(dst_name), dst_shape)
            f = SPEC.downsample_factor
            out[...] = src[:, ::f, ::f] if kind == "cond_encoder" else np.repeat(np.repeat(src, f, 1), f, 2)[:, None]
        return op


class FakeNetwork:
    """INetworkDefinition: the parsed graph's inputs."""

    def __init__(self) -> None:
        self.parsed: str | None = None
        self.inputs: list[SimpleNamespace] = []

    @property
    def num_inputs(self): return len(self.inputs)
    def get_input(self, index): return self.inputs[index]


class FakeTensorRT:
    """The tensorrt module, as far as engines/ uses it. engines/ sees it through tensorrt_api.Restricted:
    only the names tests/tensorrt_api.py lists, which tests/test_tensorrt_bindings.py finds in the real
    modules. ``shape_tensors``: inputs the parser reports as shape tensors; ``parse_errors``: what it rejects."""

    __version__ = "10.9.0.34"
    Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, min_severity: None})
    NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=1)  # the value in the 10.x enum
    MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")
    BuilderFlag = SimpleNamespace(TF32="tf32")
    TensorIOMode = SimpleNamespace(INPUT="in", OUTPUT="out")

    def __init__(self, cudart: FakeCudart, graphs: dict[str, GraphFile]):
        self.cudart, self.graphs = cudart, graphs
        self.configs: list[SimpleNamespace] = []
        self.network_flags: list[int] = []
        self.executions: list = []
        self.shape_tensors: set[str] = set()
        self.parse_errors: list[str] = []
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
                return FakeNetwork()
            def create_builder_config(self):
                config = Config(cleared=[], set_flags=[], profiles=[], builder_optimization_level=None)
                trt.configs.append(config)
                return config
            def create_optimization_profile(self): return Profile()
            def build_serialized_network(self, network, config):
                return json.dumps({"graph": network.parsed, "profiles": len(config.profiles)}).encode()

        class OnnxParser:
            def __init__(self, network, logger): self.network, self.num_errors = network, 0
            def parse_from_file(self, path):
                if trt.parse_errors:
                    self.num_errors = len(trt.parse_errors)
                    return False
                self.network.parsed = Path(path).name
                self.network.inputs = [SimpleNamespace(name=t.name, is_shape_tensor=t.name in trt.shape_tensors)
                                       for t in trt.graphs[self.network.parsed].inputs]
                return True
            def get_error(self, index): return trt.parse_errors[index]

        class Runtime:
            def __init__(self, logger): pass
            def deserialize_cuda_engine(self, data):
                plan = json.loads(bytes(data))
                return FakeEngine(trt.graphs[plan["graph"]], plan["profiles"], trt)

        self.Builder, self.OnnxParser, self.Runtime = Builder, OnnxParser, Runtime

    @staticmethod
    def nptype(dtype):
        return dtype


PAST = tuple(f"past_key_{i}" for i in range(SPEC.n_layer)) + tuple(f"past_value_{i}" for i in range(SPEC.n_layer))


def graph(name: str, precision: str = "fp32", per_entry: bool = False) -> GraphFile:
    """A graph's manifest entry with the I/O of export/graphs.py (the fp16 transformer: an fp16 cache;
    ``per_entry``: the transformer form with one position per entry and a dynamic past axis, else the
    shared-position form that bundles exported before have)."""
    t = TensorSpec
    f = "float16" if precision == "fp16" else "float32"
    slots = ("batch", SPEC.n_head, "past" if per_entry else SPEC.block_size, SPEC.head_dim)
    latent = ("batch", "latent_height", "latent_width")
    io = {
        "encoder": ((t("image", "float32", ("batch", 3, "height", "width")),), (t("indices", "int64", latent),)),
        "decoder": ((t("indices", "int64", latent),), (t("image", "float32", ("batch", 3, "height", "width")),)),
        "cond_encoder": ((t("labels", "int64", ("batch", "height", "width")),), (t("indices", "int64", latent),)),
        "transformer": ((t("tokens", "int64", ("batch", "tokens")), t("position", "int64", ("batch",) if per_entry else ()), *(t(n, f, slots) for n in PAST)),
                        (t("logits", "float32", ("batch", SPEC.vocab_size)),
                         t("new_kv", f, (SPEC.n_layer, 2, "batch", SPEC.n_head, "tokens", SPEC.head_dim)))),
    }[name]
    suffix = ".fp16" if precision == "fp16" else ""
    return GraphFile(f"{name}{suffix}.onnx", "", precision, *io)


@pytest.fixture(autouse=True)
def free_fake_device_memory_while_patched(monkeypatch):
    """Device buffers are freed by finalizers; collect them while the fake cudart is still in place
    (this fixture tears down before ``monkeypatch`` restores the real one)."""
    yield
    gc.collect()


def install_fake_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str = "fp32", per_entry: bool = False) -> SimpleNamespace:
    """A bundle of ``precision`` graphs (placeholder files), and the fake TensorRT + CUDA in place of the real ones."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    graphs = {}
    for name in ("encoder", "decoder", "cond_encoder", "transformer"):
        g = graph(name, precision, per_entry)
        text = f"graph {g.file}".encode()
        data = b"\x12" + bytes([len(text)]) + text  # a ModelProto holding only producer_name: the bundle reads it
        (bundle / g.file).write_bytes(data)
        graphs[g.file] = GraphFile(g.file, hashlib.sha256(data).hexdigest(), precision, g.inputs, g.outputs)
    manifest = Manifest(SPEC, {g.file.split(".")[0]: {precision: g} for g in graphs.values()})
    (bundle / "manifest.json").write_text(json.dumps(manifest.to_dict()))
    cudart = FakeCudart()
    trt = FakeTensorRT(cudart, graphs)
    used: set[tuple[str, str]] = set()
    monkeypatch.setattr(deps, "tensorrt", lambda: Restricted(trt, "", used))
    monkeypatch.setattr(deps, "cudart", lambda: cudart)
    return SimpleNamespace(bundle=bundle, trt=trt, cudart=cudart, precision=precision, used=used)


@pytest.fixture
def fake_gpu(tmp_path, monkeypatch):
    return install_fake_gpu(tmp_path, monkeypatch)


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
    assert fake_gpu.trt.network_flags == [1 << 1] * 4  # STRONGLY_TYPED (TensorRT 10.9)
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


def expected_replays(calls: list[tuple[int, int, object]]) -> int:
    """Decode steps that replay a graph, for (cache, tokens, position) calls in order: a cache's decode
    step replays once its graph exists and the decode context last ran (normally) for that cache."""
    bound, captured, replays = None, set(), 0
    for cache, count, _ in calls:
        if count != 1:
            continue  # prefills run on the other context
        if cache in captured and bound == cache:
            replays += 1
        else:
            bound = cache
            captured.add(cache)
    return replays


@pytest.mark.parametrize("latent", [(4, 6), (3, 3)])  # several placement caches; one window, many decode steps
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("cuda_graph", [False, True])
@pytest.mark.parametrize("per_entry", [False, True], ids=["shared-position", "per-entry"])
def test_generation_matches_the_host_model(tmp_path, monkeypatch, precision, cuda_graph, latent, per_entry):
    """Either graph form gives the tokens of the host model run one position per call."""
    fake_gpu = install_fake_gpu(tmp_path, monkeypatch, precision, per_entry)
    build_engines(fake_gpu.bundle, precision=precision, max_size=(24, 16), max_batch=2)
    backend = load_trt_backend(fake_gpu.bundle, cuda_graph=cuda_graph)
    labels = np.random.default_rng(1).integers(0, 5, (2, latent[0] * 4, latent[1] * 4))
    cond = backend.condition_tokens(labels)
    np.testing.assert_array_equal(cond, ToyBackend().condition_tokens(labels))
    calls = []  # (cache, tokens) per transformer call
    views = {}  # id -> the cache (view) itself
    step = backend.transformer_step
    backend.transformer_step = lambda tokens, position, cache: (views.setdefault(id(cache), cache), calls.append((id(cache), tokens.shape[1], position))) and step(tokens, position, cache)
    options = SamplingOptions(greedy=True)
    tokens, stats = sample_tokens(backend, cond, latent, options, TokenStream.for_batch(0, len(cond)))
    dtype = np.float16 if precision == "fp16" else np.float32
    expected, _ = sample_tokens(ToyBackend(dtype), cond, latent, options, TokenStream.for_batch(0, len(cond)))
    np.testing.assert_array_equal(tokens, expected)
    decode_calls = sum(count == 1 for _, count, _ in calls)
    assert decode_calls > 3 and len(calls) > decode_calls  # both profiles were exercised
    decoded_caches = {cache for cache, count, _ in calls if count == 1}
    assert len(decoded_caches) == (1 if latent == (3, 3) else 2)  # (4, 6): switching between caches is covered
    runs = [e for e in fake_gpu.trt.executions if e[0].startswith("transformer.")]
    assert all((profile == 1) == (shapes["tokens"][1] == 1) for _, profile, shapes in runs)  # T = 1 -> decode profile
    scatters = [c for c in fake_gpu.cudart.copies if c[0] == "2D"]
    whole = lambda c: (c.start, c.batch) == (0, c.kv_batch)  # noqa: E731
    # every call, replayed or not, writes its new keys and values: one copy for a whole cache, one per layer and K/V for a view
    # (per entry: one run of copies per run of entries at one position)
    runs_at = lambda p: 1 + int(np.count_nonzero(np.diff(np.asarray(p).reshape(-1)))) if np.ndim(p) else 1  # noqa: E731
    assert len(scatters) == sum(1 if whole(views[cache]) and runs_at(p) == 1 else 2 * SPEC.n_layer * runs_at(p) for cache, _, p in calls)
    if cuda_graph:
        assert backend.cuda_graph_error is None
        assert fake_gpu.cudart.launches == expected_replays(calls)
        if latent == (3, 3):
            assert fake_gpu.cudart.launches == decode_calls - 1  # all but the first (captured) step replay
        assert len(runs) == len(calls) - fake_gpu.cudart.launches + len(decoded_caches)  # + one capture per cache
    else:
        assert fake_gpu.cudart.launches == 0 and len(runs) == len(calls)
    image = backend.decode(tokens)
    assert image.dtype == np.float32 and image.shape == (2, 3, latent[0] * 4, latent[1] * 4)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_cache_is_one_device_buffer_that_each_step_scatters_into(tmp_path, monkeypatch, precision):
    fake_gpu = install_fake_gpu(tmp_path, monkeypatch, precision)
    build_engines(fake_gpu.bundle, precision=precision, max_size=(24, 16), max_batch=2)
    backend = load_trt_backend(fake_gpu.bundle)
    mem = fake_gpu.cudart
    allocations = len(mem.memory)
    cache = backend.new_cache(2)
    dtype = np.dtype(np.float16 if precision == "fp16" else np.float32)
    kv_shape = SPEC.cache_shape(2)
    assert len(mem.memory) - allocations == 5  # kv, new_kv, tokens, position, logits: no second cache
    assert len(mem.memory[cache.kv.ptr]) == np.prod(kv_shape) * dtype.itemsize
    assert len(mem.memory[cache.new_kv.ptr]) == np.prod(kv_shape) * dtype.itemsize  # room for T = block_size
    device_kv = mem.array(cache.kv.ptr, dtype, kv_shape)
    assert not device_kv.any()
    oracle, host = ToyBackend(dtype), ToyBackend(dtype).new_cache(2)
    rng = np.random.default_rng(3)
    position = 0
    for count in (5, 1, 1, 3, 1, 20, 1):  # up to the last slot
        feed = rng.integers(0, SPEC.vocab_size, (2, count))
        mem.copies.clear()
        logits = backend.transformer_step(feed, position, cache)
        np.testing.assert_array_equal(logits, oracle.transformer_step(feed, position, host))
        np.testing.assert_array_equal(device_kv, host)  # the device cache is the host cache, slot for slot
        row = SPEC.head_dim * dtype.itemsize
        assert mem.copies == [  # tokens and position up, one strided scatter, only the logits back
            ("H2D", feed.nbytes), ("H2D", 8),
            ("2D", cache.kv.ptr + position * row, SPEC.block_size * row, cache.new_kv.ptr, count * row, count * row,
             SPEC.n_layer * 2 * 2 * SPEC.n_head),
            ("D2H", 2 * SPEC.vocab_size * 4),
        ]
        position += count
    assert position == SPEC.block_size
    engine = backend._engines["transformer"]
    addresses = unwrap(engine.contexts[1]).addresses  # the decode context ran last
    block = 2 * SPEC.n_head * SPEC.block_size * SPEC.head_dim * dtype.itemsize
    for i in range(SPEC.n_layer):
        assert addresses[f"past_key_{i}"] == cache.kv.ptr + 2 * i * block
        assert addresses[f"past_value_{i}"] == cache.kv.ptr + (2 * i + 1) * block
    with pytest.raises(ValueError, match="block size"):
        backend.transformer_step(np.zeros((2, 2), np.int64), SPEC.block_size - 1, cache)


def test_a_view_runs_its_sequences_of_the_pool_and_leaves_the_others(fake_gpu):
    build_engines(fake_gpu.bundle, precision="fp32", max_size=(24, 16), max_batch=2)
    backend, oracle = load_trt_backend(fake_gpu.bundle), ToyBackend()
    pool, host = backend.new_cache(5), oracle.new_cache(5)
    device_kv = fake_gpu.cudart.array(pool.kv.ptr, np.float32, host.shape)
    rng = np.random.default_rng(6)
    for start, stop, position, count in [(1, 3, 0, 4), (3, 5, 0, 6), (1, 3, 4, 1), (2, 3, 5, 2), (3, 5, 6, 1)]:
        feed = rng.integers(0, SPEC.vocab_size, (stop - start, count))
        got = backend.transformer_step(feed, position, backend.cache_view(pool, start, stop))
        np.testing.assert_array_equal(got, oracle.transformer_step(feed, position, oracle.cache_view(host, start, stop)))
        np.testing.assert_array_equal(device_kv, host)  # only the view's sequences changed, slot for slot
    assert not device_kv[:, :, 0].any()
    with pytest.raises(ValueError, match="not in a cache of 5"):
        backend.cache_view(pool, 4, 6)


def test_per_entry_positions_scatter_each_sequence_at_its_own_slots_and_prefills_read_one_zero_slot(tmp_path, monkeypatch):
    fake_gpu = install_fake_gpu(tmp_path, monkeypatch, per_entry=True)
    build_engines(fake_gpu.bundle, precision="fp32", max_size=(24, 16), max_batch=4)
    backend, oracle = load_trt_backend(fake_gpu.bundle), ToyBackend(per_entry=True)
    assert backend.positions_per_entry
    mem = fake_gpu.cudart
    pool, host = backend.new_cache(4), oracle.new_cache(4)
    assert pool.zero_slot is not None and len(mem.memory[pool.zero_slot.ptr]) == 4 * SPEC.n_head * SPEC.head_dim * 4
    device_kv = mem.array(pool.kv.ptr, np.float32, host.shape)
    rng = np.random.default_rng(8)
    for start, count in [(0, 5), (1, 5), (2, 8), (3, 3)]:  # prefills of one sequence each
        feed = rng.integers(0, SPEC.vocab_size, (1, count))
        got = backend.transformer_step(feed, 0, backend.cache_view(pool, start, start + 1))
        np.testing.assert_array_equal(got, oracle.transformer_step(feed, 0, oracle.cache_view(host, start, start + 1)))
        _, profile, shapes = fake_gpu.trt.executions[-1]
        assert profile == 0 and shapes["past_key_0"] == (1, SPEC.n_head, 1, SPEC.head_dim)  # one slot, not the block
        assert unwrap(backend._engines["transformer"].contexts[0]).addresses["past_value_1"] == pool.zero_slot.ptr
    np.testing.assert_array_equal(device_kv, host)
    positions = np.array([5, 5, 8, 3])  # three runs of sequences at one position
    for count in (1, 2):
        feed = rng.integers(0, SPEC.vocab_size, (4, count))
        mem.copies.clear()
        got = backend.transformer_step(feed, positions, pool)
        np.testing.assert_array_equal(got, oracle.transformer_step(feed, positions, host))
        np.testing.assert_array_equal(device_kv, host)  # each sequence's keys and values at its own slots
        assert sum(c[0] == "2D" for c in mem.copies) == 3 * 2 * SPEC.n_layer
        assert ("H2D", 4 * 8) in mem.copies  # the four positions go up
        _, profile, shapes = fake_gpu.trt.executions[-1]
        assert shapes["position"] == (4,) and shapes["past_key_0"] == (4, SPEC.n_head, SPEC.block_size, SPEC.head_dim)
        positions = positions + count


def test_replayed_decode_steps_scatter_at_their_own_position(fake_gpu):
    """The graph holds only the engine execution: the copy issued after each replay follows the position."""
    build_engines(fake_gpu.bundle, precision="fp32", max_size=(24, 16), max_batch=2)
    backend = load_trt_backend(fake_gpu.bundle, cuda_graph=True)
    oracle = ToyBackend()
    caches = [backend.new_cache(1), backend.new_cache(1)]
    hosts = [oracle.new_cache(1), oracle.new_cache(1)]
    rng = np.random.default_rng(5)
    for k in range(2):
        feed = rng.integers(0, SPEC.vocab_size, (1, 4))
        backend.transformer_step(feed, 0, caches[k])
        oracle.transformer_step(feed, 0, hosts[k])
    # interleaved decode steps on two caches: each switch must run normally before its graph replays again
    for position, k in [(4, 0), (5, 0), (6, 0), (4, 1), (5, 1), (7, 0), (8, 0), (6, 1)]:
        token = rng.integers(0, SPEC.vocab_size, (1, 1))
        np.testing.assert_array_equal(backend.transformer_step(token, position, caches[k]), oracle.transformer_step(token, position, hosts[k]))
        np.testing.assert_array_equal(fake_gpu.cudart.array(caches[k].kv.ptr, np.float32, hosts[k].shape), hosts[k])
    assert backend.cuda_graph_error is None
    assert fake_gpu.cudart.launches == 4  # (5, 0), (6, 0), (5, 1) and (8, 0); the others ran normally (and captured)


def test_old_interface_bundles_are_refused_with_what_to_do(fake_gpu):
    engines = build_engines(fake_gpu.bundle, precision="fp32", max_size=(24, 16), max_batch=2)
    path = fake_gpu.bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    transformer = manifest["graphs"]["transformer"]["fp32"]
    cache = [SPEC.n_layer, 2, "batch", SPEC.n_head, SPEC.block_size, SPEC.head_dim]
    transformer["inputs"] = [*transformer["inputs"][:2], {"name": "cache", "dtype": "float32", "shape": cache}]
    transformer["outputs"] = [transformer["outputs"][0], {"name": "new_cache", "dtype": "float32", "shape": cache}]
    path.write_text(json.dumps(manifest))  # a bundle exported before per-layer past inputs (same graph file)
    with pytest.raises(UserError, match=r"'cache'.*export the bundle again.*taming-deploy build"):
        load_trt_backend(fake_gpu.bundle)
    before = (engines / "engines.json").read_text()
    with pytest.raises(UserError, match=r"'cache'.*export the bundle again"):
        build_engines(fake_gpu.bundle, precision="fp32", max_size=(24, 16), max_batch=2)
    assert (engines / "engines.json").read_text() == before
    assert fake_gpu.trt.configs and len(fake_gpu.trt.network_flags) == 4  # the refused build parsed nothing


def test_requests_beyond_the_profiles_and_cuda_failures_are_user_errors(fake_gpu):
    build_engines(fake_gpu.bundle, precision="fp32", max_size=(24, 16), max_batch=2)
    backend = load_trt_backend(fake_gpu.bundle)
    with pytest.raises(UserError, match="--max-size / --max-batch"):
        backend.transformer_step(np.zeros((3, 1), np.int64), 0, backend.new_cache(3))
    with pytest.raises(UserError, match="cannot take a batch of 3.*--max-batch"):
        backend.cache_view(backend.new_cache(4), 0, 3)
    assert backend.max_batch == 2
    with pytest.raises(UserError, match="--max-size"):
        backend.condition_tokens(np.zeros((1, 20, 16), np.int64))
    cache = backend.new_cache(1)
    fake_gpu.cudart.fail_copy_2d = True
    with pytest.raises(cuda.CudaError, match=r"cudaMemcpy2DAsync\(D2D\) failed: cudaErrorInvalidValue"):
        backend.transformer_step(np.zeros((1, 3), np.int64), 0, cache)
    allocations = len(fake_gpu.cudart.memory)
    fake_gpu.cudart.mallocs_left = 2  # out of memory at the third of a cache's buffers
    with pytest.raises(cuda.CudaError, match="cudaMalloc failed: cudaErrorMemoryAllocation"):
        backend.new_cache(1)
    assert len(fake_gpu.cudart.memory) == allocations  # the two it got were given back at once
    fake_gpu.cudart.mallocs_left = None
    fake_gpu.cudart.fail_malloc = True
    with pytest.raises(cuda.CudaError, match="cudaMalloc failed: cudaErrorMemoryAllocation"):
        backend.new_cache(1)


def test_the_2d_copy_refuses_rows_outside_its_buffers(fake_gpu):
    stream = cuda.Stream()
    dst, src = cuda.DeviceBuffer(64), cuda.DeviceBuffer(32)
    cuda.copy_2d_on_device(dst, 8, 16, src, 8, 8, 4, stream)  # last row ends at 8 + 3 * 16 + 8 = 64: fits
    for args in [(dst, 9, 16, src, 8, 8, 4), (dst, 0, 16, src, 8, 8, 5), (dst, 0, 8, src, 4, 8, 2), (src, 0, 8, src, 8, 8, 1)]:
        with pytest.raises(ValueError):
            cuda.copy_2d_on_device(*args, stream)


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


def test_parser_errors_and_shape_tensor_inputs_are_user_errors(fake_gpu):
    fake_gpu.trt.shape_tensors = {"position"}
    with pytest.raises(UserError, match=r"transformer.onnx: input 'position' is used as a shape tensor"):
        build_engines(fake_gpu.bundle, precision="fp32", max_size=(24, 16), max_batch=2)
    fake_gpu.trt.parse_errors = ["In node 3 (Foo):  UNSUPPORTED_NODE:\n  no importer", "second"]
    with pytest.raises(UserError, match=r"TensorRT 10.9.0.34's ONNX parser rejected the graph: In node 3 \(Foo\): "
                                        r"UNSUPPORTED_NODE: no importer; second$"):
        build_engines(fake_gpu.bundle, precision="fp32", max_size=(24, 16), max_batch=2)


def test_strongly_typed_is_set_on_tensorrt_10_only(fake_gpu):
    fake_gpu.trt.__version__ = "11.4.0.106"  # 11.x: the flag is deprecated and ignored
    build_engines(fake_gpu.bundle, precision="fp32", max_size=(24, 16), max_batch=2)
    assert fake_gpu.trt.network_flags == [0] * 4


def test_engines_uses_every_name_of_the_tensorrt_list(fake_gpu):
    """tests/tensorrt_api.py is what engines/ uses: the stand-in refuses anything else (Restricted),
    and a build (with its failures), a load and a generation with CUDA graphs use every entry."""
    for problem in ("shape_tensors", "parse_errors"):
        setattr(fake_gpu.trt, problem, ["x"] if problem == "parse_errors" else {"position"})
        with pytest.raises(UserError):
            build_engines(fake_gpu.bundle, precision="fp32", max_size=(24, 16), max_batch=2)
        setattr(fake_gpu.trt, problem, type(getattr(fake_gpu.trt, problem))())
    build_engines(fake_gpu.bundle, precision="fp32", max_size=(24, 16), max_batch=2)
    backend = load_trt_backend(fake_gpu.bundle, cuda_graph=True)
    cond = backend.condition_tokens(np.zeros((1, 12, 12), np.int64))
    tokens, _ = sample_tokens(backend, cond, (3, 3), SamplingOptions(greedy=True), TokenStream.for_batch(0, len(cond)))
    backend.decode(tokens)
    listed = {(kind, name) for kind, members in USED.items() for name in members}
    assert fake_gpu.used == listed


def test_the_cuda_stand_in_has_only_real_cuda_python_names():
    """Every cuda* function of FakeCudart exists in cuda.bindings.runtime with the same parameters,
    every enum member it offers is a real member, and the device properties it returns are real fields."""
    from cuda.bindings import runtime

    names = [n for n in dir(FakeCudart) if n.startswith("cuda")]
    assert len(names) > 20
    for name in names:
        fake, real = getattr(FakeCudart, name), getattr(runtime, name)
        if inspect.isfunction(fake):
            assert list(inspect.signature(fake).parameters)[1:] == list(inspect.signature(real).parameters), name
        else:
            members = fake.__members__ if isinstance(fake, enum.EnumMeta) else vars(fake)
            assert set(members) <= set(real.__members__), name
    _, props = FakeCudart().cudaGetDeviceProperties(0)
    assert all(hasattr(runtime.cudaDeviceProp(), field) for field in vars(props))
