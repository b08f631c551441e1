"""The ONNX Runtime backend: the bundle's graphs on CPU (or CUDA where onnxruntime-gpu can).

The transformer cache is one array; ONNX Runtime values wrapping each layer's key and value slots
(no copy) are bound to the graph once per cache. Each step binds only the new tokens and the
position, and afterwards writes the fed tokens' keys and values (the graph's ``new_kv``) into their
slots: the only cache traffic is the T new rows. With a graph that takes one position per entry
(export/graphs.py), a prefill (every entry at position 0) runs on a second binding whose past inputs
are one zero slot, so it reads nothing of the empty cache.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from taming_deploy.bundle import Bundle, GraphFile
from taming_deploy.cache_writes import check_fits, entry_positions, write_new_kv
from taming_deploy.engines.profiles import per_entry_positions
from taming_deploy.errors import UserError

ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64", "tensor(int32)": "int32"}


def session_options(threads: int | None, prepack_weights: bool = True) -> ort.SessionOptions:
    """``prepack_weights``: let the CPU kernels keep a packed copy of each MatMul weight (faster; the
    copy doubles the weights' memory beside the file-backed pages of an external data file)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # the graphs are chains; parallel mode only adds overhead
    options.intra_op_num_threads = threads or (os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not prepack_weights:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def providers() -> list[str]:
    """CUDA when onnxruntime-gpu can use it (the cache then crosses to the device each step; TensorRT
    engines keep it there), else the CPU."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def check_io(session: ort.InferenceSession, entry: GraphFile) -> None:
    """Refuse a graph whose inputs/outputs disagree with the manifest."""
    for kind, actual, declared in (
        ("input", session.get_inputs(), entry.inputs),
        ("output", session.get_outputs(), entry.outputs),
    ):
        got = [(t.name, ORT_DTYPES.get(t.type, t.type)) for t in actual]
        want = [(t.name, t.dtype) for t in declared]
        if got != want:
            raise UserError(f"{entry.file}: graph {kind}s {got} disagree with the manifest's {want}; export the bundle again")


@dataclass
class OrtCache:
    kv: np.ndarray  # (n_layer, 2, B, n_head, block_size, head_dim); the graph reads it, the step writes it
    binding: ort.IOBinding  # past_key_i / past_value_i bound to views of ``kv``, outputs to ``logits`` and new_kv
    logits: np.ndarray  # (B, vocab) float32
    prefill: ort.IOBinding | None = None  # per-entry graphs: the past inputs bound to one zero slot, made when first used


class OrtBackend:
    name = "ort"

    def __init__(self, bundle_dir: Path, precision: str = "fp32", threads: int | None = None, prepack_weights: bool = True):
        self.bundle = Bundle(bundle_dir)
        self.spec = self.bundle.spec
        self.precision = precision
        self.options = session_options(threads, prepack_weights)
        self._sessions: dict[str, ort.InferenceSession] = {}
        transformer = self.bundle.graph("transformer", precision)
        self.cache_dtype = np.dtype(transformer.inputs[2].dtype)
        self.positions_per_entry = per_entry_positions(transformer)  # else one position for the whole batch

    def session(self, name: str) -> ort.InferenceSession:
        if name not in self._sessions:
            entry = self.bundle.graph(name, self.precision)
            path = self.bundle.graph_path(name, self.precision)
            try:
                session = ort.InferenceSession(str(path), self.options, providers=providers())
            except Exception as exc:  # ORT raises its own exception types for unloadable graphs
                raise UserError(f"{path}: ONNX Runtime cannot load this graph ({exc})") from None
            check_io(session, entry)
            self._sessions[name] = session
        return self._sessions[name]

    def _run_single(self, name: str, array: np.ndarray) -> np.ndarray:
        session = self.session(name)
        return session.run(None, {session.get_inputs()[0].name: array})[0]

    def condition_tokens(self, condition: np.ndarray) -> np.ndarray:
        if not self.bundle.has_graph("cond_encoder", self.precision):
            raise UserError(f"{self.bundle.path}: this bundle has no condition encoder; do not pass --cond")
        return self._run_single("cond_encoder", condition)

    def encode(self, images: np.ndarray) -> np.ndarray:
        return self._run_single("encoder", images.astype(np.float32))

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        return self._run_single("decoder", tokens.astype(np.int64)).astype(np.float32)

    def new_cache(self, batch: int) -> OrtCache:
        return self._bound_cache(np.zeros(self.spec.cache_shape(batch), self.cache_dtype))

    def cache_view(self, cache: OrtCache, start: int, stop: int) -> OrtCache:
        return self._bound_cache(cache.kv[:, :, start:stop])  # each layer's keys/values stay contiguous

    def _bound_cache(self, kv: np.ndarray) -> OrtCache:
        logits = np.zeros((kv.shape[2], self.spec.vocab_size), np.float32)
        return OrtCache(kv, self._binding(kv, logits), logits)

    def _binding(self, kv: np.ndarray, logits: np.ndarray) -> ort.IOBinding:
        binding = self.session("transformer").io_binding()
        for layer in range(self.spec.n_layer):
            binding.bind_ortvalue_input(f"past_key_{layer}", ort.OrtValue.ortvalue_from_numpy(kv[layer, 0]))
            binding.bind_ortvalue_input(f"past_value_{layer}", ort.OrtValue.ortvalue_from_numpy(kv[layer, 1]))
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        return binding

    def transformer_step(self, tokens: np.ndarray, position: int | np.ndarray, cache: OrtCache) -> np.ndarray:
        """``position``: one for all entries, or one per entry (a per-entry graph only)."""
        positions = entry_positions(position, tokens.shape[0])
        check_fits(positions, tokens.shape[1], self.spec.block_size)
        binding = cache.binding
        if self.positions_per_entry:
            if not positions.any():
                if cache.prefill is None:
                    cache.prefill = self._binding(np.zeros((*cache.kv.shape[:4], 1, cache.kv.shape[5]), cache.kv.dtype), cache.logits)
                binding = cache.prefill
            binding.bind_cpu_input("position", positions)
        elif (positions == positions[0]).all():
            binding.bind_cpu_input("position", np.array(positions[0]))
        else:
            raise ValueError(f"{self.bundle.path}: this bundle's transformer takes one position for the whole batch; export it again")
        binding.bind_cpu_input("tokens", np.ascontiguousarray(tokens, dtype=np.int64))
        binding.bind_output("new_kv", "cpu")  # its shape follows T: let ONNX Runtime allocate it per call
        self.session("transformer").run_with_iobinding(binding)
        write_new_kv(cache.kv, binding.get_outputs()[1].numpy(), positions)
        return cache.logits.copy()  # the next step overwrites the bound buffer
