"""The embedded default model: shipped in the package, intact, used when no model is named, and it
paints what the label map asks for."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import run_cli
from taming_deploy.bundle import Bundle
from taming_deploy.model_paths import DEFAULT_MODEL
from taming_deploy.pipeline import GenerationRequest, Pipeline
from taming_deploy.training.data.synthetic_landscapes import LABELS

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_the_shipped_bundle_matches_its_manifest_and_describes_the_landscape_labels():
    bundle = Bundle(DEFAULT_MODEL)
    bundle.verify_all()  # every graph's sha256
    condition = bundle.spec.condition
    assert condition.kind == "segmentation"
    assert tuple(condition.label_names) == tuple(LABELS)


def test_the_shipped_bundle_stores_int8_weights_and_stays_small():
    bundle = Bundle(DEFAULT_MODEL)
    graphs = [entry for by_precision in bundle.manifest.graphs.values() for entry in by_precision.values()]
    assert all(entry.weight_storage == "int8" for entry in graphs)
    assert sum((DEFAULT_MODEL / entry.file).stat().st_size for entry in graphs) < 15e6  # the package ships it


def test_the_shipped_bundle_runs_its_shared_position_transformer_form():
    """Exported before the per-entry-position graph: one position for a whole batch, past inputs of
    block_size slots. The runtime drives it as such: a (B,) position of equal values is that one
    position, unequal ones are refused, and the sampler batches only calls at one position."""
    from taming_deploy.backends.ort_backend import OrtBackend

    backend = OrtBackend(DEFAULT_MODEL, threads=1)
    assert not backend.positions_per_entry
    tokens = np.random.default_rng(4).integers(0, backend.spec.vocab_size, (2, 12))
    caches = [backend.new_cache(2), backend.new_cache(2)]
    for cache, position in zip(caches, (8, np.array([8, 8]))):
        backend.transformer_step(tokens[:, :8], 0, cache)
        last = backend.transformer_step(tokens[:, 8:], position, cache)
    np.testing.assert_array_equal(last, backend.transformer_step(tokens[:, 8:], 8, caches[0]))
    np.testing.assert_array_equal(caches[0].kv, caches[1].kv)
    with pytest.raises(ValueError, match="one position for the whole batch"):
        backend.transformer_step(tokens[:, 8:9], np.array([8, 9]), caches[0])


def test_generate_without_a_model_uses_the_embedded_one(tmp_path):
    out = tmp_path / "out.png"
    proc = run_cli("generate", "--cond", str(EXAMPLES / "landscape_01.png"), "--size", "128x128", "--seed", "0",
                   "--out", str(out), "--save-tokens", str(tmp_path / "t.npy"))
    assert proc.returncode == 0, proc.stderr
    assert "running on ONNX Runtime (the embedded model ships without TensorRT engines" in proc.stderr
    assert Image.open(out).size == (128, 128)
    tokens = np.load(tmp_path / "t.npy")
    assert tokens.shape == (16, 16) and len(np.unique(tokens)) > 20  # a picture, not one repeated code


@pytest.mark.slow
def test_the_default_model_follows_the_example_label_maps():
    """The shipped segmenter, applied to a landscape generated from each example map, agrees with
    that map better than with the other examples' maps: the layout comes from the condition.
    The maps are scaled to one sampling window (128 px, 16x16 latents), where exact mode is one
    prefill per image, so that several seeds fit in a few seconds."""
    import torch

    from taming_deploy.training.evaluation.metrics import confusion_matrix, pixel_accuracy
    from taming_deploy.training.evaluation.segmenter import load_segmenter, segment, uint8_to_model

    torch.set_num_threads(1)
    window = [Image.open(EXAMPLES / f"landscape_0{k}.png").resize((128, 128), Image.NEAREST) for k in (1, 2, 3)]
    maps = [np.asarray(labels) for labels in window]
    pipeline, segmenter = Pipeline.load(None, backend="ort"), load_segmenter()
    for seed in (0, 1):
        results = pipeline.generate_batch([GenerationRequest(labels, seed=seed) for labels in maps])
        for k, result in enumerate(results):
            predicted = segment(segmenter, uint8_to_model(np.asarray(result.images[0])[None]))[0]
            accuracy = [pixel_accuracy(confusion_matrix(predicted, other, len(LABELS))) for other in maps]
            assert accuracy[k] == max(accuracy), (seed, k, accuracy)
