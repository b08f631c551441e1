"""The ONNX Runtime backend: the bundle's graphs on CPU (or CUDA with onnxruntime-gpu).

The transformer cache stays in two ONNX Runtime values that swap roles every step (the graph reads
one and writes the other through IOBinding), so it is never copied through numpy between steps.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from taming_deploy.bundle import Bundle, GraphFile
from taming_deploy.errors import UserError

ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64", "tensor(int32)": "int32"}


def session_options(threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # the graphs are chains; parallel mode only adds overhead
    options.intra_op_num_threads = threads or (os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


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
    """Two cache buffers: the graph reads ``current`` and writes ``spare``; then they swap."""

    current: ort.OrtValue
    spare: ort.OrtValue
    logits: ort.OrtValue


class OrtBackend:
    name = "ort"

    def __init__(self, bundle_dir: Path, precision: str = "fp32", threads: int | None = None, providers: list[str] | None = None):
        self.bundle = Bundle(bundle_dir)
        self.spec = self.bundle.spec
        self.precision = precision
        self.options = session_options(threads)
        self.providers = providers or ["CPUExecutionProvider"]
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self._sessions: dict[str, ort.InferenceSession] = {}
        self.cache_dtype = np.dtype(self.bundle.graph("transformer", precision).inputs[2].dtype)

    def session(self, name: str) -> ort.InferenceSession:
        if name not in self._sessions:
            entry = self.bundle.graph(name, self.precision)
            path = self.bundle.graph_path(name, self.precision)
            try:
                session = ort.InferenceSession(str(path), self.options, providers=self.providers)
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
        shape = self.spec.cache_shape(batch)
        zeros = lambda s, dtype: ort.OrtValue.ortvalue_from_numpy(np.zeros(s, dtype), self.device)  # noqa: E731
        return OrtCache(zeros(shape, self.cache_dtype), zeros(shape, self.cache_dtype), zeros((batch, self.spec.vocab_size), np.float32))

    def transformer_step(self, tokens: np.ndarray, position: int, cache: OrtCache) -> np.ndarray:
        session = self.session("transformer")
        binding = session.io_binding()
        binding.bind_cpu_input("tokens", np.ascontiguousarray(tokens, dtype=np.int64))
        binding.bind_cpu_input("position", np.array(position, dtype=np.int64))
        binding.bind_ortvalue_input("cache", cache.current)
        binding.bind_ortvalue_output("logits", cache.logits)
        binding.bind_ortvalue_output("new_cache", cache.spare)
        session.run_with_iobinding(binding)
        cache.current, cache.spare = cache.spare, cache.current
        return cache.logits.numpy().copy()  # numpy() is a view of the buffer the next step overwrites
