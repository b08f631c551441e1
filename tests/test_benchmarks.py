"""The benchmarks' own computations: FLOP counts, the original loop's per-cell computation, exact-window
scoring, and the prototypes (same tokens and logits as the runtime)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import benchlib  # noqa: E402
import fast_mode_quality  # noqa: E402
import prototypes  # noqa: E402
import sampler_speed  # noqa: E402
from taming_deploy.backends.torch_backend import TorchBackend  # noqa: E402
from taming_deploy.sampler import sample_tokens  # noqa: E402
from taming_deploy.sampling import SamplingOptions  # noqa: E402
from taming_deploy.spec import ConditionSpec, ModelSpec  # noqa: E402
from training.reference_sampler import reference_greedy  # noqa: E402

GREEDY = SamplingOptions(greedy=True)


@pytest.fixture(scope="module")
def torch_backend(imported_checkpoint):
    return TorchBackend.load(imported_checkpoint)


def test_flop_counts_by_hand():
    spec = ModelSpec(downsample_factor=8, image_codebook_size=512, vocab_size=512, block_size=512, n_layer=6,
                     n_head=8, n_embd=256, condition=ConditionSpec("segmentation", codebook_size=256, n_labels=8))
    d = 256
    per_layer_linear = 2 * (4 * d * d + 8 * d * d)  # q, k, v, proj; MLP d -> 4d -> d
    step = 6 * per_layer_linear + 6 * 2 * 2 * 512 * d + 2 * d * 512
    assert benchlib.call_flops(spec, 1, spec.block_size, 1) == step
    full = 511 * 6 * per_layer_linear + 6 * 2 * 2 * 511 * 511 * d + 511 * 2 * d * 512
    assert benchlib.full_recompute_flops(spec, 511) == full
    assert sampler_speed.original_sequence_length(spec, (24, 32)) == 511
    assert sampler_speed.original_sequence_length(spec, (12, 20)) == 2 * 12 * 16 - 1


def test_counted_flops_are_the_call_pattern_total(torch_backend):
    spec, latent = torch_backend.spec, (17, 18)
    cond = np.random.default_rng(3).integers(0, spec.condition.codebook_size, (1, *latent))
    counted = sampler_speed.CountingBackend(torch_backend)
    _, stats = sample_tokens(counted, cond, latent, GREEDY, np.random.default_rng(0), "fast")
    assert counted.flops == benchlib.call_flops(spec, stats.fed_tokens, spec.block_size, stats.prefills + stats.steps)


def test_original_token_is_what_the_original_loop_samples(torch_backend):
    spec, latent = torch_backend.spec, (17, 19)
    cond = np.random.default_rng(4).integers(0, spec.condition.codebook_size, (1, *latent))
    gpt = torch_backend.model.transformer
    image = reference_greedy(gpt, cond, latent, spec.window, spec.image_codebook_size)
    for cell in [(0, 0), (3, 17), (9, 9), (16, 18)]:
        assert sampler_speed.original_token(gpt, cond, image, cell, spec)[0] == image[0, cell[0], cell[1]]
    _, same = sampler_speed.run_original_subset(gpt, cond, image, spec, 5)
    assert same


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_reusing_sampler_samples_the_runtime_tokens_with_fewer_prefills(torch_backend, mode):
    spec, latent = torch_backend.spec, (19, 21)
    cond = np.random.default_rng(5).integers(0, spec.condition.codebook_size, (1, *latent))
    runtime, runtime_stats = sample_tokens(torch_backend, cond, latent, GREEDY, np.random.default_rng(0), mode)
    reusing, stats = prototypes.sample_tokens_reusing(torch_backend, cond, latent, GREEDY, np.random.default_rng(0), mode)
    np.testing.assert_array_equal(reusing, runtime)
    assert stats.prefills < runtime_stats.prefills
    assert stats.prefills + stats.steps == latent[0] * latent[1]


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
def test_prototype_backends_return_the_runtime_logits(fixture_bundle, imported_checkpoint, tmp_path):
    from taming_deploy.backends.ort_backend import OrtBackend

    graphs = tmp_path / "step.onnx", tmp_path / "prefill.onnx"
    prototypes.export_split_cache_graphs(imported_checkpoint, *graphs)
    runtime = OrtBackend(fixture_bundle)
    candidates = [
        prototypes.BoundOrtBackend(fixture_bundle),
        prototypes.SplitCacheOrtBackend(OrtBackend(fixture_bundle), graphs, prototypes.tuned_session_options(None, spinning=False)),
    ]
    tokens = np.random.default_rng(7).integers(0, 64, (2, 511))
    calls = [(0, 200), (200, 216)] + [(p, p + 1) for p in range(216, 240)] + [(0, 300), (300, 301)]  # re-prefill reuses the cache
    for backend in candidates:
        expected_cache, cache = runtime.new_cache(2), backend.new_cache(2)
        for start, stop in calls:
            want = runtime.transformer_step(tokens[:, start:stop], start, expected_cache)
            got = backend.transformer_step(tokens[:, start:stop], start, cache)
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=f"{backend.name} at {start}:{stop}")
    cond = np.random.default_rng(8).integers(0, 32, (1, 20, 24))
    want, _ = sample_tokens(runtime, cond, (20, 24), GREEDY, np.random.default_rng(0))
    for backend in candidates:
        got, _ = prototypes.sample_tokens_reusing(backend, cond, (20, 24), GREEDY, np.random.default_rng(0))
        np.testing.assert_array_equal(got, want)
