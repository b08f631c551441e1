"""Prototypes of hot-loop changes, measured by step_profile.py and sampler_speed.py (not used by the runtime).

Each prototype implements the Backend protocol (or the sampler's signature), so the unchanged
``taming_deploy.sampler.sample_tokens`` runs it and the results can be compared token for token.

- ``BoundOrtBackend``: the bundle's graph, unchanged, with the IOBinding made once per cache buffer
  instead of once per step: the cache and output buffers stay bound, the token and position inputs
  are preallocated OrtValues refreshed in place (``update_inplace``), logits land in a numpy array
  bound as the output.
- ``SplitCacheOrtBackend``: two variant transformer graphs (exported here from the checkpoint's own
  weights) that return only the fed tokens' new K/V slots, (n_layer, 2, B, n_head, T, head_dim),
  which the host writes into one numpy cache. The step graph takes each layer's K and V cache as
  separate read-only inputs (bound once, shared memory) and splits attention into the cache part
  (slots before ``position``) and the fed part (causal), softmaxed jointly: no full-cache
  Where/Concat/Split copies per step. The prefill graph (position 0) has no cache input at all:
  plain causal attention over the fed tokens with an additive mask.
- ``sample_tokens_reusing``: the sampler keeping one cache per window column offset and continuing
  it across rows while the window's top row does not change (top and bottom bands of the image),
  instead of a new prefill for every placement. Same tokens as sample_tokens (same math).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from taming_deploy.backends.base import Backend
from taming_deploy.backends.ort_backend import OrtBackend, session_options
from taming_deploy.sampler import SampleStats
from taming_deploy.sampling import SamplingOptions, choose_tokens
from taming_deploy.windows import Mode, schedule, window_shape


# --- session options ------------------------------------------------------------------------------

def tuned_session_options(threads: int | None, spinning: bool = True, memory_pattern: bool = True,
                          arena: bool = True) -> ort.SessionOptions:
    """The runtime's options (taming_deploy.backends.ort_backend.session_options) plus the knobs tried here."""
    options = session_options(threads)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.enable_mem_pattern = memory_pattern
    options.enable_cpu_mem_arena = arena
    return options


# --- persistent IOBinding on the unchanged graph --------------------------------------------------

@dataclass
class BoundCache:
    """Two cache buffers with one IOBinding each (read A write B, read B write A); ``parity`` picks."""

    bindings: tuple[ort.IOBinding, ort.IOBinding]
    tokens: ort.OrtValue  # (N, 1) int64, bound while single tokens are fed
    position: ort.OrtValue  # () int64
    logits: np.ndarray  # (N, vocab) float32, bound as the output of both bindings
    single_bound: list[bool] = field(default_factory=lambda: [True, True])  # binding k has ``tokens`` bound
    parity: int = 0


class BoundOrtBackend(OrtBackend):
    """OrtBackend whose transformer_step re-binds nothing but what changed."""

    name = "ort-bound"

    def __init__(self, bundle_dir: Path, options: ort.SessionOptions | None = None, **kwargs):
        super().__init__(bundle_dir, **kwargs)
        if options is not None:
            self.options = options

    def new_cache(self, batch: int) -> BoundCache:
        session = self.session("transformer")
        shape = self.spec.cache_shape(batch)
        buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.cache_dtype), self.device) for _ in range(2)]
        tokens = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, 1), np.int64))
        position = ort.OrtValue.ortvalue_from_numpy(np.zeros((), np.int64))
        logits = np.zeros((batch, self.spec.vocab_size), np.float32)
        logits_value = ort.OrtValue.ortvalue_from_numpy(logits)  # shares the numpy array's memory
        bindings = []
        for read, write in ((buffers[0], buffers[1]), (buffers[1], buffers[0])):
            binding = session.io_binding()
            binding.bind_ortvalue_input("tokens", tokens)
            binding.bind_ortvalue_input("position", position)
            binding.bind_ortvalue_input("cache", read)
            binding.bind_ortvalue_output("logits", logits_value)
            binding.bind_ortvalue_output("new_cache", write)
            bindings.append(binding)
        return BoundCache((bindings[0], bindings[1]), tokens, position, logits)

    def transformer_step(self, tokens: np.ndarray, position: int, cache: BoundCache) -> np.ndarray:
        k = cache.parity
        binding = cache.bindings[k]
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        if tokens.shape[1] == 1:
            cache.tokens.update_inplace(tokens)
            if not cache.single_bound[k]:
                binding.bind_ortvalue_input("tokens", cache.tokens)
                cache.single_bound[k] = True
        else:
            binding.bind_cpu_input("tokens", tokens)
            cache.single_bound[k] = False
        cache.position.update_inplace(np.array(position, dtype=np.int64))
        self.session("transformer").run_with_iobinding(binding)
        cache.parity = 1 - k
        return cache.logits.copy()


# --- the split-cache graphs -----------------------------------------------------------------------

def heads_qkv(block, x):
    """A block's attention inputs: q, k, v as (B, H, T, D) from the pre-norm activations of x (B, T, C)."""
    attn, (b, t, c) = block.attn, x.shape
    h = block.ln1(x)
    heads = lambda y: y.view(b, t, attn.n_head, c // attn.n_head).transpose(1, 2)  # noqa: E731
    return heads(attn.query(h)), heads(attn.key(h)), heads(attn.value(h))


def block_output(block, x, y):
    """The rest of a block once attention gave y (B, H, T, D): projection, residuals, MLP."""
    b, t, c = x.shape
    x = x + block.attn.proj(y.transpose(1, 2).reshape(b, t, c))
    return x + block.mlp(block.ln2(x))


def split_cache_step_module(gpt):
    """Over ``gpt``'s own parameters: (tokens, position, k_0, v_0, ..., k_{L-1}, v_{L-1}) -> (logits of
    the last position, new_kv (L, 2, B, H, T, D)). The caches are read, never written."""
    import torch
    from torch import nn

    class SplitCacheStep(nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = gpt

        def forward(self, tokens: torch.Tensor, position: torch.Tensor, *caches: torch.Tensor):
            g, t, slots = self.gpt, tokens.shape[1], caches[0].shape[2]
            positions = position + torch.arange(t, device=tokens.device)
            x = g.tok_emb(tokens) + g.pos_emb[0].index_select(0, positions).unsqueeze(0)
            past_visible = (torch.arange(slots, device=tokens.device) < position).view(1, 1, 1, slots)
            causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril().view(1, 1, t, t)
            new_kv = []
            for i, block in enumerate(g.blocks):
                q, k, v = heads_qkv(block, x)
                past_k, past_v = caches[2 * i], caches[2 * i + 1]
                scale = 1.0 / math.sqrt(k.shape[-1])
                scores_past = (q @ past_k.transpose(-2, -1) * scale).masked_fill(~past_visible, float("-inf"))
                scores_new = (q @ k.transpose(-2, -1) * scale).masked_fill(~causal, float("-inf"))
                att = torch.softmax(torch.cat((scores_past, scores_new), dim=-1), dim=-1)
                x = block_output(block, x, att[..., :slots] @ past_v + att[..., slots:] @ v)
                new_kv.append(torch.stack((k, v)))
            return g.head(g.ln_f(x[:, -1])), torch.stack(new_kv)

    return SplitCacheStep()


def prefill_module(gpt):
    """Over ``gpt``'s own parameters: tokens (B, T) at positions 0..T-1 -> (logits of the last position,
    new_kv (L, 2, B, H, T, D)). Plain causal attention over the T tokens, the mask added as a bias once
    computed (no cache input, no score matrix over the whole capacity, no Where per layer)."""
    import torch
    from torch import nn

    class Prefill(nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = gpt

        def forward(self, tokens: torch.Tensor):
            g, t = self.gpt, tokens.shape[1]
            x = g.tok_emb(tokens) + g.pos_emb[:, :t]
            causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
            bias = torch.zeros(t, t, device=tokens.device).masked_fill(~causal, float("-inf")).view(1, 1, t, t)
            new_kv = []
            for block in g.blocks:
                q, k, v = heads_qkv(block, x)
                att = torch.softmax(q @ k.transpose(-2, -1) * (1.0 / math.sqrt(k.shape[-1])) + bias, dim=-1)
                x = block_output(block, x, att @ v)
                new_kv.append(torch.stack((k, v)))
            return g.head(g.ln_f(x[:, -1])), torch.stack(new_kv)

    return Prefill()


def cache_input_names(n_layer: int) -> tuple[str, ...]:
    return tuple(f"{kind}_{i}" for i in range(n_layer) for kind in ("past_k", "past_v"))


def export_split_cache_graphs(checkpoint: Path, step_path: Path, prefill_path: Path) -> None:
    import torch

    from export.graphs import GraphDef
    from export.onnx_export import export_graph
    from training.checkpoint import load_model

    model = load_model(checkpoint)
    spec = model.config.spec()
    batch = torch.export.Dim("batch", min=1, max=1024)
    fed = torch.export.Dim("tokens", min=1, max=spec.block_size)
    names = cache_input_names(spec.n_layer)
    # distinct tensors: torch.export would treat one tensor passed twice as aliased inputs
    example_caches = tuple(torch.randn(2, spec.n_head, spec.block_size, spec.head_dim) for _ in names)
    tokens = torch.randint(0, spec.vocab_size, (2, 7))
    axes = {"tokens": ("batch", "tokens"), "position": (), "logits": ("batch", spec.vocab_size),
            "new_kv": (spec.n_layer, 2, "batch", spec.n_head, "tokens", spec.head_dim),
            **{n: ("batch", spec.n_head, spec.block_size, spec.head_dim) for n in names}}
    step = GraphDef("transformer_split_step", split_cache_step_module(model.transformer),
                    (tokens, torch.tensor(3)) + example_caches, ("tokens", "position") + names, ("logits", "new_kv"),
                    {"tokens": {0: batch, 1: fed}, "position": {}, "caches": tuple({0: batch} for _ in names)}, axes)
    prefill = GraphDef("transformer_prefill", prefill_module(model.transformer), (tokens,), ("tokens",),
                       ("logits", "new_kv"), {"tokens": {0: batch, 1: fed}}, axes)
    for graph, path in ((step, step_path), (prefill, prefill_path)):
        partial = path.with_suffix(".partial")
        export_graph(graph, partial)
        partial.rename(path)


def cached_split_cache_graphs(checkpoint: Path, cache: Path) -> tuple[Path, Path]:
    """(step graph, prefill graph) of a checkpoint, exported once into the benchmarks' cache."""
    from benchlib import checkpoint_key, note

    key = checkpoint_key(checkpoint)
    step, prefill = cache / f"split-step-{key}.onnx", cache / f"split-prefill-{key}.onnx"
    if not (step.is_file() and prefill.is_file()):
        note(f"exporting the split-cache transformer graphs to {cache} (once) ...")
        export_split_cache_graphs(checkpoint, step, prefill)
    return step, prefill


@dataclass
class SplitCache:
    kv: np.ndarray  # (L, 2, N, H, S, D): written on the host, read by the step graph through shared memory
    step: ort.IOBinding  # the split-cache step graph, for calls at position > 0
    tokens: ort.OrtValue  # (N, 1) int64
    position: ort.OrtValue  # () int64
    logits: np.ndarray
    new_kv: np.ndarray  # (L, 2, N, H, 1, D), the single-token output
    single_bound: bool = True


class SplitCacheOrtBackend:
    """Both graphs return the fed tokens' K/V only; the host writes them into one numpy cache. Calls at
    position 0 run the prefill graph, later calls the step graph. Everything but the transformer is
    delegated to ``base``."""

    name = "ort-split"

    def __init__(self, base: OrtBackend, graphs: tuple[Path, Path], options: ort.SessionOptions):
        self.base = base
        self.spec = base.spec
        providers = ["CPUExecutionProvider"]
        self.step_session = ort.InferenceSession(str(graphs[0]), options, providers=providers)
        self.prefill_session = ort.InferenceSession(str(graphs[1]), options, providers=providers)
        self.names = cache_input_names(self.spec.n_layer)

    def condition_tokens(self, condition: np.ndarray) -> np.ndarray:
        return self.base.condition_tokens(condition)

    def encode(self, images: np.ndarray) -> np.ndarray:
        return self.base.encode(images)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        return self.base.decode(tokens)

    def new_cache(self, batch: int) -> SplitCache:
        spec = self.spec
        kv = np.zeros(spec.cache_shape(batch), np.float32)
        tokens = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, 1), np.int64))
        position = ort.OrtValue.ortvalue_from_numpy(np.zeros((), np.int64))
        logits = np.zeros((batch, spec.vocab_size), np.float32)
        new_kv = np.zeros((spec.n_layer, 2, batch, spec.n_head, 1, spec.head_dim), np.float32)
        step = self.step_session.io_binding()
        step.bind_ortvalue_input("tokens", tokens)
        step.bind_ortvalue_input("position", position)
        for k, name in enumerate(self.names):
            step.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(kv[k // 2, k % 2]))
        step.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        step.bind_ortvalue_output("new_kv", ort.OrtValue.ortvalue_from_numpy(new_kv))
        return SplitCache(kv, step, tokens, position, logits, new_kv)

    def transformer_step(self, tokens: np.ndarray, position: int, cache: SplitCache) -> np.ndarray:
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        t = tokens.shape[1]
        if position == 0:
            logits, new_kv = self.prefill_session.run(None, {"tokens": tokens})
            cache.kv[:, :, :, :, :t] = new_kv
            return logits
        step = cache.step
        if t == 1:
            cache.tokens.update_inplace(tokens)
            if not cache.single_bound:
                step.bind_ortvalue_input("tokens", cache.tokens)
                step.bind_ortvalue_output("new_kv", ort.OrtValue.ortvalue_from_numpy(cache.new_kv))
                cache.single_bound = True
        else:
            step.bind_cpu_input("tokens", tokens)
            step.bind_output("new_kv", "cpu")  # T slots: ORT allocates
            cache.single_bound = False
        cache.position.update_inplace(np.array(position, dtype=np.int64))
        self.step_session.run_with_iobinding(step)
        new_kv = cache.new_kv if t == 1 else step.get_outputs()[1].numpy()
        cache.kv[:, :, :, :, position : position + t] = new_kv
        return cache.logits.copy()


# --- the sampler, reusing placements across rows ----------------------------------------------------

def sample_tokens_reusing(
    backend: Backend,
    condition_tokens: np.ndarray,
    latent_hw: tuple[int, int],
    options: SamplingOptions,
    rng: np.random.Generator,
    mode: Mode = "exact",
    stride: int = 8,
) -> tuple[np.ndarray, SampleStats]:
    """sample_tokens with one cache per window column offset ``left``, continued by later rows while the
    window's ``top`` stays the same: the window's tokens before the new target are the ones already in
    that cache (raster order), so only the tokens since its last target are fed."""
    spec = backend.spec
    n, (h, w) = condition_tokens.shape[0], latent_hw
    spatial = spec.condition.spatial
    wh, ww = window_shape(latent_hw, spec.window)
    image = np.zeros((n, h, w), dtype=np.int64)
    stats = SampleStats(tokens=h * w)
    caches: dict[int, Any] = {}  # left -> cache, allocated once
    filled_by_left: dict[int, int] = {}  # left -> window tokens [0, filled) in its cache, for the current top
    band_top: int | None = None
    started = time.perf_counter()
    for placement in schedule(latent_hw, spec.window, mode, stride):
        top, left = placement.top, placement.left
        if top != band_top:
            band_top, filled_by_left = top, {}
        if left not in caches:
            caches[left] = backend.new_cache(n)
        cache, filled = caches[left], filled_by_left.get(left)
        prefix = condition_tokens[:, top : top + wh, left : left + ww].reshape(n, -1) if spatial else condition_tokens
        for i, j in placement.targets:
            target = (i - top) * ww + (j - left)
            window = image[:, top : top + wh, left : left + ww].reshape(n, -1)
            if filled is None:
                feed, position = np.concatenate((prefix, window[:, :target]), axis=1), 0
                stats.prefills += 1
            else:
                feed, position = window[:, filled:target], prefix.shape[1] + filled
                stats.steps += 1
            logits = backend.transformer_step(feed, position, cache)
            image[:, i, j] = choose_tokens(logits[:, : spec.image_codebook_size], options, rng)
            stats.fed_tokens += feed.shape[1]
            filled = target
        filled_by_left[left] = filled
    stats.sample_seconds = time.perf_counter() - started
    return image, stats
