"""The TensorRT backend: a bundle's engines behind the sampler's Backend interface.

Each engine gets one execution context per optimisation profile (the transformer: prefill and
decode). Inputs are copied to device buffers, ``set_input_shape`` + ``set_tensor_address`` bind
them, ``execute_async_v3`` runs on one CUDA stream.

The transformer cache never leaves the GPU. A TrtCache owns one device buffer laid out (n_layer, 2,
batch, n_head, block_size, head_dim), as OrtCache.kv on the host; the engine's past_key_i /
past_value_i inputs are bound to addresses inside it (engines.buffers.past_offsets). The engine
reads the cache and returns only the fed tokens' keys and values (new_kv, into a per-cache buffer
with room for a whole block); one strided device-to-device copy (cudaMemcpy2DAsync,
engines.buffers.scatter_new_kv) then writes them into slots position..position+T-1. Per step only
the new tokens and the position go up, and only the last position's logits, (batch, vocab) floats,
come back. ``cache_view`` gives the sequences start..stop-1 of a cache as a cache of their own (past
inputs bound inside the same kv buffer, one scatter copy per layer and keys/values,
engines.buffers.scatter_new_kv_view): the sampler batches independent wavefront calls over one pool
this way, at most ``max_batch`` (the decode profile's) sequences a call. With a per-entry-position
graph (export/graphs.py) each sequence's position goes up, its new_kv lands at its own slots (one
copy per run of sequences at one position, per layer and keys/values:
engines.buffers.scatter_new_kv_entries), and a prefill (all positions 0) binds every past input to
one zero slot per sequence (past = 1) instead of the empty cache. Sampling stays on the host: it is a few microseconds for one row of logits, and keeping
it in NumPy keeps one sampler (one random number stream, one top-k/top-p code path) shared by all
backends, so a seed means the same thing everywhere.

With ``cuda_graph=True`` the engine execution of the decode step (T = 1) is captured once per cache
into a CUDA graph and replayed, which removes the per-kernel launch cost that dominates small decode
steps. Only the execution is captured: its addresses and shapes are fixed per cache and the position
is read from device memory, whereas the scatter copy's destination moves with the position, so the
copy is issued after each replay as an ordinary call on the same stream (one API call, instead of
updating a graph node every step). The decode context is shared by all caches. TensorRT documents
that enqueue must run once after an input shape change before a capture, not whether a graph stays
valid once its context has been bound to other addresses and run; so, conservatively, a cache's graph
is replayed only while the decode context's last ordinary run was for that same cache: the first
decode step of a cache, and the first after another cache used the decode context, run normally
(the first one is then captured). If capture fails the backend keeps running without graphs and
records why in ``cuda_graph_error``.
"""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from taming_deploy.engines import cuda, deps
from taming_deploy.cache_writes import check_fits, entry_positions
from taming_deploy.engines.buffers import scatter_new_kv_entries, step_buffers, view_past_offsets
from taming_deploy.engines.engine_manifest import EngineEntry, Environment, build_command, engines_dir, incompatibility, io_mismatch, read_engine_manifest
from taming_deploy.engines.profiles import (Profile, past_names, per_entry_positions, transformer_io_problem,
                                            transformer_profile_index, transformer_shapes)
from taming_deploy.bundle import Bundle
from taming_deploy.errors import UserError
from taming_deploy.fileutil import contained_path


@dataclass
class _Engine:
    name: str
    engine: Any  # tensorrt.ICudaEngine
    contexts: list[Any]  # tensorrt.IExecutionContext, one per profile, same order
    profiles: list[Profile]
    inputs: list[str]
    outputs: list[str]
    dtypes: dict[str, np.dtype]


@dataclass(eq=False)
class TrtCache:
    """A transformer cache for ``batch`` sequences, resident on the GPU: sequences start.. of a kv
    buffer laid out for ``kv_batch`` (a view shares its cache's buffers, see TrtBackend.cache_view)."""

    batch: int
    kv: cuda.DeviceBuffer  # (n_layer, 2, batch, n_head, block_size, head_dim): the engine reads it, the scatter writes it
    new_kv: cuda.DeviceBuffer  # the engine's new_kv output, room for T = block_size
    tokens: cuda.DeviceBuffer
    position: cuda.DeviceBuffer
    logits: cuda.DeviceBuffer
    logits_host: np.ndarray
    dtype: np.dtype  # of the cache and new_kv
    zero_slot: cuda.DeviceBuffer | None = None  # per-entry graphs: (batch, n_head, 1, head_dim) zeros, a prefill's past
    addresses: dict[str, int] = field(default_factory=dict)  # every transformer tensor -> its device address
    start: int = 0
    kv_batch: int = 0  # 0: batch
    graph: cuda.CudaGraph | None = None  # the captured decode-step execution, once there is one
    serial: int = field(default_factory=itertools.count().__next__)  # tells caches apart for the decode context


class TrtBackend:
    name = "trt"

    def __init__(self, bundle_dir: Path, cuda_graph: bool = False):
        bundle_dir = Path(bundle_dir)
        self.bundle = Bundle(bundle_dir)
        self.spec = self.bundle.spec
        manifest = read_engine_manifest(bundle_dir)  # before importing TensorRT: "no engines" is the likelier news
        trt = deps.tensorrt()
        gpu = cuda.device_info()
        current = Environment(trt.__version__, gpu.name, gpu.compute_capability)
        directory = engines_dir(bundle_dir)
        if reason := incompatibility(manifest, current, self.bundle.manifest):
            raise UserError(f"{directory}: {reason}; rebuild the engines with `{build_command(bundle_dir)}`")
        self.precision = manifest.precision
        self.cuda_graph = cuda_graph
        self.cuda_graph_error: str | None = None
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.stream = cuda.Stream()
        self._scratch: dict[str, cuda.DeviceBuffer] = {}
        self._decode_bound: int | None = None  # serial of the cache the decode context last ran for normally
        self.positions_per_entry = False  # the transformer graph's form (engines/profiles.py)
        if self.bundle.has_graph("transformer", self.precision):
            self.positions_per_entry = per_entry_positions(self.bundle.graph("transformer", self.precision))
            if reason := transformer_io_problem(self.bundle.graph("transformer", self.precision), self.spec):
                raise UserError(
                    f"{bundle_dir}: {reason}; export the bundle again with this taming-deploy, then rebuild the engines "
                    f"with `{build_command(bundle_dir)}`"
                )
        self._engines = {
            name: self._load(directory, name, entry)
            for name, entry in manifest.engines.items()
            if self.bundle.has_graph(name, self.precision)
        }

    # -- loading ---------------------------------------------------------------------------------

    def _load(self, directory: Path, name: str, entry: EngineEntry) -> _Engine:
        trt, path = self._trt, contained_path(directory, entry.file, str(directory / "engines.json"))
        rebuild = f"rebuild the engines with `{build_command(self.bundle.path)}`"
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UserError(f"{path}: cannot read the engine ({exc}); {rebuild}") from None
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise UserError(f"{path}: the engine file does not match engines.json (damaged or replaced); {rebuild}")
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise UserError(f"{path}: TensorRT could not load the engine (its log above says why); {rebuild}")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        if reason := io_mismatch([(n, is_input[n], dtypes[n].name) for n in names], self.bundle.graph(name, self.precision)):
            raise UserError(f"{path}: {reason}; {rebuild}")
        inputs = [n for n in names if is_input[n]]
        for n in inputs:
            if engine.is_shape_inference_io(n):
                raise UserError(f"{path}: input {n!r} is a shape tensor, which this runtime does not bind; {rebuild}")
        profiles = list(entry.profiles)
        if engine.num_optimization_profiles != len(profiles):
            raise UserError(f"{path}: the engine has {engine.num_optimization_profiles} profiles, engines.json lists {len(profiles)}; {rebuild}")
        contexts = []
        for index in range(len(profiles)):
            context = engine.create_execution_context()
            if context is None:
                raise UserError(f"{path}: TensorRT could not create an execution context (out of GPU memory?)")
            if not context.set_optimization_profile_async(index, self.stream.ptr):
                raise UserError(f"{path}: TensorRT could not select optimisation profile {index}")
            contexts.append(context)
        self.stream.synchronize()
        return _Engine(name, engine, contexts, profiles, inputs, [n for n in names if not is_input[n]], dtypes)

    # -- running ---------------------------------------------------------------------------------

    def _buffer(self, key: str, nbytes: int) -> cuda.DeviceBuffer:
        """A device buffer of at least ``nbytes`` for single-shot graphs, reused across calls."""
        buffer = self._scratch.get(key)
        if buffer is None or buffer.nbytes < nbytes:
            if buffer is not None:
                buffer.free()
            buffer = self._scratch[key] = cuda.DeviceBuffer(nbytes)
        return buffer

    def _set_shapes(self, engine: _Engine, profile_index: int, shapes: dict[str, tuple[int, ...]]) -> Any:
        context, profile = engine.contexts[profile_index], engine.profiles[profile_index]
        if reason := profile.violation(shapes):
            raise UserError(f"the {engine.name} engine cannot run this request: {reason}")
        for name, shape in shapes.items():
            if not context.set_input_shape(name, shape):
                raise UserError(f"the {engine.name} engine rejected the input shape {name}={shape}")
        return context

    @staticmethod
    def _bind(context: Any, name: str, addresses: dict[str, int]) -> None:
        for tensor, address in addresses.items():
            if not context.set_tensor_address(tensor, address):
                raise UserError(f"TensorRT refused the device address of {tensor!r} for the {name} engine")

    def _execute(self, context: Any, name: str) -> None:
        if not context.execute_async_v3(self.stream.ptr):
            raise UserError(f"TensorRT failed to run the {name} engine (its log above says why)")

    def _run_single(self, name: str, array: np.ndarray) -> np.ndarray:
        engine = self._engines[name]
        (input_name,), (output_name,) = engine.inputs, engine.outputs
        array = np.ascontiguousarray(array, dtype=engine.dtypes[input_name])
        context = self._set_shapes(engine, 0, {input_name: array.shape})
        out = np.empty(tuple(context.get_tensor_shape(output_name)), engine.dtypes[output_name])
        src = self._buffer(f"{name}/{input_name}", array.nbytes)
        dst = self._buffer(f"{name}/{output_name}", out.nbytes)
        cuda.copy_to_device(src, array, self.stream)
        self._bind(context, name, {input_name: src.ptr, output_name: dst.ptr})
        self._execute(context, name)
        cuda.copy_to_host(out, dst, self.stream)
        self.stream.synchronize()
        return out

    def condition_tokens(self, condition: np.ndarray) -> np.ndarray:
        if "cond_encoder" not in self._engines:
            raise UserError(f"{self.bundle.path}: this bundle has no condition encoder; do not pass --cond")
        return self._run_single("cond_encoder", condition).astype(np.int64, copy=False)

    def encode(self, images: np.ndarray) -> np.ndarray:
        return self._run_single("encoder", images).astype(np.int64, copy=False)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        return self._run_single("decoder", tokens.astype(np.int64)).astype(np.float32, copy=False)

    # -- the cached transformer ------------------------------------------------------------------

    @property
    def max_batch(self) -> int:
        """The most sequences one transformer call can take (the decode profile's largest batch)."""
        engine = self._engines["transformer"]
        return engine.profiles[transformer_profile_index(engine.profiles, 1)].shapes["tokens"].max[0]

    def _check_batch(self, batch: int) -> None:
        engine = self._engines["transformer"]
        decode = transformer_profile_index(engine.profiles, 1)
        if reason := engine.profiles[decode].violation(transformer_shapes(self.spec, batch, 1, self.positions_per_entry)):
            raise UserError(f"the transformer engine cannot take a batch of {batch}: {reason}")

    def new_cache(self, batch: int) -> TrtCache:
        """May hold more sequences than one call takes (max_batch): the sampler runs views of it."""
        engine = self._engines["transformer"]
        dtype = engine.dtypes[past_names(self.spec.n_layer)[0]]  # transformer_io_problem: every past input and new_kv
        sizes = step_buffers(self.spec, batch, dtype, engine.dtypes["logits"], self.positions_per_entry)
        buffers: dict[str, cuda.DeviceBuffer] = {}
        try:
            for key, nbytes in sizes.items():
                buffers[key] = cuda.DeviceBuffer(nbytes)
            # Zeros matter: slots past the position are masked out of the softmax, but garbage there
            # (NaN, inf) would still reach the output through 0 * NaN in the attention-weighted sum.
            cuda.fill_zero(buffers["kv"], self.stream)
            if "zero_slot" in buffers:
                cuda.fill_zero(buffers["zero_slot"], self.stream)
            self.stream.synchronize()
        except BaseException:  # out of memory half-way: give back what was allocated now, not at collection
            for buffer in buffers.values():
                buffer.free()
            raise
        kv = buffers["kv"]
        addresses = {name: kv.ptr + offset for name, offset in view_past_offsets(self.spec, batch, 0, dtype).items()}
        addresses.update({name: buffers[name].ptr for name in ("tokens", "position", "logits", "new_kv")})
        return TrtCache(
            batch=batch,
            kv=kv,
            new_kv=buffers["new_kv"],
            tokens=buffers["tokens"],
            position=buffers["position"],
            logits=buffers["logits"],
            logits_host=np.empty((batch, self.spec.vocab_size), engine.dtypes["logits"]),
            dtype=dtype,
            zero_slot=buffers.get("zero_slot"),
            addresses=addresses,
        )

    def cache_view(self, cache: TrtCache, start: int, stop: int) -> TrtCache:
        """Sequences start..stop-1 of ``cache``: the engine's past inputs are bound inside its kv
        buffer, and its token, position, logits and new_kv buffers (sized for all of its sequences)
        are shared, as a view runs on the same stream."""
        kv_batch = cache.kv_batch or cache.batch
        if not 0 <= start < stop <= kv_batch:
            raise ValueError(f"sequences {start}..{stop - 1} are not in a cache of {kv_batch}")
        self._check_batch(stop - start)
        addresses = dict(cache.addresses)
        offsets = view_past_offsets(self.spec, kv_batch, cache.start + start, cache.dtype)
        addresses.update({name: cache.kv.ptr + offset for name, offset in offsets.items()})
        logits_host = np.empty((stop - start, self.spec.vocab_size), cache.logits_host.dtype)
        return TrtCache(batch=stop - start, kv=cache.kv, new_kv=cache.new_kv, tokens=cache.tokens, position=cache.position,
                        logits=cache.logits, logits_host=logits_host, dtype=cache.dtype, zero_slot=cache.zero_slot,
                        addresses=addresses, start=cache.start + start, kv_batch=kv_batch)

    def transformer_step(self, tokens: np.ndarray, position: int | np.ndarray, cache: TrtCache) -> np.ndarray:
        """``position``: one for all sequences, or one per sequence (a per-entry graph only)."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        batch, count = tokens.shape
        if batch != cache.batch:
            raise ValueError(f"{batch} sequences fed to a cache made for {cache.batch}")
        positions = entry_positions(position, batch)
        check_fits(positions, count, self.spec.block_size)
        if not self.positions_per_entry and not (positions == positions[0]).all():
            raise ValueError(f"{self.bundle.path}: this bundle's transformer takes one position for the whole batch; export it again")
        engine = self._engines["transformer"]
        index = transformer_profile_index(engine.profiles, count)
        short = self.positions_per_entry and not positions.any()  # a prefill: one zero past slot per sequence
        addresses = cache.addresses
        if short:
            assert cache.zero_slot is not None
            addresses = {**addresses, **{name: cache.zero_slot.ptr for name in past_names(self.spec.n_layer)}}
        cuda.copy_to_device(cache.tokens, tokens, self.stream)
        cuda.copy_to_device(cache.position, positions if self.positions_per_entry else np.array(positions[0]), self.stream)
        use_graph = self.cuda_graph and count == 1 and not short
        replay = use_graph and cache.graph is not None and self._decode_bound == cache.serial
        if replay:
            cache.graph.launch()  # type: ignore[union-attr]
        else:
            decoding = count == 1
            if decoding:
                self._decode_bound = None  # the decode context is rebound below; valid again once it has run
            shapes = transformer_shapes(self.spec, batch, count, self.positions_per_entry, 1 if short else None)
            context = self._set_shapes(engine, index, shapes)
            self._bind(context, "transformer", addresses)
            self._execute(context, "transformer")
            if decoding and not short:
                self._decode_bound = cache.serial
        # the same stream orders the copy after the engine has read the cache and written new_kv
        for copy in scatter_new_kv_entries(self.spec, positions, count, cache.dtype, cache.kv_batch or batch, cache.start):
            cuda.copy_2d_on_device(cache.kv, copy.dst_offset, copy.dst_pitch, cache.new_kv, copy.src_pitch,
                                   copy.width, copy.height, self.stream, copy.src_offset)
        cuda.copy_to_host(cache.logits_host, cache.logits, self.stream)
        self.stream.synchronize()
        if use_graph and cache.graph is None:
            self._capture(engine.contexts[index], cache)
        return cache.logits_host.astype(np.float32)

    def _capture(self, context: Any, cache: TrtCache) -> None:
        """Capture the engine execution just run (same shapes, same addresses: this cache's) for
        replay by this cache's next decode steps. The scatter copy stays outside the graph."""
        try:
            cache.graph = cuda.CudaGraph(self.stream, lambda: self._execute(context, "transformer"))
        except UserError as exc:
            self.cuda_graph, self.cuda_graph_error = False, str(exc)


def load_trt_backend(bundle_dir: Path, cuda_graph: bool = False) -> TrtBackend:
    """The TensorRT backend of a bundle; UserError saying why (and what to do) when the engines are
    missing or stale, or TensorRT, cuda-python or the GPU are not usable."""
    return TrtBackend(bundle_dir, cuda_graph=cuda_graph)


def probe_trt_backend(bundle_dir: Path) -> tuple[TrtBackend | None, str | None]:
    """(backend, None) when the bundle's engines load here, else (None, the reason) - for
    ``--backend auto``, which falls back to ONNX Runtime and tells the user why."""
    try:
        return load_trt_backend(bundle_dir), None
    except UserError as exc:
        return None, str(exc)
    except Exception as exc:  # TensorRT's own errors (RuntimeError, ...): auto still falls back, with the cause
        return None, f"{type(exc).__name__}: {exc}"
