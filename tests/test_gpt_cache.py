"""The fixed-capacity KV cache gives the logits of a full recompute, whatever the call pattern."""
from __future__ import annotations

import numpy as np
import torch

from training.models.gpt import GPT, GPTConfig


def small_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(vocab_size=50, block_size=64, n_layer=3, n_head=4, n_embd=32)).eval()
    with torch.no_grad():
        gpt.pos_emb.normal_(std=0.5)  # non-zero, so a wrong position shows up in the logits
    return gpt


def test_prefill_then_steps_equal_full_recompute_at_every_step():
    gpt = small_gpt()
    tokens = torch.randint(0, 50, (3, 64))
    with torch.no_grad():
        full, _ = gpt(tokens)
        cache = gpt.new_cache(3)
        logits, cache = gpt(tokens[:, :20], cache, torch.tensor(0), last_only=True)
        torch.testing.assert_close(logits, full[:, 19], atol=1e-5, rtol=0)
        for p in range(20, 64):
            logits, cache = gpt(tokens[:, p : p + 1], cache, torch.tensor(p), last_only=True)
            torch.testing.assert_close(logits, full[:, p], atol=1e-5, rtol=0)


def test_multi_token_extend_and_reprefill_over_stale_cache():
    """A new prefill at position 0 over a cache full of another sequence must ignore the stale slots."""
    gpt = small_gpt(1)
    first, second = torch.randint(0, 50, (2, 1, 64))
    with torch.no_grad():
        cache = gpt.new_cache(1)
        _, cache = gpt(first, cache, torch.tensor(0))
        logits, cache = gpt(second[:, :10], cache, torch.tensor(0), last_only=True)
        full, _ = gpt(second)
        torch.testing.assert_close(logits, full[:, 9], atol=1e-5, rtol=0)
        logits, cache = gpt(second[:, 10:17], cache, torch.tensor(10), last_only=True)
        torch.testing.assert_close(logits, full[:, 16], atol=1e-5, rtol=0)


def test_cache_shape_is_fixed():
    gpt = small_gpt()
    cache = gpt.new_cache(2)
    with torch.no_grad():
        _, after = gpt(torch.zeros(2, 5, dtype=torch.long), cache, torch.tensor(0))
    assert after.shape == cache.shape == (3, 2, 2, 4, 64, 8)
    assert np.all(after[:, :, :, :, 5:].numpy() == 0)  # only the fed slots were written
