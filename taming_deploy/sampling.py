"""Turning one position's logits into tokens: greedy, or temperature + top-k + top-p sampling.

The random draw of a token is counter-based: the uniform that picks latent cell (i, j) of a request
is a hash of (seed, request index, i, j) alone (``TokenStream``), so a seeded image does not depend
on how the sampler batches or orders its transformer calls, nor on the other requests of a batch.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from taming_deploy.errors import UserError
from taming_deploy.validation import check_sampling_options


@dataclass(frozen=True)
class SamplingOptions:
    greedy: bool = False
    temperature: float = 1.0
    top_k: int | None = 100  # the original's default
    top_p: float | None = None

    def __post_init__(self) -> None:
        check_sampling_options(self.greedy, self.temperature, self.top_k, self.top_p)


MASK64 = (1 << 64) - 1


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays: a bijection whose outputs look independent for
    neighbouring inputs (every input bit flips about half of the output bits)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment: keeps a zero key from hashing to zero


def hash_keys(*keys: np.ndarray) -> np.ndarray:
    """One uint64 per element from a sequence of uint64 key arrays (broadcast), chained through mix64."""
    state = np.zeros(np.broadcast_shapes(*(k.shape for k in keys)), np.uint64)
    with np.errstate(over="ignore"):
        for key in keys:
            state = mix64(state ^ (key.astype(np.uint64) + GOLDEN))
    return state


@dataclass(frozen=True)
class TokenStream:
    """The random stream of a batch of requests: entry b draws from (seeds[b], requests[b]).

    ``uniforms(entries, rows, cols)`` gives, for each batch entry and latent cell, a float64 in [0, 1)
    that depends on nothing else, so sampling order and batching never change a seeded result.
    """

    seeds: np.ndarray  # (N,) uint64
    requests: np.ndarray  # (N,) uint64

    @classmethod
    def for_requests(cls, seeds: Sequence[int | None], requests: Sequence[int] | None = None) -> "TokenStream":
        """Per-entry seeds (None: fresh entropy) and request indices (default 0, 1, ...)."""
        requests = list(range(len(seeds))) if requests is None else list(requests)
        if len(requests) != len(seeds):
            raise ValueError(f"{len(seeds)} seeds for {len(requests)} requests")
        for value, what in [(s, "seed") for s in seeds if s is not None] + [(r, "request index") for r in requests]:
            if not 0 <= value <= MASK64:
                raise UserError(f"{what} must be between 0 and 2**64 - 1, got {value}")
        drawn = [np.random.SeedSequence().entropy & MASK64 if s is None else s for s in seeds]  # type: ignore[operator]
        return cls(np.array(drawn, np.uint64), np.array(requests, np.uint64))

    @classmethod
    def for_batch(cls, seed: int | None, n: int) -> "TokenStream":
        """``n`` images of one seed: image b is request b (so image 0 is the same whatever ``n``)."""
        if seed is None:
            seed = np.random.SeedSequence().entropy & MASK64  # type: ignore[operator]
        return cls.for_requests([seed] * n)

    def __len__(self) -> int:
        return len(self.seeds)

    def uniforms(self, entries: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(K,) uniforms in [0, 1) for batch entries ``entries`` at latent cells (rows, cols)."""
        bits = hash_keys(self.seeds[entries], self.requests[entries], np.asarray(rows, np.uint64), np.asarray(cols, np.uint64))
        return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def choose_tokens(logits: np.ndarray, options: SamplingOptions, uniforms: np.ndarray) -> np.ndarray:
    """(N, V) logits and (N,) uniforms in [0, 1) -> (N,) int64 tokens: the inverse CDF of the
    filtered distribution at each uniform (greedy ignores the uniforms)."""
    if options.greedy:
        return logits.argmax(axis=-1).astype(np.int64)
    scores = logits.astype(np.float64)
    # shifted to a maximum of 0 before the division: a tiny temperature then gives -inf, never inf - inf = NaN
    with np.errstate(over="ignore"):
        scores = (scores - scores.max(axis=-1, keepdims=True)) / options.temperature
    if options.top_k is not None and options.top_k < scores.shape[-1]:
        kth_largest = np.partition(scores, -options.top_k, axis=-1)[:, -options.top_k, None]
        scores = np.where(scores < kth_largest, -np.inf, scores)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    if options.top_p is not None and options.top_p < 1:
        probs = nucleus(probs, options.top_p)
    cdf = np.cumsum(probs, axis=-1)
    draws = uniforms[:, None] * cdf[:, -1:]
    return np.minimum((cdf <= draws).sum(axis=-1), probs.shape[-1] - 1).astype(np.int64)


def nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one token)."""
    order = np.argsort(-probs, axis=-1)
    sorted_probs = np.take_along_axis(probs, order, axis=-1)
    mass_before = np.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = mass_before < top_p
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    kept = np.where(keep, probs, 0.0)
    return kept / kept.sum(axis=-1, keepdims=True)
