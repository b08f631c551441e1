"""Byte sizes and offsets of the device buffers the TensorRT runtime allocates, and the strided copy
that writes a step's new keys and values into the cache.

The cache of ``batch`` sequences is one buffer laid out as (n_layer, 2, batch, n_head, block_size,
head_dim), the layout of OrtCache.kv and of the PyTorch GPT's cache. The transformer's inputs
past_key_i and past_value_i are the (batch, n_head, block_size, head_dim) sub-blocks [i, 0] and
[i, 1] of it, so they are bound as addresses inside the one buffer, never copied.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from taming_deploy.engines.profiles import Shape, past_names
from taming_deploy.spec import ModelSpec


def tensor_bytes(shape: Shape, dtype: np.dtype | str) -> int:
    """Bytes of a dense tensor; a 0-d tensor holds one element."""
    if any(d < 0 for d in shape):
        raise ValueError(f"shape {shape} still has a dynamic (-1) dimension")
    return math.prod(shape) * np.dtype(dtype).itemsize


def cache_bytes(spec: ModelSpec, batch: int, dtype: np.dtype | str) -> int:
    """The transformer cache (n_layer, 2, batch, n_head, block_size, head_dim)."""
    return tensor_bytes(spec.cache_shape(batch), dtype)


def new_kv_bytes(spec: ModelSpec, batch: int, tokens: int, dtype: np.dtype | str) -> int:
    """The transformer's new_kv output for ``tokens`` fed tokens: (n_layer, 2, batch, n_head, tokens, head_dim)."""
    return tensor_bytes((spec.n_layer, 2, batch, spec.n_head, tokens, spec.head_dim), dtype)


def step_buffers(spec: ModelSpec, batch: int, cache_dtype: np.dtype | str, logits_dtype: np.dtype | str,
                 per_entry: bool = False) -> dict[str, int]:
    """Device bytes of each allocation a transformer cache owns for ``batch`` sequences: the fed
    tokens and the new_kv output (both with room for a whole block, the largest prefill), the
    position (0-d, or (batch,) for a per-entry graph), the last position's logits, and the one cache
    buffer the steps read and write. A per-entry graph's cache also owns one zero slot per sequence,
    (batch, n_head, 1, head_dim), bound as every past input of a prefill (read only, so shared)."""
    sizes = {
        "tokens": tensor_bytes((batch, spec.block_size), np.int64),
        "position": tensor_bytes((batch,) if per_entry else (), np.int64),
        "logits": tensor_bytes((batch, spec.vocab_size), logits_dtype),
        "kv": cache_bytes(spec, batch, cache_dtype),
        "new_kv": new_kv_bytes(spec, batch, spec.block_size, cache_dtype),
    }
    if per_entry:
        sizes["zero_slot"] = tensor_bytes((batch, spec.n_head, 1, spec.head_dim), cache_dtype)
    return sizes


def past_offsets(spec: ModelSpec, batch: int, dtype: np.dtype | str) -> dict[str, int]:
    """Byte offset of every past_key_i / past_value_i input inside the cache buffer: layer i's keys
    start at (2i) x slot bytes and its values at (2i + 1) x slot bytes, where a slot block is
    batch x n_head x block_size x head_dim elements."""
    block = tensor_bytes((batch, spec.n_head, spec.block_size, spec.head_dim), dtype)
    names = past_names(spec.n_layer)
    keys, values = names[: spec.n_layer], names[spec.n_layer :]
    return {**{name: (2 * i) * block for i, name in enumerate(keys)}, **{name: (2 * i + 1) * block for i, name in enumerate(values)}}


@dataclass(frozen=True)
class Copy2D:
    """The arguments of one cudaMemcpy2DAsync: ``height`` rows of ``width`` bytes, row r read at
    src + src_offset + r x src_pitch and written at dst + dst_offset + r x dst_pitch."""

    dst_offset: int
    dst_pitch: int
    src_pitch: int
    width: int
    height: int
    src_offset: int = 0

    def extent(self, pitch: int, offset: int = 0) -> int:
        """One past the last byte touched on a side with this pitch and start offset."""
        return offset + (self.height - 1) * pitch + self.width if self.height else offset


def scatter_new_kv(spec: ModelSpec, batch: int, tokens: int, position: int, dtype: np.dtype | str) -> Copy2D:
    """The copy that does ``cache[:, :, :, :, position:position + tokens] = new_kv``.

    Both tensors are rows of head_dim elements: new_kv (n_layer, 2, batch, n_head, tokens, head_dim)
    is n_layer x 2 x batch x n_head runs of ``tokens`` consecutive rows, and the cache holds the same
    runs with block_size rows each. So each run is one 2-D row of the copy: width = tokens x
    head_dim x itemsize bytes, source pitch = the same (new_kv is dense), destination pitch =
    block_size x head_dim x itemsize, starting ``position`` rows into the cache.
    """
    if tokens < 1 or position < 0 or position + tokens > spec.block_size:
        raise ValueError(f"positions {position}..{position + tokens - 1} do not fit the block size {spec.block_size}")
    row = spec.head_dim * np.dtype(dtype).itemsize
    return Copy2D(
        dst_offset=position * row,
        dst_pitch=spec.block_size * row,
        src_pitch=tokens * row,
        width=tokens * row,
        height=spec.n_layer * 2 * batch * spec.n_head,
    )


def view_past_offsets(spec: ModelSpec, kv_batch: int, start: int, dtype: np.dtype | str) -> dict[str, int]:
    """past_offsets of the sequences start.. of a cache laid out for ``kv_batch`` sequences: each
    layer's keys (values) of consecutive sequences are consecutive, so a range of them is one
    (batch, n_head, block_size, head_dim) block starting ``start`` sequences in."""
    sequence = tensor_bytes((spec.n_head, spec.block_size, spec.head_dim), dtype)
    return {name: offset + start * sequence for name, offset in past_offsets(spec, kv_batch, dtype).items()}


def scatter_new_kv_view(spec: ModelSpec, batch: int, tokens: int, position: int, dtype: np.dtype | str, kv_batch: int,
                        start: int) -> list[Copy2D]:
    """The copies that write new_kv of ``batch`` sequences into sequences start..start+batch-1 of a
    cache laid out for ``kv_batch``: one copy when they are the whole cache (scatter_new_kv), else
    one per layer and keys/values (between those blocks the destination skips the other sequences)."""
    whole = scatter_new_kv(spec, batch, tokens, position, dtype)
    if (start, batch) == (0, kv_batch):
        return [whole]
    if start < 0 or start + batch > kv_batch:
        raise ValueError(f"sequences {start}..{start + batch - 1} are not in a cache of {kv_batch}")
    rows = batch * spec.n_head
    sequence = spec.n_head * spec.block_size * spec.head_dim * np.dtype(dtype).itemsize
    return [
        Copy2D(dst_offset=block * kv_batch * sequence + start * sequence + whole.dst_offset, dst_pitch=whole.dst_pitch,
               src_pitch=whole.src_pitch, width=whole.width, height=rows, src_offset=block * rows * whole.src_pitch)
        for block in range(spec.n_layer * 2)
    ]


def scatter_new_kv_entries(spec: ModelSpec, positions: np.ndarray, tokens: int, dtype: np.dtype | str, kv_batch: int,
                           start: int) -> list[Copy2D]:
    """The copies that write new_kv of len(positions) sequences, sequence b at slots positions[b]..,
    into sequences start.. of a cache laid out for ``kv_batch``: scatter_new_kv_view when all
    positions agree, else, for each run of consecutive sequences at one position, one copy per layer
    and keys/values (rows: the run's sequences x n_head)."""
    batch = len(positions)
    if (positions == positions[0]).all():
        return scatter_new_kv_view(spec, batch, tokens, int(positions[0]), dtype, kv_batch, start)
    if start < 0 or start + batch > kv_batch:
        raise ValueError(f"sequences {start}..{start + batch - 1} are not in a cache of {kv_batch}")
    row = spec.head_dim * np.dtype(dtype).itemsize
    sequence = spec.n_head * spec.block_size * row  # one sequence's slots of one layer's keys (values)
    fed = spec.n_head * tokens * row  # one sequence's part of one new_kv block
    copies = []
    first = 0
    for b in range(1, batch + 1):
        if b < batch and positions[b] == positions[first]:
            continue
        position = int(positions[first])
        if position < 0 or position + tokens > spec.block_size:
            raise ValueError(f"positions {position}..{position + tokens - 1} do not fit the block size {spec.block_size}")
        copies += [
            Copy2D(dst_offset=block * kv_batch * sequence + (start + first) * sequence + position * row,
                   dst_pitch=spec.block_size * row, src_pitch=tokens * row, width=tokens * row,
                   height=(b - first) * spec.n_head, src_offset=block * batch * fed + first * fed)
            for block in range(spec.n_layer * 2)
        ]
        first = b
    return copies
