"""The sliding-window token sampler over any backend's cached-step transformer.

For a window placement the cache holds the condition tokens and the window's tokens up to some
point; each target then costs one call that feeds the tokens between that point and the target
(one token when targets are neighbours). A placement's cache is filled by a prefill the first time,
and kept for the next rows while the window's top row stays the same (the top and bottom bands of
the image, where the original's window does not move down): the tokens it holds are final, so
continuing it gives the same logits as a new prefill. See windows.py for where the window goes and
DESIGN.md for the cost model.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from taming_deploy.backends.base import Backend
from taming_deploy.sampling import SamplingOptions, choose_tokens
from taming_deploy.windows import Mode, schedule, window_shape

CACHE_MEMORY_BUDGET = 1 << 30  # bytes of transformer caches kept for reuse across rows


@dataclass
class SampleStats:
    tokens: int = 0  # latent cells sampled (per image)
    prefills: int = 0  # transformer calls that start a placement at position 0
    steps: int = 0  # transformer calls that continue a placement from its cache
    fed_tokens: int = 0  # tokens run through the transformer in all calls (per image)
    sample_seconds: float = 0.0  # the token loop alone


class PlacementCaches:
    """Caches of the placements in the current band of rows, keyed by the window's left column.

    At most ``capacity`` placements keep their cache; the others share one scratch cache that is
    refilled every time. (Evicting the least recently used instead would evict, in a band with more
    placements than capacity, exactly the cache needed next, and reuse nothing at all.)
    """

    def __init__(self, backend: Backend, batch: int, capacity: int):
        self.backend, self.batch, self.capacity = backend, batch, max(1, capacity - 1)
        self.top: int | None = None
        self.kept: dict[int, tuple[Any, int | None]] = {}  # left -> (cache, window tokens it holds)
        self.scratch: Any = None

    def get(self, top: int, left: int) -> tuple[Any, int | None]:
        """The cache for a placement and how many window tokens it holds (None: nothing yet)."""
        if top != self.top:  # a new band: every kept cache is stale (its memory is reused)
            self.top = top
            self.kept = {k: (cache, None) for k, (cache, _) in self.kept.items()}
        if left in self.kept:
            return self.kept[left]
        if len(self.kept) < self.capacity:
            self.kept[left] = (self.backend.new_cache(self.batch), None)
            return self.kept[left]
        if self.scratch is None:
            self.scratch = self.backend.new_cache(self.batch)
        return self.scratch, None

    def put(self, left: int, cache: Any, filled: int) -> None:
        if left in self.kept:
            self.kept[left] = (cache, filled)


def cache_capacity(backend: Backend, batch: int) -> int:
    spec = backend.spec
    cache_bytes = 4 * int(np.prod(spec.cache_shape(batch)))
    return CACHE_MEMORY_BUDGET // cache_bytes


def sample_tokens(
    backend: Backend,
    condition_tokens: np.ndarray,
    latent_hw: tuple[int, int],
    options: SamplingOptions,
    rng: np.random.Generator,
    mode: Mode = "exact",
    stride: int = 8,
    on_token: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, SampleStats]:
    """Sample (N, h, w) image tokens.

    ``condition_tokens`` is (N, h, w) for spatial conditions (same grid as the image) and (N, Lc)
    otherwise (the class token or the SOS token). ``on_token(done, total)`` is called after each token.
    """
    spec = backend.spec
    n, (h, w) = condition_tokens.shape[0], latent_hw
    spatial = spec.condition.spatial
    if spatial and condition_tokens.shape[1:] != (h, w):
        raise ValueError(f"condition grid {condition_tokens.shape[1:]} differs from the latent grid {(h, w)}")
    wh, ww = window_shape(latent_hw, spec.window)
    image = np.zeros((n, h, w), dtype=np.int64)
    stats = SampleStats(tokens=h * w)
    caches = PlacementCaches(backend, n, cache_capacity(backend, n))
    done = 0
    started = time.perf_counter()
    for placement in schedule(latent_hw, spec.window, mode, stride):
        top, left = placement.top, placement.left
        prefix = condition_tokens[:, top : top + wh, left : left + ww].reshape(n, -1) if spatial else condition_tokens
        cache, filled = caches.get(top, left)  # filled: window tokens [0, filled) are in the cache
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
            done += 1
            if on_token is not None:
                on_token(done, stats.tokens)
        caches.put(left, cache, filled)  # type: ignore[arg-type]
    stats.sample_seconds = time.perf_counter() - started
    return image, stats
