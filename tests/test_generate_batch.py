"""Pipeline.generate_batch: requests with their own conditions, seeds and options in few sampler runs,
each request's images equal to what it gives alone."""
from __future__ import annotations

import numpy as np
import pytest

from taming_deploy.errors import UserError
from taming_deploy.pipeline import GenerationRequest, Pipeline


@pytest.fixture(scope="module")
def pipeline(fixture_bundle) -> Pipeline:
    return Pipeline.load(fixture_bundle, backend="ort")


def label_map(seed: int, shape=(32, 48), n_labels: int = 7) -> np.ndarray:
    """Blocky random label ids, as a hand-drawn map would be."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, n_labels, (shape[0] // 8, shape[1] // 8))
    return np.kron(blocks, np.ones((8, 8), np.int64))


def alone(pipeline: Pipeline, request: GenerationRequest):
    return pipeline.generate(request.cond, n=request.n, size=request.size, seed=request.seed, mode=request.mode,
                             window_stride=request.window_stride, greedy=request.greedy, top_k=request.top_k,
                             top_p=request.top_p, temperature=request.temperature)


def test_a_batch_of_mixed_requests_equals_the_requests_run_alone(pipeline):
    requests = [
        GenerationRequest(label_map(0), seed=1),
        GenerationRequest(label_map(1), seed=2, n=2),
        GenerationRequest(label_map(2), seed=4),
        GenerationRequest(label_map(3, (24, 32)), seed=5),  # another latent size: its own group
        GenerationRequest(label_map(4), seed=3, top_k=5, temperature=0.7),  # other options: its own group
        GenerationRequest(label_map(5), greedy=True, mode="fast", window_stride=4),
    ]
    batched = pipeline.generate_batch(requests)
    assert [g.stats["batch"] for g in batched] == [4, 4, 4, 1, 1, 1]
    for request, generation in zip(requests, batched):
        single = alone(pipeline, request)
        np.testing.assert_array_equal(generation.tokens, single.tokens)
        assert len(generation.images) == request.n
        for a, b in zip(generation.images, single.images):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the requests did sample different images (the comparison above is not between constants)
    assert not np.array_equal(batched[0].tokens, batched[2].tokens)  # other seed, other map
    assert not np.array_equal(batched[1].tokens[0], batched[1].tokens[1])


def test_runs_are_split_to_stay_within_max_pixels_and_results_do_not_change(pipeline):
    requests = [GenerationRequest(label_map(k), seed=k) for k in range(3)]  # 32x48 px each
    whole = pipeline.generate_batch(requests)
    split = pipeline.generate_batch(requests, max_pixels=2 * 32 * 48)
    assert [g.stats["batch"] for g in whole] == [3, 3, 3] and [g.stats["batch"] for g in split] == [2, 2, 1]
    for a, b in zip(whole, split):
        np.testing.assert_array_equal(a.tokens, b.tokens)
    with pytest.raises(UserError, match="the limit is"):
        pipeline.generate_batch([GenerationRequest(label_map(0), n=2)], max_pixels=32 * 48)


def test_a_request_without_a_seed_reports_the_seed_that_reproduces_it(pipeline):
    first = pipeline.generate_batch([GenerationRequest(label_map(0))])[0]
    again = pipeline.generate(label_map(0), seed=first.stats["seed"])
    np.testing.assert_array_equal(first.tokens, again.tokens)


def test_a_bad_request_fails_the_batch_with_its_own_message(pipeline):
    bad = label_map(0)
    bad[0, 0] = 99
    with pytest.raises(UserError, match="label ids 99 are out of range"):
        pipeline.generate_batch([GenerationRequest(label_map(1), seed=0), GenerationRequest(bad, seed=0)])
    with pytest.raises(UserError, match="n must be an integer >= 1"):
        pipeline.generate_batch([GenerationRequest(label_map(1), n=0)])
