"""The interface every execution backend implements (PyTorch oracle, ONNX Runtime, TensorRT).

All arrays crossing it are numpy: token grids int64, images float32 NCHW in [-1, 1] (decoder output
unclamped). The transformer cache is an opaque object owned by the backend, so each backend keeps it
where it is cheapest (a torch tensor, ONNX Runtime values, device memory) and the sampler never
copies it.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from taming_deploy.spec import ModelSpec


class Backend(Protocol):
    name: str  # "torch", "ort", "trt"
    spec: ModelSpec

    def condition_tokens(self, condition: np.ndarray) -> np.ndarray:
        """Spatial conditions only: labels (N, H, W) int64, depth (N, 1, H, W) or images (N, 3, H, W) float32 in [-1, 1]
        -> (N, H/f, W/f) int64 condition tokens."""
        ...

    def encode(self, images: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 in [-1, 1] -> (N, H/f, W/f) int64 image tokens."""
        ...

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """(N, h, w) int64 image tokens -> (N, 3, h*f, w*f) float32 images (unclamped)."""
        ...

    def new_cache(self, batch: int) -> Any:
        """An empty transformer cache for ``batch`` sequences (capacity: the block size)."""
        ...

    def cache_view(self, cache: Any, start: int, stop: int) -> Any:
        """The cache of sequences start..stop-1 of ``cache``, sharing its memory: steps on the view
        read and write those sequences of ``cache`` (the sampler batches independent calls this way).
        ``cache`` may hold more sequences than one call takes: a backend with such a limit says so in
        an attribute ``max_batch`` (TensorRT: its engine's profile), which the sampler respects."""
        ...

    def transformer_step(self, tokens: np.ndarray, position: int | np.ndarray, cache: Any) -> np.ndarray:
        """Feed (N, T) int64 tokens sitting at positions position..position+T-1; the cache must hold
        the sequence's tokens before ``position`` and is updated in place. Returns the last fed
        position's logits, (N, vocab) float32. ``position`` may be (N,), one per entry, where the
        backend's attribute ``positions_per_entry`` is true (graphs exported before take one)."""
        ...
