"""The original sliding-window loop, literally: a full transformer pass over the whole window per token;
and the original's own cached sampler (``sample_with_past``), which only samples images the window covers.

The loop is the oracle the cached sampler is checked against and the baseline its speed is measured
against. Greedy only (the original draws with torch's RNG, which a numpy sampler cannot replay).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from taming_deploy.windows import clamp, window_shape
from taming_deploy.training.models.gpt import GPT


@torch.no_grad()
def reference_greedy(
    gpt: GPT, cond_tokens: np.ndarray, latent_hw: tuple[int, int], window: tuple[int, int], image_codebook_size: int
) -> np.ndarray:
    """cond_tokens (N, h, w) spatial or (N, Lc) -> greedy image tokens (N, h, w)."""
    h, w = latent_hw
    wh, ww = window_shape(latent_hw, window)
    cond = torch.from_numpy(cond_tokens)
    n = cond.shape[0]
    image = torch.zeros((n, h, w), dtype=torch.long)
    for i in range(h):
        i0 = clamp(i - wh // 2, 0, h - wh)
        for j in range(w):
            j0 = clamp(j - ww // 2, 0, w - ww)
            patch = image[:, i0 : i0 + wh, j0 : j0 + ww].reshape(n, -1)
            cpatch = cond[:, i0 : i0 + wh, j0 : j0 + ww].reshape(n, -1) if cond.dim() == 3 else cond
            logits, _ = gpt(torch.cat((cpatch, patch), dim=1)[:, :-1])
            logits = logits[:, -wh * ww :].reshape(n, wh, ww, -1)[:, i - i0, j - j0, :image_codebook_size]
            image[:, i, j] = logits.argmax(dim=-1)
    return image.numpy()


@torch.no_grad()
def reference_greedy_with_past(gpt: GPT, cond_tokens: np.ndarray, steps: int, image_codebook_size: int) -> np.ndarray:
    """The original's own cached sampler (``sample_with_past`` over ``GPT.forward_with_past``),
    literally, greedy: the first call feeds the condition tokens; every later call feeds the last
    token and concatenates ALL the past keys and values so far (``torch.cat(past, dim=-2)``) before
    every layer, without a mask. Only for images the window covers (no sliding): cond (N, Lc)
    or (N, h, w) flattened -> (N, steps) tokens."""
    x = torch.from_numpy(cond_tokens.reshape(cond_tokens.shape[0], -1))
    cond_len = x.shape[1]
    past: list[torch.Tensor] = []
    sample = x
    for n in range(steps):
        logits, present = forward_with_past(gpt, x, torch.cat(past, dim=-2) if past else None, n + cond_len - 1)
        past.append(present)
        x = logits[:, -1, :image_codebook_size].argmax(dim=-1, keepdim=True)
        sample = torch.cat((sample, x), dim=1)
    return sample[:, cond_len:].numpy()


def forward_with_past(gpt: GPT, idx: torch.Tensor, past: torch.Tensor | None, past_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mingpt.GPT.forward_with_past: past (n_layer, 2, B, n_head, past_length, head_dim) or None."""
    tokens = gpt.tok_emb(idx)
    position = gpt.pos_emb[:, past_length, :] if past is not None else gpt.pos_emb[:, : tokens.shape[1], :]
    h = tokens + position
    presents = []
    for i, block in enumerate(gpt.blocks):
        attn, present = attention_with_past(block.attn, block.ln1(h), past[i] if past is not None else None)
        h = h + attn
        h = h + block.mlp(block.ln2(h))
        presents.append(present)
    return gpt.head(gpt.ln_f(h)), torch.stack(presents)


def attention_with_past(attn, x: torch.Tensor, layer_past: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """mingpt.CausalSelfAttention.forward with layer_past: keys/values concatenated, masked only without a past."""
    b, t, c = x.shape
    heads = lambda y: y.view(b, t, attn.n_head, c // attn.n_head).transpose(1, 2)  # noqa: E731
    k, q, v = heads(attn.key(x)), heads(attn.query(x)), heads(attn.value(x))
    present = torch.stack((k, v))
    if layer_past is not None:
        k = torch.cat((layer_past[0], k), dim=-2)
        v = torch.cat((layer_past[1], v), dim=-2)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
    if layer_past is None:
        att = att.masked_fill(attn.mask[:, :, :t, :t] == 0, float("-inf"))
    y = torch.softmax(att, dim=-1) @ v
    return attn.proj(y.transpose(1, 2).contiguous().view(b, t, c)), present
