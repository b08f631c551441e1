"""Turning one position's logits into tokens: greedy, or temperature + top-k + top-p sampling."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from taming_deploy.validation import check_sampling_options


@dataclass(frozen=True)
class SamplingOptions:
    greedy: bool = False
    temperature: float = 1.0
    top_k: int | None = 100  # the original's default
    top_p: float | None = None

    def __post_init__(self) -> None:
        check_sampling_options(self.greedy, self.temperature, self.top_k, self.top_p)


def choose_tokens(logits: np.ndarray, options: SamplingOptions, rng: np.random.Generator) -> np.ndarray:
    """(N, V) logits -> (N,) int64 tokens."""
    if options.greedy:
        return logits.argmax(axis=-1).astype(np.int64)
    scores = logits.astype(np.float64) / options.temperature
    if options.top_k is not None and options.top_k < scores.shape[-1]:
        kth_largest = np.partition(scores, -options.top_k, axis=-1)[:, -options.top_k, None]
        scores = np.where(scores < kth_largest, -np.inf, scores)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if options.top_p is not None and options.top_p < 1:
        probs = nucleus(probs, options.top_p)
    cdf = np.cumsum(probs, axis=-1)
    draws = rng.random((probs.shape[0], 1)) * cdf[:, -1:]
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
