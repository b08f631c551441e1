"""The sliding-window token sampler over any backend's cached-step transformer.

For a window placement the cache holds the condition tokens and the window's tokens up to some
point; each target then costs one call that feeds the tokens between that point and the target
(one token when targets are neighbours). A placement's cache is filled by a prefill the first time,
and kept for the next rows while the window's top row stays the same (the top and bottom bands of
the image, where the original's window does not move down): the tokens it holds are final, so
continuing it gives the same logits as a new prefill. See windows.py for where the window goes,
wavefront.py for which calls run together, and DESIGN.md for the cost model.

The calls of one wavefront step are independent; those that feed the same number of tokens run as
one transformer call over a contiguous range of the cache pool, each entry at its own position
(backends whose graph takes one position for the whole batch, bundles exported before, also need
the same position). Prefills run apart from continuing calls, so that the backend can feed them a
short past instead of the empty cache. (The graph returns the last fed position's logits, so calls of
different lengths cannot be padded into one batch; they are grouped instead. In the middle of an
image every row's call feeds one token, so the groups are large.) A batch feeds at most
CALL_TOKEN_BUDGET tokens, so that prefills of many placements starting together run as a few calls
rather than one whose activations the backend's memory pool would then keep.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from taming_deploy.backends.base import Backend
from taming_deploy.sampling import SamplingOptions, TokenStream, choose_tokens
from taming_deploy.wavefront import Call, Order, plan
from taming_deploy.windows import Mode, window_shape

CACHE_MEMORY_BUDGET = 1 << 30  # bytes of transformer caches kept for reuse across rows
CALL_TOKEN_BUDGET = 512  # tokens one batched call may feed (entries x tokens); a single call may feed more


@dataclass
class SampleStats:
    tokens: int = 0  # latent cells sampled (per image)
    prefills: int = 0  # per-cell calls that start a placement at position 0
    steps: int = 0  # per-cell calls that continue a placement from its cache
    fed_tokens: int = 0  # tokens run through the transformer in all calls (per image)
    transformer_calls: int = 0  # batched transformer calls actually run
    wavefront_steps: int = 0  # steps of the plan (calls of a step are independent)
    sample_seconds: float = 0.0  # the token loop alone


def cache_capacity(backend: Backend, batch: int) -> int:
    spec = backend.spec
    cache_bytes = 4 * int(np.prod(spec.cache_shape(batch)))
    return CACHE_MEMORY_BUDGET // cache_bytes


def runs(
    calls: tuple[Call, ...], key: Callable[[Call], tuple[int, ...]], max_slots: int, fed: Callable[[Call], int], max_tokens: int
) -> list[list[Call]]:
    """The step's calls as batches: the same key, consecutive slots, at most ``max_slots`` calls and
    ``max_tokens`` fed tokens (``fed(call)`` each; a call alone may feed more).

    The token bound keeps a batched prefill's activations small: ONNX Runtime's arena keeps the
    largest call's memory for the life of the session (nine 388-token prefills of a 1280x832 image
    run as one call left 0.9 GB held). It costs little time: 48x64 latents in fast mode sampled in
    8.1 s unbounded, 8.4-8.5 s with budgets of 1024 and 400 tokens."""
    batches: list[list[Call]] = []
    for call in sorted(calls, key=lambda c: (key(c), c.slot)):
        last = batches[-1] if batches else None
        if (last and len(last) < max_slots and (len(last) + 1) * fed(call) <= max_tokens and key(last[-1]) == key(call)
                and last[-1].slot + 1 == call.slot):
            batches[-1].append(call)
        else:
            batches.append([call])
    return batches


def sample_tokens(
    backend: Backend,
    condition_tokens: np.ndarray,
    latent_hw: tuple[int, int],
    options: SamplingOptions,
    stream: TokenStream,
    mode: Mode = "exact",
    stride: int = 8,
    on_token: Callable[[int, int], None] | None = None,
    order: Order = "wavefront",
) -> tuple[np.ndarray, SampleStats]:
    """Sample (N, h, w) image tokens; entry b draws its random numbers from ``stream``'s entry b.

    ``condition_tokens`` is (N, h, w) for spatial conditions (same grid as the image) and (N, Lc)
    otherwise (the class token or the SOS token). ``on_token(done, total)`` is called after each
    transformer call with the cells (per image) sampled so far. ``order="sequential"`` samples in
    raster order, one cell per call: the same tokens, slower (kept as the reference in tests).
    """
    spec = backend.spec
    n, (h, w) = condition_tokens.shape[0], latent_hw
    if len(stream) != n:
        raise ValueError(f"{len(stream)} random streams for a batch of {n}")
    spatial = spec.condition.spatial
    if spatial and condition_tokens.shape[1:] != (h, w):
        raise ValueError(f"condition grid {condition_tokens.shape[1:]} differs from the latent grid {(h, w)}")
    wh, ww = window_shape(latent_hw, spec.window)
    prefix_length = wh * ww if spatial else condition_tokens.shape[1]
    schedule = plan(latent_hw, spec.window, mode, stride, max(1, cache_capacity(backend, n) - 1), order)
    pool: Any = backend.new_cache(schedule.slots * n)
    views: dict[tuple[int, int], Any] = {}
    limit = getattr(backend, "max_batch", None)  # TensorRT: its engine's largest batch
    max_slots = max(1, limit // n) if limit else schedule.slots

    def cache(first: int, count: int) -> Any:
        if (first, count) not in views:
            views[first, count] = backend.cache_view(pool, first * n, (first + count) * n)
        return views[first, count]
    image = np.zeros((n, h, w), dtype=np.int64)
    stats = SampleStats(tokens=h * w, wavefront_steps=len(schedule.steps))
    entries = np.arange(n)

    def position(call: Call) -> int:
        return 0 if call.cached is None else prefix_length + call.cached

    def length(call: Call) -> int:
        return prefix_length + call.target if call.cached is None else call.target - call.cached

    def fed(call: Call) -> int:  # tokens the call feeds for all n entries
        return length(call) * n

    per_entry = getattr(backend, "positions_per_entry", False)

    def key(call: Call) -> tuple[int, ...]:  # what the calls of one batch share
        if per_entry:
            return call.cached is None, length(call)
        return position(call), length(call)

    def feed(call: Call) -> np.ndarray:
        top, left = call.top, call.left
        window = image[:, top : top + wh, left : left + ww].reshape(n, -1)
        if call.cached is not None:
            return window[:, call.cached : call.target]
        prefix = condition_tokens[:, top : top + wh, left : left + ww].reshape(n, -1) if spatial else condition_tokens
        return np.concatenate((prefix, window[:, : call.target]), axis=1)

    done = 0
    started = time.perf_counter()
    for step in schedule.steps:
        for batch in runs(step, key, max_slots, fed, CALL_TOKEN_BUDGET):
            first, count = batch[0].slot, len(batch)
            positions = np.repeat([position(c) for c in batch], n) if per_entry else position(batch[0])
            logits = backend.transformer_step(np.concatenate([feed(c) for c in batch], axis=0), positions, cache(first, count))
            rows = np.repeat([c.cell[0] for c in batch], n)
            cols = np.repeat([c.cell[1] for c in batch], n)
            uniforms = stream.uniforms(np.tile(entries, count), rows, cols)
            chosen = choose_tokens(logits[:, : spec.image_codebook_size], options, uniforms)
            image[:, [c.cell[0] for c in batch], [c.cell[1] for c in batch]] = chosen.reshape(count, n).T
            stats.transformer_calls += 1
            stats.fed_tokens += length(batch[0]) * count
            stats.prefills += sum(c.cached is None for c in batch)
            stats.steps += sum(c.cached is not None for c in batch)
        done += len(step)
        if on_token is not None:
            on_token(done, stats.tokens)
    stats.sample_seconds = time.perf_counter() - started
    return image, stats
