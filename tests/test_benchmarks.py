"""The benchmarks' own computations: FLOP counts, the original loop's per-cell computation, exact-window
scoring, the per-step profile's instrumented copy of the runtime's step, the cache-budget helpers, the
bundle cache's staleness check, the prototypes (same logits, cache and tokens as the runtime) and the
resampling baseline of the reconstruction table."""
from __future__ import annotations

import collections
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import benchlib  # noqa: E402
import fast_mode_quality  # noqa: E402
import prototypes  # noqa: E402
import reconstruction_baselines  # noqa: E402
import sampler_speed  # noqa: E402
import step_profile  # noqa: E402
from taming_deploy.backends.torch_backend import TorchBackend  # noqa: E402
from taming_deploy.sampler import sample_tokens  # noqa: E402
from taming_deploy.sampling import SamplingOptions, TokenStream  # noqa: E402
from taming_deploy.spec import ConditionSpec, ModelSpec  # noqa: E402
from taming_deploy.training.reference_sampler import reference_greedy  # noqa: E402

GREEDY = SamplingOptions(greedy=True)


@pytest.fixture(scope="module")
def torch_backend(imported_checkpoint):
    return TorchBackend.load(imported_checkpoint)


def default_size_spec() -> ModelSpec:
    return ModelSpec(downsample_factor=8, image_codebook_size=512, vocab_size=512, block_size=512, n_layer=6,
                     n_head=8, n_embd=256, condition=ConditionSpec("segmentation", codebook_size=256, n_labels=8))


def test_flop_counts_by_hand():
    spec = default_size_spec()
    d = 256
    per_layer_linear = 2 * (4 * d * d + 8 * d * d)  # q, k, v, proj; MLP d -> 4d -> d
    # a cached step: one query over the 512 past slots and itself
    step = 6 * per_layer_linear + 6 * 2 * 2 * (512 + 1) * d + 2 * d * 512
    assert benchlib.cached_call_flops(spec, 1) == step
    # a prefill of 390 tokens: 390 queries over 512 past slots + the 390 fed tokens, the head once
    prefill = 390 * 6 * per_layer_linear + 6 * 2 * 2 * 390 * (512 + 390) * d + 2 * d * 512
    assert benchlib.cached_call_flops(spec, 390) == prefill
    # masked: at position 300 a step sees 300 slots and itself, 212 slots are masked
    assert benchlib.cached_call_masked_flops(spec, 1, 300) == 6 * 2 * 2 * 212 * d
    # a prefill sees none of the 512 slots and the causal half of its own 390 x 390 scores
    assert benchlib.cached_call_masked_flops(spec, 390, 0) == 6 * 2 * 2 * (390 * 512 + 390 * 389 // 2) * d
    full = 511 * 6 * per_layer_linear + 6 * 2 * 2 * 511 * 511 * d + 511 * 2 * d * 512
    assert benchlib.full_recompute_flops(spec, 511) == full
    assert benchlib.full_recompute_masked_flops(spec, 511) == 6 * 2 * 2 * (511 * 510 // 2) * d
    assert sampler_speed.original_sequence_length(spec, (24, 32)) == 511
    assert sampler_speed.original_sequence_length(spec, (12, 20)) == 2 * 12 * 16 - 1


def test_counted_flops_follow_the_sampler_call_pattern():
    """One 16x16 placement: a prefill of the 256 condition tokens, then 255 single steps at 256..510."""
    spec = default_size_spec()
    counted = sampler_speed.CountingBackend(step_profile.StoredLogitsBackend(spec, np.zeros((1, 512), np.float32)))
    cond = np.random.default_rng(3).integers(0, 256, (1, 16, 16))
    _, stats = sample_tokens(counted, cond, (16, 16), GREEDY, TokenStream.for_batch(0, len(cond)), "exact")
    assert (stats.prefills, stats.steps) == (1, 255)
    S, d, L = 512, 256, 6
    pairs = 256 * (S + 256) + 255 * (S + 1)
    linear = 511 * benchlib.linear_flops_per_token(spec)
    assert counted.flops == linear + 2 * L * 2 * pairs * d + 256 * 2 * d * 512
    masked = 256 * S + 256 * 255 // 2 + sum(S - p for p in range(256, 511))
    assert counted.masked_flops == 2 * L * 2 * masked * d
    # the cached steps apart (the prefill is not one): 255 calls of one token over S + 1 keys, head on one row
    assert counted.step_flops == 255 * (benchlib.linear_flops_per_token(spec) + 2 * L * 2 * (S + 1) * d + 2 * d * 512)
    assert counted.step_seconds > 0
    # a per-entry-position backend's prefill attends over one (masked) past slot and its 256 tokens
    counted.positions_per_entry = True
    counted.flops = counted.masked_flops = 0
    sample_tokens(counted, cond, (16, 16), GREEDY, TokenStream.for_batch(0, len(cond)), "exact")
    assert counted.flops == linear + 2 * L * 2 * (256 * 257 + 255 * (S + 1)) * d + 256 * 2 * d * 512
    assert counted.masked_flops == 2 * L * 2 * (256 + 256 * 255 // 2 + sum(S - p for p in range(256, 511))) * d
    counted.positions_per_entry = False
    # the prefill-graph prototype's prefill attends over its 256 tokens only
    counted.name = "ort-prefill"
    counted.flops = counted.masked_flops = 0
    sample_tokens(counted, cond, (16, 16), GREEDY, TokenStream.for_batch(0, len(cond)), "exact")
    assert counted.flops == linear + 2 * L * 2 * (256 * 256 + 255 * (S + 1)) * d + 256 * 2 * d * 512
    assert counted.masked_flops == 2 * L * 2 * (256 * 255 // 2 + sum(S - p for p in range(256, 511))) * d


def test_original_token_is_what_the_original_loop_samples(torch_backend):
    spec, latent = torch_backend.spec, (17, 19)
    cond = np.random.default_rng(4).integers(0, spec.condition.codebook_size, (1, *latent))
    gpt = torch_backend.model.transformer
    image = reference_greedy(gpt, cond, latent, spec.window, spec.image_codebook_size)
    for cell in [(0, 0), (3, 17), (9, 9), (16, 18)]:
        assert sampler_speed.original_token(gpt, cond, image, cell, spec)[0] == image[0, cell[0], cell[1]]
    _, same = sampler_speed.run_original_subset(gpt, cond, image, spec, 5)
    assert same


def test_cache_budget_helpers():
    spec = default_size_spec()
    backend = step_profile.StoredLogitsBackend(spec, np.zeros((1, 512), np.float32))
    assert step_profile.band_columns((24, 32), spec.window, "exact", 8) == 17  # left offsets 0..16
    assert step_profile.band_columns((16, 16), spec.window, "exact", 8) == 1
    cond = np.zeros((1, 24, 32), np.int64)
    run = lambda: sample_tokens(backend, cond, (24, 32), GREEDY, TokenStream.for_batch(0, len(cond)), "exact")[1]  # noqa: E731
    own = run()
    with step_profile.cache_budget(1):
        single = run()
    assert step_profile.sampler_module.cache_capacity(backend, 1) > 1  # restored
    assert single.prefills > own.prefills and single.fed_tokens > own.fed_tokens
    assert single.prefills + single.steps == own.prefills + own.steps == 24 * 32
    batch = step_profile.largest_full_reuse_batch(spec, 17)
    capacity = step_profile.sampler_module.cache_capacity
    assert capacity(backend, batch) >= 17 > capacity(backend, batch + 1)


def test_exact_window_nll_is_the_full_recompute_log_likelihood(torch_backend):
    import torch

    spec, latent = torch_backend.spec, (17, 18)
    rng = np.random.default_rng(6)
    cond = rng.integers(0, spec.condition.codebook_size, (2, *latent))
    image = rng.integers(0, spec.image_codebook_size, (2, *latent))
    nll = fast_mode_quality.exact_window_nll(torch_backend, cond, image)
    gpt = torch_backend.model.transformer
    for i, j in [(0, 0), (8, 9), (16, 17)]:
        i0, j0 = min(max(i - 8, 0), 1), min(max(j - 8, 0), 2)
        window = torch.from_numpy(image[:, i0 : i0 + 16, j0 : j0 + 16].reshape(2, -1))
        cwindow = torch.from_numpy(cond[:, i0 : i0 + 16, j0 : j0 + 16].reshape(2, -1))
        with torch.no_grad():
            logits, _ = gpt(torch.cat((cwindow, window), dim=1)[:, :-1])
        target = 256 - 1 + (i - i0) * 16 + (j - j0)
        logp = torch.log_softmax(logits[:, target, : spec.image_codebook_size].double(), dim=-1).numpy()
        np.testing.assert_allclose(nll[:, i, j], -logp[[0, 1], image[:, i, j]], atol=1e-4)


@pytest.mark.slow
def test_instrumented_step_is_the_runtime_step(fixture_bundle):
    """The profile times a copy of OrtBackend.transformer_step: it must compute what the runtime does."""
    from taming_deploy.backends.ort_backend import OrtBackend

    backend = OrtBackend(fixture_bundle)
    tokens = np.random.default_rng(9).integers(0, 64, (2, 240))
    runtime, copy = backend.new_cache(2), backend.new_cache(2)
    parts: dict[str, list[float]] = collections.defaultdict(list)
    for start, stop in [(0, 200), (200, 216)] + [(p, p + 1) for p in range(216, 240)]:
        want = backend.transformer_step(tokens[:, start:stop], start, runtime)
        got = step_profile.instrumented_step(backend, tokens[:, start:stop], start, copy, parts)
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(copy.kv, runtime.kv)
    assert len(parts["run_with_iobinding (the graph)"]) == 26


@pytest.mark.slow
def test_prototype_backends_return_the_runtime_logits_cache_and_tokens(fixture_bundle, imported_checkpoint, tmp_path):
    from taming_deploy.backends.ort_backend import OrtBackend

    prefill_graph = tmp_path / "prefill.onnx"
    prototypes.export_prefill_graph(imported_checkpoint, prefill_graph)
    runtime = OrtBackend(fixture_bundle)
    candidates = [
        prototypes.BoundOrtBackend(fixture_bundle, options=prototypes.tuned_session_options(None, spinning=False)),
        prototypes.PrefillGraphOrtBackend(fixture_bundle, prefill_graph),
        prototypes.SharedPositionOrtBackend(fixture_bundle),
    ]
    tokens = np.random.default_rng(7).integers(0, 64, (2, 511))
    # multi-token calls between single ones rebind; a re-prefill reuses a cache full of the first sequence
    calls = [(0, 200), (200, 216)] + [(p, p + 1) for p in range(216, 240)] + [(240, 250), (250, 251), (0, 300), (300, 301)]
    for backend in candidates:
        expected_cache, cache = runtime.new_cache(2), backend.new_cache(2)
        for start, stop in calls:
            want = runtime.transformer_step(tokens[:, start:stop], start, expected_cache)
            got = backend.transformer_step(tokens[:, start:stop], start, cache)
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"{backend.name} at {start}:{stop}")
        np.testing.assert_allclose(cache.kv, expected_cache.kv, atol=1e-5, rtol=0, err_msg=backend.name)
    cond = np.random.default_rng(8).integers(0, 32, (1, 20, 24))
    for mode in ("exact", "fast"):
        want, _ = sample_tokens(runtime, cond, (20, 24), GREEDY, TokenStream.for_batch(0, len(cond)), mode)
        for backend in candidates:
            got, _ = sample_tokens(backend, cond, (20, 24), GREEDY, TokenStream.for_batch(0, len(cond)), mode)
            np.testing.assert_array_equal(got, want, err_msg=f"{backend.name} {mode}")


@pytest.mark.slow
def test_cached_bundles_of_an_older_format_are_not_reused(fixture_bundle, tmp_path):
    import json
    import shutil

    assert benchlib.loadable(fixture_bundle)
    assert not benchlib.loadable(tmp_path / "missing")
    stale = tmp_path / "stale"
    shutil.copytree(fixture_bundle, stale)
    manifest = json.loads((stale / "manifest.json").read_text())
    manifest["format_version"] -= 1
    (stale / "manifest.json").write_text(json.dumps(manifest))
    assert not benchlib.loadable(stale)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_resampling_baseline_keeps_what_the_grid_samples_and_drops_what_it_cannot(mode):
    import torch

    flat = torch.full((1, 3, 32, 32), 0.25)
    assert torch.allclose(reconstruction_baselines.resampled(flat, 8, mode), flat)
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 2.0 - 1.0  # period 2 < f
    out = reconstruction_baselines.resampled(checker.expand(1, 3, 32, 32), 4, mode)
    assert out.shape == (1, 3, 32, 32) and torch.allclose(out, torch.zeros_like(out), atol=1e-6)
