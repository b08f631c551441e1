"""minGPT (the Taming Transformers layout) with an explicit fixed-capacity KV cache.

One forward serves three uses:
- training / full recompute: ``gpt(idx)``, plain causal attention over the T tokens;
- prefill: ``gpt(idx, past, position)`` with T tokens that sit at positions position..position+T-1;
- decode: the same call with T = 1.
``position`` is 0-d (every entry's tokens sit at the same positions) or (B,), one position per entry,
so that calls of entries at different positions run as one batch.
``past`` holds, per layer, the keys and values of a fixed number of slots (the block size): slot s
belongs to the token at position s. A call attends to the slots before ``position`` and, causally,
to its own T tokens (the past may hold fewer slots than the block: a prefill from position 0 reads
none of them, so it may be fed a single masked slot), and returns the T tokens' keys and values, (n_layer, 2, B, n_head, T, head_dim),
for the caller to write into slots position..position+T-1. The cache is never copied by the model:
on a CPU, rewriting the whole cache every step cost three times the step itself.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from taming_deploy.cache_writes import check_fits, entry_positions, write_new_kv


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.key = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.query = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.value = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.attn_drop = nn.Dropout(cfg.attn_pdrop)
        self.resid_drop = nn.Dropout(cfg.resid_pdrop)
        mask = torch.tril(torch.ones(cfg.block_size, cfg.block_size)).view(1, 1, cfg.block_size, cfg.block_size)
        # the original's causal mask: kept so that its checkpoints load strictly; computed from positions
        # instead of sliced from here, so that exported graphs do not embed a block x block constant
        self.register_buffer("mask", mask)

    def forward(
        self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None, position: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C); past: (keys, values), each (B, n_head, S, head_dim), valid below ``position``
        (0-d or (B,)). Returns the output and the fed tokens' (keys, values) stacked, (2, B, n_head, T, head_dim)."""
        b, t, c = x.shape
        heads = lambda y: y.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scale = 1.0 / math.sqrt(k.shape[-1])
        order = torch.arange(t, device=x.device)
        att = (q @ k.transpose(-2, -1) * scale).masked_fill(order.view(1, -1) > order.view(-1, 1), float("-inf"))
        if past is None:
            y = self.attn_drop(torch.softmax(att, dim=-1)) @ v
        else:
            past_k, past_v = past
            # slots of earlier tokens, per entry: (B or 1, 1, 1, S)
            earlier = torch.arange(past_k.shape[2], device=x.device).view(1, 1, 1, -1) < position.view(-1, 1, 1, 1)
            att_past = (q @ past_k.transpose(-2, -1) * scale).masked_fill(~earlier, float("-inf"))
            weights = self.attn_drop(torch.softmax(torch.cat((att_past, att), dim=-1), dim=-1))
            slots = past_k.shape[2]
            y = weights[..., :slots] @ past_v + weights[..., slots:] @ v
        y = y.transpose(1, 2).reshape(b, t, c)
        return self.resid_drop(self.proj(y)), torch.stack((k, v))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
            nn.GELU(),  # exact erf form, as the original
            nn.Linear(4 * cfg.n_embd, cfg.n_embd),
            nn.Dropout(cfg.resid_pdrop),
        )

    def forward(
        self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None, position: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a, new_kv = self.attn(self.ln1(x), past, position)
        x = x + a
        return x + self.mlp(self.ln2(x)), new_kv


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.block_size, cfg.n_embd))
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)

    def new_cache(self, batch: int) -> torch.Tensor:
        """(n_layer, 2, batch, n_head, block_size, head_dim) zeros: the layout of ModelSpec.cache_shape."""
        c, p = self.config, self.pos_emb
        shape = (c.n_layer, 2, batch, c.n_head, c.block_size, c.n_embd // c.n_head)
        return torch.zeros(shape, dtype=p.dtype, device=p.device)

    def forward(
        self,
        idx: torch.Tensor,
        past: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        position: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """idx (B, T) -> logits (B, T, V), or (B, V) with ``last_only``; and the fed tokens' keys and
        values, (n_layer, 2, B, n_head, T, head_dim).

        ``past``: per layer (keys, values) of the cache; ``position`` (int64, 0-d or (B,) per entry):
        where idx[:, 0] sits. Without ``past`` the tokens sit at positions 0..T-1 and attend only to each other.
        """
        t = idx.shape[1]
        if past is None:
            pos = self.pos_emb[:, :t]
        else:
            slots = position.view(-1, 1) + torch.arange(t, device=idx.device)  # (B or 1, T)
            pos = self.pos_emb[0][slots]
        x = self.drop(self.tok_emb(idx) + pos)
        new_kv = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if past is None else past[i], position)
            new_kv.append(kv)
        if last_only:
            x = x[:, -1]
        return self.head(self.ln_f(x)), torch.stack(new_kv)

    def step(self, idx: torch.Tensor, cache: torch.Tensor, position: int | Sequence[int] | np.ndarray, last_only: bool = True) -> torch.Tensor:
        """Feed idx at ``position`` (one for all entries, or one per entry) against ``cache`` (n_layer,
        2, B, n_head, block, head_dim) and write the fed tokens' keys and values into it, in place,
        each entry's at its own position. Entries all at position 0 (a prefill) read no cache."""
        positions = entry_positions(position, idx.shape[0])
        check_fits(positions, idx.shape[1], self.config.block_size)
        if not positions.any():
            logits, new_kv = self(idx, last_only=last_only)
        else:
            past = [(layer[0], layer[1]) for layer in cache]
            logits, new_kv = self(idx, past, torch.from_numpy(positions).to(idx.device), last_only=last_only)
        write_new_kv(cache, new_kv, positions)
        return logits

