"""Window schedule, token choice and the cached sampler against the original loop."""
from __future__ import annotations

import numpy as np
import pytest

from taming_deploy.backends.torch_backend import TorchBackend
from taming_deploy.errors import UserError
from taming_deploy.sampler import sample_tokens
from taming_deploy.sampling import SamplingOptions, TokenStream, choose_tokens
from taming_deploy.windows import clamp, schedule
from taming_deploy.training.reference_sampler import reference_greedy


def placements_by_token(latent, window, mode, stride=8):
    return {t: (p.top, p.left) for p in schedule(latent, window, mode, stride) for t in p.targets}


@pytest.mark.parametrize("latent", [(16, 16), (20, 24), (24, 32), (12, 20), (40, 64)])
def test_exact_schedule_is_the_original_placement_for_every_token(latent):
    h, w = latent
    wh, ww = min(16, h), min(16, w)
    got = placements_by_token(latent, (16, 16), "exact")
    assert list(got) == [(i, j) for i in range(h) for j in range(w)]  # raster order, every cell once
    for (i, j), (top, left) in got.items():
        assert (top, left) == (clamp(i - wh // 2, 0, h - wh), clamp(j - ww // 2, 0, w - ww))


def test_exact_schedule_at_16x16_is_one_placement():
    assert len(schedule((16, 16), (16, 16), "exact")) == 1


@pytest.mark.parametrize("stride", [4, 8])
def test_fast_schedule_keeps_targets_inside_and_away_from_edges(stride):
    latent = (24, 40)
    places = schedule(latent, (16, 16), "fast", stride)
    exact = schedule(latent, (16, 16), "exact")
    assert len(places) < len(exact)
    for p in places:
        cols = [j - p.left for _, j in p.targets]
        assert all(0 <= c < 16 for c in cols)
        if 0 < p.left < 40 - 16:  # an unclamped placement centres its chunk
            assert min(cols) >= 8 - stride // 2 and max(cols) <= 8 + stride // 2 - 1


def test_fast_stride_must_fit_the_window():
    with pytest.raises(UserError):
        schedule((24, 40), (16, 16), "fast", 17)


def test_greedy_takes_argmax_and_topk_never_leaves_the_top_k():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 30)).astype(np.float32)
    np.testing.assert_array_equal(choose_tokens(logits, SamplingOptions(greedy=True), rng.random(4)), logits.argmax(-1))
    top3 = np.argsort(-logits, axis=-1)[:, :3]
    for _ in range(200):
        tokens = choose_tokens(logits, SamplingOptions(top_k=3), rng.random(4))
        assert all(t in row for t, row in zip(tokens, top3))


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(1)
    seen = {int(choose_tokens(logits, SamplingOptions(top_k=None, top_p=0.7), rng.random(1))[0]) for _ in range(300)}
    assert seen == {0, 1}


def test_sampling_frequencies_follow_temperature_scaled_softmax():
    logits = np.array([[2.0, 1.0, 0.0]])
    rng = np.random.default_rng(2)
    draws = choose_tokens(np.repeat(logits, 6000, axis=0), SamplingOptions(top_k=None, temperature=2.0), rng.random(6000))
    expected = np.exp(logits[0] / 2) / np.exp(logits[0] / 2).sum()
    np.testing.assert_allclose(np.bincount(draws, minlength=3) / len(draws), expected, atol=0.025)


@pytest.mark.parametrize("top_k", [None, 2])
def test_a_tiny_temperature_samples_the_most_likely_token_without_nan(top_k):
    """logits / 1e-320 overflowed to inf, and inf - inf made NaN probabilities (and RuntimeWarnings)."""
    logits = np.array([[2.0, 5.0, -3.0, 4.0]] * 50, np.float32)
    with np.errstate(all="raise"):
        tokens = choose_tokens(logits, SamplingOptions(top_k=top_k, temperature=1e-320), np.random.default_rng(0).random(50))
    assert (tokens == 1).all()


@pytest.fixture(scope="module")
def torch_backend(imported_checkpoint):
    return TorchBackend.load(imported_checkpoint)


@pytest.mark.parametrize("latent", [(12, 20), (18, 17)])
def test_cached_exact_greedy_equals_original_loop(torch_backend, latent):
    """Includes a 12x20 latent, smaller than the window in one dimension (the original crashes there)."""
    rng = np.random.default_rng(3)
    cond = rng.integers(0, torch_backend.spec.condition.codebook_size, size=(1, *latent))
    tokens, stats = sample_tokens(torch_backend, cond, latent, SamplingOptions(greedy=True), TokenStream.for_batch(0, 1))
    oracle = reference_greedy(torch_backend.model.transformer, cond, latent, (16, 16), torch_backend.spec.image_codebook_size)
    np.testing.assert_array_equal(tokens, oracle)
    assert stats.prefills + stats.steps == latent[0] * latent[1]


def test_batch_of_two_with_one_seed_is_reproducible_and_rows_differ(torch_backend):
    cond = np.zeros((2, 8, 8), dtype=np.int64)
    first, _ = sample_tokens(torch_backend, cond, (8, 8), SamplingOptions(), TokenStream.for_batch(5, 2))
    again, _ = sample_tokens(torch_backend, cond, (8, 8), SamplingOptions(), TokenStream.for_batch(5, 2))
    np.testing.assert_array_equal(first, again)
    assert (first[0] != first[1]).any()


def test_placement_caches_are_continued_across_rows_of_a_band(torch_backend):
    """24 x 20 latents: rows 0-8 and 16-23 share window tops, so most placements continue an
    earlier row's cache instead of a new prefill, and the tokens are still the original's."""
    rng = np.random.default_rng(4)
    cond = rng.integers(0, torch_backend.spec.condition.codebook_size, size=(1, 24, 20))
    tokens, stats = sample_tokens(torch_backend, cond, (24, 20), SamplingOptions(greedy=True), TokenStream.for_batch(0, 1))
    placements = len(schedule((24, 20), (16, 16), "exact"))
    assert stats.prefills < placements / 2
    oracle = reference_greedy(torch_backend.model.transformer, cond, (24, 20), (16, 16), torch_backend.spec.image_codebook_size)
    np.testing.assert_array_equal(tokens, oracle)


def test_a_cache_budget_smaller_than_a_band_still_reuses_what_it_keeps(torch_backend, monkeypatch):
    import taming_deploy.sampler as sampler

    rng = np.random.default_rng(5)
    cond = rng.integers(0, torch_backend.spec.condition.codebook_size, size=(1, 20, 24))
    unlimited, stats_unlimited = sample_tokens(torch_backend, cond, (20, 24), SamplingOptions(greedy=True), TokenStream.for_batch(0, 1))
    monkeypatch.setattr(sampler, "cache_capacity", lambda backend, batch: 4)  # 3 kept + 1 scratch, 9 columns per band
    limited, stats_limited = sample_tokens(torch_backend, cond, (20, 24), SamplingOptions(greedy=True), TokenStream.for_batch(0, 1))
    np.testing.assert_array_equal(limited, unlimited)
    placements = len(schedule((20, 24), (16, 16), "exact"))
    assert stats_unlimited.prefills < stats_limited.prefills < placements


@pytest.mark.slow
def test_the_originals_cached_sampler_gives_the_original_loops_tokens(torch_backend):
    """sample_with_past (the speed benchmark's strongest baseline) transcribed: at 16x16 the window
    never moves, and its greedy tokens are the loop's and the cached sampler's."""
    from taming_deploy.training.reference_sampler import reference_greedy_with_past

    spec = torch_backend.spec
    cond = np.random.default_rng(9).integers(0, spec.condition.codebook_size, size=(1, 16, 16))
    with_past = reference_greedy_with_past(torch_backend.model.transformer, cond, 256, spec.image_codebook_size)
    loop = reference_greedy(torch_backend.model.transformer, cond, (16, 16), (16, 16), spec.image_codebook_size)
    np.testing.assert_array_equal(with_past.reshape(1, 16, 16), loop)
    ours, _ = sample_tokens(torch_backend, cond, (16, 16), SamplingOptions(greedy=True), TokenStream.for_batch(0, 1))
    np.testing.assert_array_equal(ours, loop)
