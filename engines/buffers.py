"""Byte sizes of the device buffers the TensorRT runtime allocates."""
from __future__ import annotations

import math

import numpy as np

from engines.profiles import Shape
from taming_deploy.spec import ModelSpec


def tensor_bytes(shape: Shape, dtype: np.dtype | str) -> int:
    """Bytes of a dense tensor; a 0-d tensor holds one element."""
    if any(d < 0 for d in shape):
        raise ValueError(f"shape {shape} still has a dynamic (-1) dimension")
    return math.prod(shape) * np.dtype(dtype).itemsize


def cache_bytes(spec: ModelSpec, batch: int, dtype: np.dtype | str) -> int:
    """One transformer cache buffer (n_layer, 2, batch, n_head, block_size, head_dim)."""
    return tensor_bytes(spec.cache_shape(batch), dtype)


def step_buffers(spec: ModelSpec, batch: int, cache_dtype: np.dtype | str, logits_dtype: np.dtype | str) -> dict[str, int]:
    """Device bytes of each allocation a transformer cache owns for ``batch`` sequences: the fed
    tokens (room for a whole block), the 0-d position, the last position's logits, and two caches
    (the step reads one and writes the other; they swap roles after every step)."""
    return {
        "tokens": tensor_bytes((batch, spec.block_size), np.int64),
        "position": tensor_bytes((), np.int64),
        "logits": tensor_bytes((batch, spec.vocab_size), logits_dtype),
        "cache": cache_bytes(spec, batch, cache_dtype),
        "new_cache": cache_bytes(spec, batch, cache_dtype),
    }
