"""`taming-deploy export`: the bundle, its validation, and the runtime's refusal of damaged bundles."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from helpers import assert_one_line_error, run_cli
from taming_deploy.bundle import BUNDLE_VERSION, Bundle
from taming_deploy.fileutil import sha256_file
from taming_deploy.pipeline import Pipeline

pytestmark = pytest.mark.slow


def test_ort_greedy_tokens_equal_reference_and_image_matches(fixture_bundle, label_png, expected):
    pipeline = Pipeline.load(fixture_bundle, backend="ort")
    result = pipeline.generate(label_png, greedy=True)
    np.testing.assert_array_equal(result.tokens, expected["greedy_indices"])
    np.testing.assert_allclose(pipeline.backend.decode(result.tokens), expected["greedy_image"], atol=2e-5, rtol=0)


def test_manifest_describes_every_graph_with_hash_io_and_passed_validation(fixture_bundle):
    manifest = json.loads((fixture_bundle / "manifest.json").read_text())
    assert manifest["format_version"] == BUNDLE_VERSION
    assert set(manifest["graphs"]) == {"encoder", "decoder", "cond_encoder", "transformer"}
    for by_precision in manifest["graphs"].values():
        assert set(by_precision) == {"fp32", "fp16"}
        for entry in by_precision.values():
            assert sha256_file(fixture_bundle / entry["file"]) == entry["sha256"]
            declared = [i["name"] for i in entry["inputs"]]
            graph = onnx.load(str(fixture_bundle / entry["file"]))
            assert declared == [i.name for i in graph.graph.input]
    transformer = manifest["graphs"]["transformer"]
    names = ["tokens", "position", "past_key_0", "past_key_1", "past_value_0", "past_value_1"]
    assert [t["name"] for t in transformer["fp32"]["inputs"]] == names
    assert [t["dtype"] for t in transformer["fp16"]["inputs"]] == ["int64", "int64"] + ["float16"] * 4  # fp16 KV cache
    assert [t["dtype"] for t in transformer["fp32"]["inputs"]] == ["int64", "int64"] + ["float32"] * 4
    assert transformer["fp32"]["inputs"][1]["shape"] == ["batch"]  # one position per entry
    assert transformer["fp32"]["inputs"][2]["shape"] == ["batch", 2, "past", 16]  # the slots fed: 1..block_size
    assert transformer["fp32"]["outputs"][1] == {"name": "new_kv", "dtype": "float32", "shape": [2, 2, "batch", 2, "tokens", 16]}
    checks = manifest["validation"]["checks"]
    assert checks and all(c["passed"] for c in checks)
    assert {c["graph"] for c in checks if c["precision"] == "fp16"} == {"encoder", "decoder", "cond_encoder", "transformer"}
    assert manifest["model"]["condition"]["n_labels"] == 7 and manifest["model"]["block_size"] == 512


def test_transformer_graph_runs_entries_at_different_positions_in_one_call(fixture_bundle, reference_model):
    """Batch 3 prefilled to different lengths (prefills read a one-slot past), then one call feeding
    two tokens to each at its own position: logits equal torch's full recompute, and each entry's
    keys and values are written at its own slots."""
    import torch

    from taming_deploy.backends.ort_backend import OrtBackend

    backend = OrtBackend(fixture_bundle)
    assert backend.positions_per_entry
    tokens = np.random.default_rng(1).integers(0, 64, size=(3, 90))
    cache = backend.new_cache(3)
    starts = np.array([10, 41, 77])
    for b, p in enumerate(starts):
        backend.transformer_step(tokens[b : b + 1, :p], 0, backend.cache_view(cache, b, b + 1))
    fed = np.stack([tokens[b, p : p + 2] for b, p in enumerate(starts)])
    got = backend.transformer_step(fed, starts, cache)
    with torch.no_grad():
        full, _ = reference_model.transformer(torch.from_numpy(tokens))
    np.testing.assert_allclose(got, np.stack([full[b, p + 1].numpy() for b, p in enumerate(starts)]), atol=1e-5, rtol=0)
    for b, p in enumerate(starts):
        written = np.abs(cache.kv[:, :, b]).sum(axis=(0, 1, 2, 4)) > 0
        assert written.nonzero()[0].tolist() == list(range(p + 2))


def test_exported_graphs_carry_no_exporter_metadata(fixture_bundle):
    """No stack traces, module paths or FX names of torch.export / onnxscript on any node or value."""
    for path in sorted(fixture_bundle.glob("*.onnx")):
        graph = onnx.load(str(path)).graph
        entries = [*graph.node, *graph.input, *graph.output, *graph.value_info, *graph.initializer]
        keys = {p.key for entry in entries for p in entry.metadata_props} | {p.key for p in graph.metadata_props}
        assert not {k for k in keys if k.startswith("pkg.") or k == "namespace"}, path.name


def test_transformer_graph_serves_prefill_and_steps_with_a_fixed_cache(fixture_bundle, reference_model):
    """Batch 3, prefill of 100 tokens, then steps: logits equal torch's full recompute, and the
    runtime wrote the fed tokens' keys and values into exactly their slots."""
    import torch

    from taming_deploy.backends.ort_backend import OrtBackend

    backend = OrtBackend(fixture_bundle)
    tokens = np.random.default_rng(0).integers(0, 64, size=(3, 130))
    cache = backend.new_cache(3)
    before = cache.kv.copy()
    got = [backend.transformer_step(tokens[:, :100], 0, cache)]
    got += [backend.transformer_step(tokens[:, p : p + 1], p, cache) for p in range(100, 130)]
    with torch.no_grad():
        full, _ = reference_model.transformer(torch.from_numpy(tokens))
    np.testing.assert_allclose(np.stack(got, axis=1), full[:, 99:].numpy(), atol=1e-5, rtol=0)
    written = np.abs(cache.kv - before).sum(axis=(0, 1, 2, 3, 5)) > 0
    assert written.nonzero()[0].tolist() == list(range(130))  # exactly the fed positions' slots


def copy_bundle(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    return target


def generate_with(bundle: Path, label_png: Path, tmp_path: Path):
    return run_cli("generate", "--model", str(bundle), "--backend", "ort", "--cond", str(label_png), "--greedy",
                   "--out", str(tmp_path / "out.png"))


def test_tampered_graph_is_refused_naming_the_file(fixture_bundle, label_png, tmp_path):
    bundle = copy_bundle(fixture_bundle, tmp_path)
    data = bytearray((bundle / "decoder.onnx").read_bytes())
    data[-10] ^= 0xFF
    (bundle / "decoder.onnx").write_bytes(bytes(data))
    assert_one_line_error(generate_with(bundle, label_png, tmp_path), "decoder.onnx", "does not match the manifest")


def test_missing_graph_is_refused_naming_the_file(fixture_bundle, label_png, tmp_path):
    bundle = copy_bundle(fixture_bundle, tmp_path)
    (bundle / "transformer.onnx").unlink()
    assert_one_line_error(generate_with(bundle, label_png, tmp_path), "transformer.onnx", "missing")


def test_newer_manifest_version_is_refused(fixture_bundle, label_png, tmp_path):
    bundle = copy_bundle(fixture_bundle, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["format_version"] = BUNDLE_VERSION + 1
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(generate_with(bundle, label_png, tmp_path), f"format version {BUNDLE_VERSION + 1}", "upgrade")


def test_older_manifest_version_is_refused_with_the_fix(fixture_bundle, label_png, tmp_path):
    bundle = copy_bundle(fixture_bundle, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["format_version"] = BUNDLE_VERSION - 1
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(generate_with(bundle, label_png, tmp_path), "older", "taming-deploy export")


def test_graph_inputs_disagreeing_with_manifest_are_refused(fixture_bundle, label_png, tmp_path):
    """The file is intact (hash updated) but the manifest declares other input names."""
    bundle = copy_bundle(fixture_bundle, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["graphs"]["cond_encoder"]["fp32"]["inputs"][0]["name"] = "segmentation"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(generate_with(bundle, label_png, tmp_path), "cond_encoder.onnx", "disagree with the manifest")


def test_failed_export_leaves_existing_bundle_untouched_and_no_partial_files(imported_checkpoint, fixture_bundle, tmp_path, monkeypatch):
    import taming_deploy.export.exporter as exporter

    target = copy_bundle(fixture_bundle, tmp_path)
    before = {p.name: sha256_file(p) for p in target.iterdir()}
    real_export = exporter.export_graph
    calls = []

    def export_then_die(graph, path):
        calls.append(graph.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C halfway
        return real_export(graph, path)

    monkeypatch.setattr(exporter, "export_graph", export_then_die)
    with pytest.raises(KeyboardInterrupt):
        exporter.export_bundle(imported_checkpoint, target, calibration_count=2, echo=lambda line: None)
    assert {p.name: sha256_file(p) for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temporary directory left behind
    Bundle(target).verify_all()


def test_info_describes_bundle(fixture_bundle):
    proc = run_cli("info", str(fixture_bundle))
    assert proc.returncode == 0
    assert "segmentation, 7 labels" in proc.stdout and "transformer.fp16.onnx" in proc.stdout
    passed = re.search(r"(\d+)/(\d+) checks passed", proc.stdout)
    assert passed and passed.group(1) == passed.group(2)


def test_mean_kl_is_the_kl_of_the_softmaxes_by_hand():
    from taming_deploy.export.validate import mean_kl

    reference = np.array([[[0.0, 0.0]], [[5.0, 5.0]]])  # both positions: p = (1/2, 1/2), whatever the offset
    other = np.array([[[np.log(3.0), 0.0]], [[np.log(3.0) - 2, -2.0]]])  # q = (3/4, 1/4)
    by_hand = 0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25)
    assert mean_kl(reference, other) == pytest.approx(by_hand, rel=1e-12)
    assert mean_kl(reference, reference) == 0.0 and mean_kl(other, reference) != pytest.approx(by_hand)  # not symmetric
