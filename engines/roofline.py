"""The memory-bandwidth bound of one cached decode step.

A decode step (T = 1) does little arithmetic per byte, so its floor is the time to move its bytes:
every transformer weight it multiplies with, plus the cache. The step graph attends over every slot
of the fixed-capacity cache (the slots at or past the position are masked, not skipped), so it reads
the whole cache, and it returns only the fed token's keys and values (new_kv, training/models/gpt.py)
which the runtime writes into their slots: the cache is never rewritten. The minimum traffic is
weights + one cache read + the new rows written once. (The runtime moves the new rows three times:
the engine writes new_kv, the scatter copy reads it and writes the cache; that is 1/block_size of a
cache read each, left out of the floor.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from taming_deploy.engines.buffers import cache_bytes, new_kv_bytes
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
    cache_read_bytes: int  # the whole cache, read once
    new_kv_bytes: int  # the fed token's keys and values, written once
    bandwidth: float  # bytes/s

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.cache_read_bytes + self.new_kv_bytes

    @property
    def seconds(self) -> float:
        return self.total_bytes / self.bandwidth


def peak_bandwidth(memory_clock_khz: int, bus_bits: int) -> float:
    """Theoretical DRAM bandwidth in bytes/s: two transfers per clock over the bus width (the
    formula of CUDA's deviceQuery sample)."""
    return 2.0 * memory_clock_khz * 1e3 * bus_bits / 8


def decode_step_bound(spec: ModelSpec, batch: int, weight_dtype: np.dtype | str, cache_dtype: np.dtype | str,
                      bandwidth: float) -> StepBound:
    itemsize = np.dtype(weight_dtype).itemsize
    return StepBound(
        weight_bytes=streamed_weight_count(spec) * itemsize,
        cache_read_bytes=cache_bytes(spec, batch, cache_dtype),
        new_kv_bytes=new_kv_bytes(spec, batch, 1, cache_dtype),
        bandwidth=bandwidth,
    )
