"""The fixed-capacity KV cache gives the logits of a full recompute, whatever the call pattern."""
from __future__ import annotations

import torch

from taming_deploy.training.models.gpt import GPT, GPTConfig


def small_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(vocab_size=50, block_size=64, n_layer=3, n_head=4, n_embd=32)).eval()
    with torch.no_grad():
        gpt.pos_emb.normal_(std=0.5)  # non-zero, so a wrong position shows up in the logits
    return gpt


@torch.no_grad()
def test_prefill_then_steps_equal_full_recompute_at_every_step():
    gpt = small_gpt()
    tokens = torch.randint(0, 50, (3, 64))
    full, _ = gpt(tokens)
    cache = gpt.new_cache(3)
    torch.testing.assert_close(gpt.step(tokens[:, :20], cache, 0), full[:, 19], atol=1e-5, rtol=0)
    for p in range(20, 64):
        torch.testing.assert_close(gpt.step(tokens[:, p : p + 1], cache, p), full[:, p], atol=1e-5, rtol=0)


@torch.no_grad()
def test_multi_token_extend_and_reprefill_over_a_stale_cache():
    """A new prefill at position 0 over a cache full of another sequence must ignore the stale slots."""
    gpt = small_gpt(1)
    first, second = torch.randint(0, 50, (2, 1, 64))
    cache = gpt.new_cache(1)
    gpt.step(first, cache, 0)
    full, _ = gpt(second)
    torch.testing.assert_close(gpt.step(second[:, :10], cache, 0), full[:, 9], atol=1e-5, rtol=0)
    torch.testing.assert_close(gpt.step(second[:, 10:17], cache, 10), full[:, 16], atol=1e-5, rtol=0)


@torch.no_grad()
def test_a_call_returns_only_the_fed_tokens_keys_and_values_and_writes_only_their_slots():
    gpt = small_gpt()
    cache = gpt.new_cache(2)
    past = [(layer[0], layer[1]) for layer in cache]
    _, new_kv = gpt(torch.zeros(2, 5, dtype=torch.long), past, torch.tensor(3))
    assert new_kv.shape == (3, 2, 2, 4, 5, 8)  # (layers, k/v, batch, heads, fed tokens, head dim)
    gpt.step(torch.zeros(2, 5, dtype=torch.long), cache, 3)
    assert cache.shape == (3, 2, 2, 4, 64, 8)
    written = cache.abs().sum(dim=(0, 1, 2, 3, 5)) > 0
    assert written.nonzero().flatten().tolist() == [3, 4, 5, 6, 7]


@torch.no_grad()
def test_entries_at_different_positions_run_as_one_batch():
    """One call with one position per entry: each entry's logits equal its own full recompute, and
    its keys and values land at its own slots."""
    gpt = small_gpt(2)
    tokens = torch.randint(0, 50, (3, 40))
    full, _ = gpt(tokens)
    cache = gpt.new_cache(3)
    starts = [5, 17, 30]
    for b, p in enumerate(starts):  # fill each entry to its own position
        gpt.step(tokens[b : b + 1, :p], cache[:, :, b : b + 1], 0)
    fed = torch.stack([tokens[b, p : p + 2] for b, p in enumerate(starts)])
    logits = gpt.step(fed, cache, starts)
    torch.testing.assert_close(logits, torch.stack([full[b, p + 1] for b, p in enumerate(starts)]), atol=1e-5, rtol=0)
    for b, p in enumerate(starts):
        written = cache[:, :, b].abs().sum(dim=(0, 1, 2, 4)) > 0
        assert written.nonzero().flatten().tolist() == list(range(p + 2))


@torch.no_grad()
def test_a_prefill_attends_to_a_one_slot_past_as_to_none():
    """The graph form a runtime feeds a prefill: all positions 0 and a single (masked) past slot."""
    gpt = small_gpt(3)
    tokens = torch.randint(0, 50, (2, 12))
    full, full_kv = gpt(tokens, last_only=True)
    one_slot = [(torch.randn(2, 4, 1, 8), torch.randn(2, 4, 1, 8)) for _ in range(3)]  # garbage: it is masked
    logits, new_kv = gpt(tokens, one_slot, torch.zeros(2, dtype=torch.long), last_only=True)
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(new_kv, full_kv, atol=1e-5, rtol=0)
