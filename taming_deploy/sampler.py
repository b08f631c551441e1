"""The sliding-window token sampler over any backend's cached-step transformer.

For each window placement the cache is filled once (a prefill of the condition tokens plus the
window's tokens before the first target), then every further target of that placement costs one
cached step: the tokens between the previous target and this one (one token when they are
neighbours). See windows.py for where the window goes and DESIGN.md for the cost model.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from taming_deploy.backends.base import Backend
from taming_deploy.sampling import SamplingOptions, choose_tokens
from taming_deploy.windows import Mode, schedule, window_shape


@dataclass
class SampleStats:
    tokens: int = 0  # latent cells sampled (per image)
    prefills: int = 0  # transformer calls that start a placement at position 0
    steps: int = 0  # transformer calls that continue a placement from the cache
    fed_tokens: int = 0  # tokens run through the transformer in all calls (per image)
    sample_seconds: float = 0.0  # the token loop alone


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
    cache = backend.new_cache(n)
    done = 0
    started = time.perf_counter()
    for placement in schedule(latent_hw, spec.window, mode, stride):
        top, left = placement.top, placement.left
        if spatial:
            prefix = condition_tokens[:, top : top + wh, left : left + ww].reshape(n, -1)
        else:
            prefix = condition_tokens
        filled: int | None = None  # window tokens [0, filled) are in the cache
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
    stats.sample_seconds = time.perf_counter() - started
    return image, stats
