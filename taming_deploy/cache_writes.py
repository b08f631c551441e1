"""Where a transformer call's new keys and values go in the cache, for one position per call or
one per entry. Plain slicing, so the same code serves numpy caches (ONNX Runtime) and torch ones.

The cache layout is (n_layer, 2, B, n_head, block_size, head_dim); a call's new_kv is
(n_layer, 2, B, n_head, T, head_dim), entry b's T rows belonging at slots p_b..p_b+T-1.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def entry_positions(position: Any, batch: int) -> np.ndarray:
    """``position`` (an int, or one per entry) as a (batch,) int64 array."""
    positions = np.asarray(position, dtype=np.int64).reshape(-1)
    if positions.shape[0] == 1:
        return np.full(batch, positions[0], dtype=np.int64)
    if positions.shape[0] != batch:
        raise ValueError(f"{positions.shape[0]} positions for a batch of {batch}")
    return positions


def check_fits(positions: np.ndarray, tokens: int, block_size: int) -> None:
    if tokens < 1 or positions.min() < 0 or positions.max() + tokens > block_size:
        raise ValueError(f"positions {positions.min()}..{positions.max() + tokens - 1} do not fit the block size {block_size}")


def write_new_kv(cache: Any, new_kv: Any, positions: np.ndarray) -> None:
    """cache[:, :, b, :, p_b:p_b + T] = new_kv[:, :, b] for every entry b (one copy when all agree)."""
    t = new_kv.shape[4]
    first = int(positions[0])
    if (positions == first).all():
        cache[:, :, :, :, first : first + t] = new_kv
        return
    for b, p in enumerate(positions.tolist()):
        cache[:, :, b, :, p : p + t] = new_kv[:, :, b]
