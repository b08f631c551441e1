"""Alternatives to the runtime's ONNX Runtime step, measured by step_profile.py (not used by the runtime).

The split cache (one graph returning only the fed tokens' keys/values, per-layer past inputs bound
once) and the placement reuse across rows, prototyped here before, are now the runtime
(taming_deploy/backends/ort_backend.py, taming_deploy/sampler.py). What is left:

- ``tuned_session_options``: the runtime's session options plus the knobs tried (spinning, memory
  pattern, arena);
- ``BoundOrtBackend``: the runtime's backend, same graph and cache, with nothing bound per step but
  what changed: the token and position inputs are preallocated OrtValues refreshed in place
  (``update_inplace``) and single-token steps write ``new_kv`` into a preallocated bound array,
  instead of binding copies of the inputs and letting ONNX Runtime allocate ``new_kv`` every call.
- ``PrefillGraphOrtBackend``: the runtime's backend, except that calls at position 0 run a second
  graph without past inputs (the model's own no-cache forward, ``gpt(tokens, last_only=True)``:
  causal attention over the fed tokens only), exported here from the checkpoint. The runtime's one
  graph makes a prefill of T tokens also score, mask (Where), concatenate, softmax and weight the
  S = block size past slots, every one of them masked at position 0.

- ``SharedPositionOrtBackend`` / ``SharedPositionTorchBackend``: what bundles exported before the
  per-entry-position graph cost, run on today's graph: one position per call (so the sampler groups
  calls by position and length), and prefills read the whole empty cache (block size past slots).

All of them implement the Backend protocol, so the unchanged ``taming_deploy.sampler.sample_tokens`` runs them
and the results can be compared token for token.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from taming_deploy.backends.ort_backend import OrtBackend, OrtCache, providers, session_options
from taming_deploy.cache_writes import entry_positions, write_new_kv


def tuned_session_options(threads: int | None, spinning: bool = True, memory_pattern: bool = True,
                          arena: bool = True) -> ort.SessionOptions:
    """The runtime's options (taming_deploy.backends.ort_backend.session_options) plus the knobs tried here."""
    options = session_options(threads)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.enable_mem_pattern = memory_pattern
    options.enable_cpu_mem_arena = arena
    return options


@dataclass
class BoundCache(OrtCache):
    """The runtime's cache (kv, binding with the past inputs and logits bound) plus preallocated inputs."""

    tokens: ort.OrtValue = None  # type: ignore[assignment]  # (N, 1) int64, bound while single tokens are fed
    position: ort.OrtValue = None  # type: ignore[assignment]  # () or (N,) int64 (the graph's form), always bound
    new_kv: np.ndarray = None  # type: ignore[assignment]  # (L, 2, N, H, 1, D): single-token steps' output
    single_bound: bool = True  # ``tokens`` and ``new_kv`` are the bound ones (else a multi-token call's)


class BoundOrtBackend(OrtBackend):
    """OrtBackend whose transformer_step binds nothing per single-token step."""

    name = "ort-bound"

    def __init__(self, bundle_dir: Path, options: ort.SessionOptions | None = None, **kwargs):
        super().__init__(bundle_dir, **kwargs)
        if options is not None:
            self.options = options

    def new_cache(self, batch: int) -> BoundCache:
        return self._preallocated(super().new_cache(batch))

    def cache_view(self, cache: BoundCache, start: int, stop: int) -> BoundCache:
        return self._preallocated(super().cache_view(cache, start, stop))

    def _preallocated(self, base: OrtCache) -> BoundCache:
        spec, batch = self.spec, base.kv.shape[2]
        tokens = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, 1), np.int64))
        position = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch,) if self.positions_per_entry else (), np.int64))
        new_kv = np.zeros((spec.n_layer, 2, batch, spec.n_head, 1, spec.head_dim), self.cache_dtype)
        base.binding.bind_ortvalue_input("tokens", tokens)
        base.binding.bind_ortvalue_input("position", position)
        base.binding.bind_ortvalue_output("new_kv", ort.OrtValue.ortvalue_from_numpy(new_kv))
        return BoundCache(base.kv, base.binding, base.logits, tokens=tokens, position=position, new_kv=new_kv)

    def transformer_step(self, tokens: np.ndarray, position: int, cache: BoundCache) -> np.ndarray:
        binding, t = cache.binding, tokens.shape[1]
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        if t == 1:
            cache.tokens.update_inplace(tokens)
            if not cache.single_bound:
                binding.bind_ortvalue_input("tokens", cache.tokens)
                binding.bind_ortvalue_output("new_kv", ort.OrtValue.ortvalue_from_numpy(cache.new_kv))
                cache.single_bound = True
        else:
            binding.bind_cpu_input("tokens", tokens)
            binding.bind_output("new_kv", "cpu")  # T slots: ONNX Runtime allocates
            cache.single_bound = False
        positions = entry_positions(position, tokens.shape[0])
        cache.position.update_inplace(positions if self.positions_per_entry else np.array(positions[0]))
        self.session("transformer").run_with_iobinding(binding)
        new_kv = cache.new_kv if t == 1 else binding.get_outputs()[1].numpy()
        write_new_kv(cache.kv, new_kv, positions)
        return cache.logits.copy()


class SharedPositionOrtBackend(OrtBackend):
    """OrtBackend on a per-entry-position bundle, run as the shared-position form ran: the sampler
    sees one position per call, and prefills are bound to the whole (empty) cache."""

    name = "ort-shared"

    def __init__(self, bundle_dir: Path, **kwargs):
        super().__init__(bundle_dir, **kwargs)
        assert self.positions_per_entry, "a bundle of the per-entry-position form"
        self.positions_per_entry = False  # what the sampler reads

    def transformer_step(self, tokens: np.ndarray, position: int, cache: OrtCache) -> np.ndarray:
        positions = entry_positions(position, tokens.shape[0])
        binding = cache.binding
        binding.bind_cpu_input("position", positions)
        binding.bind_cpu_input("tokens", np.ascontiguousarray(tokens, dtype=np.int64))
        binding.bind_output("new_kv", "cpu")
        self.session("transformer").run_with_iobinding(binding)
        write_new_kv(cache.kv, binding.get_outputs()[1].numpy(), positions)
        return cache.logits.copy()


def shared_position_torch_backend(checkpoint: Path):
    """The torch backend run as the shared-position form ran (see SharedPositionOrtBackend)."""
    import torch

    from taming_deploy.backends.torch_backend import TorchBackend

    class SharedPositionTorchBackend(TorchBackend):
        name = "torch-shared"
        positions_per_entry = False

        @torch.no_grad()
        def transformer_step(self, tokens: np.ndarray, position: int, cache: torch.Tensor) -> np.ndarray:
            gpt = self.model.transformer
            positions = entry_positions(position, tokens.shape[0])
            past = [(layer[0], layer[1]) for layer in cache]
            logits, new_kv = gpt(self._tensor(tokens), past, torch.from_numpy(positions), last_only=True)
            write_new_kv(cache, new_kv, positions)
            return logits.float().numpy()

    return SharedPositionTorchBackend.load(checkpoint)


def prefill_module(gpt):
    """Over ``gpt``'s own parameters: tokens (B, T) at positions 0..T-1 -> (logits of the last position,
    new_kv (L, 2, B, H, T, D)): the model's no-cache forward."""
    from torch import nn

    class Prefill(nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = gpt

        def forward(self, tokens):
            return self.gpt(tokens, None, None, last_only=True)

    return Prefill()


def export_prefill_graph(checkpoint: Path, path: Path) -> None:
    import torch

    from taming_deploy.export.graphs import GraphDef
    from taming_deploy.export.onnx_export import export_graph
    from taming_deploy.training.checkpoint import load_model

    model = load_model(checkpoint)
    spec = model.config.spec()
    batch = torch.export.Dim("batch", min=1, max=1024)
    fed = torch.export.Dim("tokens", min=2, max=spec.block_size)
    axes = {"tokens": ("batch", "tokens"), "logits": ("batch", spec.vocab_size),
            "new_kv": (spec.n_layer, 2, "batch", spec.n_head, "tokens", spec.head_dim)}
    graph = GraphDef("transformer_prefill", prefill_module(model.transformer), (torch.randint(0, spec.vocab_size, (2, 7)),),
                     ("tokens",), ("logits", "new_kv"), {"tokens": {0: batch, 1: fed}}, axes)
    partial = path.with_suffix(".partial")
    export_graph(graph, partial)
    partial.rename(path)


def cached_prefill_graph(checkpoint: Path, cache: Path) -> Path:
    """The prefill graph of a checkpoint, exported once into the benchmarks' cache."""
    from benchlib import checkpoint_key, note

    path = cache / f"prefill-{checkpoint_key(checkpoint)}.onnx"
    if not path.is_file():
        note(f"exporting the prefill graph to {path} (once) ...")
        export_prefill_graph(checkpoint, path)
    return path


class PrefillGraphOrtBackend(OrtBackend):
    """OrtBackend whose calls at position 0 run the prefill graph (no past inputs) and write its new_kv
    into the cache; every other call is the runtime's."""

    name = "ort-prefill"

    def __init__(self, bundle_dir: Path, prefill_graph: Path, **kwargs):
        super().__init__(bundle_dir, **kwargs)
        self.prefill_path = prefill_graph
        self._prefill: ort.InferenceSession | None = None

    def prefill_session(self) -> ort.InferenceSession:
        if self._prefill is None:
            self._prefill = ort.InferenceSession(str(self.prefill_path), self.options, providers=providers())
        return self._prefill

    def transformer_step(self, tokens: np.ndarray, position: int, cache: OrtCache) -> np.ndarray:
        if np.any(position) or tokens.shape[1] < 2:
            return super().transformer_step(tokens, position, cache)
        logits, new_kv = self.prefill_session().run(None, {"tokens": np.ascontiguousarray(tokens, dtype=np.int64)})
        cache.kv[:, :, :, :, : tokens.shape[1]] = new_kv
        return logits
