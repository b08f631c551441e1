"""minGPT (the Taming Transformers layout) with an explicit fixed-capacity KV cache.

One forward serves three uses:
- training / full recompute: ``gpt(idx)``, plain causal attention over the T tokens;
- prefill: ``gpt(idx, cache, position)`` with T tokens that sit at positions position..position+T-1;
- decode: the same call with T = 1.
The cache is one tensor (n_layer, 2, B, n_head, block_size, head_dim): slot s holds the key/value of
the token at position s. A call writes its tokens' slots and attends to every slot up to each query's
own position, so stale slots beyond it are never read. Nothing grows with the step count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


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

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def cache_shape(self, batch: int) -> tuple[int, ...]:
        return (self.n_layer, 2, batch, self.n_head, self.block_size, self.head_dim)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def write_slots(past: torch.Tensor, new: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Return ``past`` (B, H, S, D) with slots position..position+T-1 replaced by ``new`` (B, H, T, D).

    Written as gather + where rather than an in-place slice assignment so that it exports to plain
    ONNX ops (Gather, Where) with a dynamic T and a runtime position.
    """
    slots, t = past.shape[2], new.shape[2]
    offset = torch.arange(slots, device=past.device) - position  # slot index relative to the first new token
    is_new = (offset >= 0) & (offset < t)
    gathered = new.index_select(2, offset.clamp(min=0).clamp(max=t - 1))
    return torch.where(is_new.view(1, 1, slots, 1), gathered, past)


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
        self.register_buffer("mask", mask)  # persistent: the original checkpoints carry it

    def forward(
        self, x: torch.Tensor, cache: torch.Tensor | None = None, position: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, t, c = x.shape
        heads = lambda y: y.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        if cache is None:
            visible = self.mask[:, :, :t, :t] != 0
        else:
            k = write_slots(cache[0], k, position)
            v = write_slots(cache[1], v, position)
            cache = torch.stack((k, v))
            query_pos = position + torch.arange(t, device=x.device)
            visible = torch.arange(k.shape[2], device=x.device).view(1, -1) <= query_pos.view(-1, 1)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))
        att = torch.softmax(att.masked_fill(~visible, float("-inf")), dim=-1)
        y = (self.attn_drop(att) @ v).transpose(1, 2).reshape(b, t, c)
        return self.resid_drop(self.proj(y)), cache


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
        self, x: torch.Tensor, cache: torch.Tensor | None, position: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, cache = self.attn(self.ln1(x), cache, position)
        x = x + a
        return x + self.mlp(self.ln2(x)), cache


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
        p = self.pos_emb
        return torch.zeros(self.config.cache_shape(batch), dtype=p.dtype, device=p.device)

    def forward(
        self,
        idx: torch.Tensor,
        cache: torch.Tensor | None = None,
        position: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> logits (B, T, V), or (B, V) with ``last_only``; and the updated cache.

        ``position`` (a 0-d int64 tensor) is where idx[:, 0] sits; it is required with a cache.
        """
        t = idx.shape[1]
        if cache is None:
            pos = self.pos_emb[:, :t]
        else:
            pos = self.pos_emb[0].index_select(0, position + torch.arange(t, device=idx.device)).unsqueeze(0)
        x = self.drop(self.tok_emb(idx) + pos)
        layer_caches = []
        for i, block in enumerate(self.blocks):
            x, layer_cache = block(x, None if cache is None else cache[i], position)
            layer_caches.append(layer_cache)
        if last_only:
            x = x[:, -1]
        logits = self.head(self.ln_f(x))
        return logits, (None if cache is None else torch.stack(layer_caches))
