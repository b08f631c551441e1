"""The original sliding-window loop, literally: a full transformer pass over the whole window per token.

It is the oracle the cached sampler is checked against and the baseline its speed is measured
against. Greedy only (the original draws with torch's RNG, which a numpy sampler cannot replay).
"""
from __future__ import annotations

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
