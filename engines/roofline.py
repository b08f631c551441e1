"""The memory-bandwidth bound of one cached decode step.

A decode step (T = 1) does little arithmetic per byte, so its floor is the time to move its bytes:
every transformer weight it multiplies with, plus the cache. The step graph reads the whole past
cache and writes a whole new one (the fixed-capacity cache is rewritten with Where, see
training/models/gpt.py), so the minimum traffic is weights + 2 x cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engines.buffers import cache_bytes
from taming_deploy.spec import ModelSpec


def streamed_weight_count(spec: ModelSpec) -> int:
    """Transformer parameters a decode step reads in full: every block, the final LayerNorm and the
    head. The token and position embeddings are gathered a row per token and left out."""
    e = spec.n_embd
    per_block = 4 * (e * e + e) + (4 * e * e + 4 * e) + (4 * e * e + e) + 2 * 2 * e  # attn, mlp, 2 LayerNorms
    return spec.n_layer * per_block + 2 * e + e * spec.vocab_size


def embedding_weight_count(spec: ModelSpec) -> int:
    return (spec.vocab_size + spec.block_size) * spec.n_embd


@dataclass(frozen=True)
class StepBound:
    weight_bytes: int
    cache_bytes: int  # read + written
    bandwidth: float  # bytes/s

    @property
    def seconds(self) -> float:
        return (self.weight_bytes + self.cache_bytes) / self.bandwidth


def peak_bandwidth(memory_clock_khz: int, bus_bits: int) -> float:
    """Theoretical DRAM bandwidth in bytes/s: two transfers per clock over the bus width (the
    formula of CUDA's deviceQuery sample)."""
    return 2.0 * memory_clock_khz * 1e3 * bus_bits / 8


def decode_step_bound(spec: ModelSpec, batch: int, weight_dtype: np.dtype | str, cache_dtype: np.dtype | str,
                      bandwidth: float) -> StepBound:
    itemsize = np.dtype(weight_dtype).itemsize
    return StepBound(
        weight_bytes=streamed_weight_count(spec) * itemsize,
        cache_bytes=2 * cache_bytes(spec, batch, cache_dtype),
        bandwidth=bandwidth,
    )
