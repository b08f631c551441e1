"""The wavefront plan on its own, the counter-based random stream, and the sampler's results being
independent of the plan and the batch (torch and ONNX Runtime, against the original loop)."""
from __future__ import annotations

import numpy as np
import pytest

from taming_deploy.backends.ort_backend import OrtBackend
from taming_deploy.backends.torch_backend import TorchBackend
from taming_deploy.errors import UserError
from taming_deploy import sampler
from taming_deploy.sampler import sample_tokens
from taming_deploy.sampling import SamplingOptions, TokenStream
from taming_deploy.training.reference_sampler import reference_greedy
from taming_deploy.wavefront import plan
from taming_deploy.windows import schedule, window_shape

GREEDY = SamplingOptions(greedy=True)
TOPK = SamplingOptions(top_k=5)
CASES = [((16, 16), "exact", 8), ((24, 32), "exact", 8), ((24, 20), "exact", 8), ((12, 20), "exact", 8),
         ((40, 36), "exact", 8), ((24, 32), "fast", 8), ((40, 36), "fast", 4), ((30, 40), "fast", 5), ((18, 17), "fast", 16)]


def sequential_placements(latent, mode, stride):
    return {cell: (p.top, p.left) for p in schedule(latent, (16, 16), mode, stride) for cell in p.targets}


@pytest.mark.parametrize("latent, mode, stride", CASES)
@pytest.mark.parametrize("kept", [1 << 30, 2])
def test_every_call_sees_the_sequential_context_already_final(latent, mode, stride, kept):
    """Placement = the sequential schedule's; every window cell before the target (its context) was
    sampled at an earlier step; a continued cache holds exactly its chain's previous call, on a slot
    no other chain touched in between; no two calls of a step share a slot."""
    h, w = latent
    wh, ww = window_shape(latent, (16, 16))
    result = plan(latent, (16, 16), mode, stride, kept_per_band=kept)
    placements = sequential_placements(latent, mode, stride)
    step_of, last_on_slot = {}, {}
    for step, calls in enumerate(result.steps):
        assert len({c.slot for c in calls}) == len(calls)
        for call in calls:
            i, j = call.cell
            assert (call.top, call.left) == placements[call.cell]
            assert call.target == (i - call.top) * ww + (j - call.left)
            context = [(call.top + k // ww, call.left + k % ww) for k in range(call.target)]
            assert all(step_of[cell] < step for cell in context)  # KeyError: a context cell not sampled yet
            previous = last_on_slot.get(call.slot)
            if call.cached is not None:
                assert previous is not None and (previous.top, previous.left, previous.target) == (call.top, call.left, call.cached)
            assert 0 <= call.slot < result.slots
        for call in calls:
            step_of[call.cell] = step
            last_on_slot[call.slot] = call
    assert sorted(step_of) == [(i, j) for i in range(h) for j in range(w)]


def test_rows_run_one_window_width_behind_the_row_above():
    """At the left edge token (i, 0) sees row i-1 up to column 15, so each row starts 16 steps after
    the one above: 32 + 16 x 23 = 400 steps for 768 cells at 24x32; at 16x16 nothing is independent."""
    assert len(plan((24, 32), (16, 16), "exact").steps) == 32 + 16 * 23
    assert len(plan((16, 16), (16, 16), "exact").steps) == 256
    steps = plan((64, 40), (16, 16), "fast").steps
    assert max(len(s) for s in steps) == 3  # rows 16 columns apart in a 40-wide image


def test_sequential_order_is_raster_order_with_the_chains_of_the_old_sampler():
    result = plan((24, 20), (16, 16), "exact", order="sequential")
    assert [c.cell for s in result.steps for c in s] == [(i, j) for i in range(24) for j in range(20)]
    assert all(len(s) == 1 for s in result.steps)
    prefills = sum(c.cached is None for s in result.steps for c in s)
    assert prefills < len(schedule((24, 20), (16, 16), "exact")) / 2  # band rows continue their placement's cache


def test_uniforms_depend_only_on_seed_request_and_cell():
    stream = TokenStream.for_requests([7, 7, 8], [0, 1, 0])
    rows, cols = np.array([3, 3, 3]), np.array([5, 5, 5])
    u = stream.uniforms(np.array([0, 1, 2]), rows, cols)
    assert len(set(u.tolist())) == 3  # another request or seed: another draw
    again = TokenStream.for_requests([8, 9, 7], [0, 0, 0]).uniforms(np.array([2, 0]), np.array([3, 3]), np.array([5, 5]))
    np.testing.assert_array_equal(again, [u[0], u[2]])  # the batch around it and the order change nothing
    grid = TokenStream.for_batch(0, 1).uniforms(np.zeros(40000, np.int64), np.arange(40000) // 200, np.arange(40000) % 200)
    assert grid.min() >= 0 and grid.max() < 1
    counts = np.bincount((grid * 20).astype(int), minlength=20)
    assert abs(counts - 2000).max() < 5 * np.sqrt(2000)  # uniform: every bin within 5 sigma
    assert abs(np.corrcoef(grid[:-1], grid[1:])[0, 1]) < 0.02  # neighbouring cells uncorrelated


def test_seeds_outside_64_bits_are_user_errors():
    with pytest.raises(UserError):
        TokenStream.for_batch(-1, 2)
    with pytest.raises(UserError):
        TokenStream.for_requests([1 << 64])


@pytest.fixture(scope="module")
def torch_backend(imported_checkpoint):
    return TorchBackend.load(imported_checkpoint)


@pytest.fixture(scope="module")
def ort_backend(fixture_bundle):
    return OrtBackend(fixture_bundle, threads=1)


def conditions(backend, latent, n, seed):
    return np.random.default_rng(seed).integers(0, backend.spec.condition.codebook_size, size=(n, *latent))


@pytest.mark.parametrize("which", ["torch", "ort"])
def test_wavefront_greedy_equals_the_original_loop_in_a_batch(which, request, torch_backend):
    """Exact mode, 2 images of different conditions at 24x20 (top, middle and bottom bands)."""
    backend = request.getfixturevalue(f"{which}_backend")
    cond = conditions(backend, (24, 20), 2, 1)
    tokens, stats = sample_tokens(backend, cond, (24, 20), GREEDY, TokenStream.for_batch(0, 2))
    oracle = reference_greedy(torch_backend.model.transformer, cond, (24, 20), (16, 16), backend.spec.image_codebook_size)
    np.testing.assert_array_equal(tokens, oracle)
    assert stats.prefills + stats.steps == 24 * 20


@pytest.mark.parametrize("mode, stride", [("exact", 8), ("fast", 8), ("fast", 5)])
def test_seeded_images_do_not_depend_on_the_order_or_the_batch(ort_backend, mode, stride):
    """Top-k sampling: the wavefront, the raster-order loop, and each image sampled alone agree."""
    latent = (20, 48)
    cond = conditions(ort_backend, latent, 2, 2)
    stream = TokenStream.for_requests([11, 12])
    wave, stats = sample_tokens(ort_backend, cond, latent, TOPK, stream, mode, stride)
    raster, _ = sample_tokens(ort_backend, cond, latent, TOPK, stream, mode, stride, order="sequential")
    np.testing.assert_array_equal(wave, raster)
    alone, _ = sample_tokens(ort_backend, cond[1:], latent, TOPK, TokenStream.for_requests([12], [1]), mode, stride)
    np.testing.assert_array_equal(wave[1:], alone)
    assert (wave[0] != wave[1]).any()
    assert stats.wavefront_steps < stats.transformer_calls < latent[0] * latent[1]  # some independent calls ran together


def test_fast_mode_wavefront_greedy_equals_raster_order(torch_backend):
    latent = (24, 40)
    cond = conditions(torch_backend, latent, 1, 3)
    wave, _ = sample_tokens(torch_backend, cond, latent, GREEDY, TokenStream.for_batch(0, 1), "fast", 8)
    raster, _ = sample_tokens(torch_backend, cond, latent, GREEDY, TokenStream.for_batch(0, 1), "fast", 8, order="sequential")
    np.testing.assert_array_equal(wave, raster)


def test_a_cache_view_reads_and_writes_its_sequences_of_the_pool(ort_backend):
    spec = ort_backend.spec
    pool = ort_backend.new_cache(3)
    tokens = np.random.default_rng(4).integers(0, spec.vocab_size, (3, 9))
    whole = ort_backend.transformer_step(tokens, 0, pool)
    parent = ort_backend.new_cache(5)
    view = ort_backend.cache_view(parent, 1, 4)
    part = ort_backend.transformer_step(tokens, 0, view)
    np.testing.assert_allclose(part, whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(parent.kv[:, :, 1:4, :, :9], pool.kv[:, :, :, :, :9])  # written through the view
    assert not parent.kv[:, :, [0, 4]].any()  # the other sequences untouched
    step = tokens[:, :1]
    np.testing.assert_allclose(ort_backend.transformer_step(step, 9, view), ort_backend.transformer_step(step, 9, pool), rtol=1e-5, atol=1e-5)


class PositionForm:
    """A backend the sampler sees as taking one position per entry or one per call (the form of bundles
    exported before), recording the positions of every call."""

    def __init__(self, backend, per_entry: bool):
        self.backend, self.spec, self.positions_per_entry = backend, backend.spec, per_entry
        self.positions: list[np.ndarray] = []

    def new_cache(self, batch):
        return self.backend.new_cache(batch)

    def cache_view(self, cache, start, stop):
        return self.backend.cache_view(cache, start, stop)

    def transformer_step(self, tokens, position, cache):
        self.positions.append(np.broadcast_to(position, tokens.shape[:1]))
        return self.backend.transformer_step(tokens, position, cache)


def test_per_entry_positions_batch_rows_in_flight_and_give_the_same_tokens(ort_backend):
    """Fast mode at 24x32: the two rows in flight sit at different positions; with one position per
    entry their single-token steps run as one call, without it they cannot."""
    latent = (24, 32)
    cond = conditions(ort_backend, latent, 1, 5)
    per_entry, shared = PositionForm(ort_backend, True), PositionForm(ort_backend, False)
    tokens, stats = sample_tokens(per_entry, cond, latent, GREEDY, TokenStream.for_batch(0, 1), "fast", 8)
    expected, shared_stats = sample_tokens(shared, cond, latent, GREEDY, TokenStream.for_batch(0, 1), "fast", 8)
    np.testing.assert_array_equal(tokens, expected)
    assert any(len(set(p.tolist())) > 1 for p in per_entry.positions)
    assert all(len(set(p.tolist())) == 1 for p in shared.positions)
    assert stats.transformer_calls < shared_stats.transformer_calls


class CallSizes(PositionForm):
    """Records (entries, tokens) of every call."""

    def __init__(self, backend):
        super().__init__(backend, per_entry=True)
        self.sizes: list[tuple[int, int]] = []

    def transformer_step(self, tokens, position, cache):
        self.sizes.append(tokens.shape)
        return super().transformer_step(tokens, position, cache)


def test_batched_calls_feed_at_most_the_token_budget_and_give_the_same_tokens(ort_backend, monkeypatch):
    """Fast mode at 20x48 starts two placements in some steps; with a budget below two prefills
    they run apart (a single call may feed more than the budget), the tokens unchanged."""
    latent = (20, 48)
    cond = conditions(ort_backend, latent, 1, 6)
    monkeypatch.setattr(sampler, "CALL_TOKEN_BUDGET", 1 << 20)
    unbounded = CallSizes(ort_backend)
    expected, _ = sample_tokens(unbounded, cond, latent, GREEDY, TokenStream.for_batch(0, 1), "fast", 8)
    budget = max(t for _, t in unbounded.sizes) + 1  # one prefill fits, two do not
    assert any(n * t > budget for n, t in unbounded.sizes)  # unbounded, some prefills were batched past it
    monkeypatch.setattr(sampler, "CALL_TOKEN_BUDGET", budget)
    bounded = CallSizes(ort_backend)
    tokens, _ = sample_tokens(bounded, cond, latent, GREEDY, TokenStream.for_batch(0, 1), "fast", 8)
    np.testing.assert_array_equal(tokens, expected)
    assert all(n * t <= budget for n, t in bounded.sizes)
    assert any(n > 1 for n, _ in bounded.sizes)  # single-token steps of different rows still batch
