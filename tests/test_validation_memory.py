"""The export's validation holds what it must and no more: the PyTorch model is freed before the ONNX
Runtime sessions open, and the sessions that skip weight prepacking compute what the runtime computes."""
from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np

from taming_deploy.backends.ort_backend import OrtBackend
from taming_deploy.export import exporter
from taming_deploy.export.int8_weights import int8_weight_storage
from taming_deploy.export.validate import stepped_logits, transformed_bundle, validation_backend


def probe_sequences(backend: OrtBackend) -> np.ndarray:
    return np.random.default_rng(0).integers(0, backend.spec.vocab_size, size=(2, min(backend.spec.block_size, 40)))


def outputs(backend: OrtBackend) -> list[np.ndarray]:
    spec, rng = backend.spec, np.random.default_rng(1)
    side = spec.window[0] * spec.downsample_factor
    images = rng.uniform(-1, 1, size=(1, 3, side, side)).astype(np.float32)
    tokens = rng.integers(0, spec.image_codebook_size, size=(1, *spec.window))
    return [stepped_logits(backend, probe_sequences(backend), 20), backend.encode(images), backend.decode(tokens)]


def assert_same_outputs(got: OrtBackend, expected: OrtBackend) -> None:
    for a, b in zip(outputs(got), outputs(expected)):
        np.testing.assert_array_equal(a, b)


def test_unpacked_float_sessions_equal_the_runtime(fixture_bundle: Path) -> None:
    for precision in ("fp32", "fp16"):
        validation = validation_backend(fixture_bundle, precision)
        assert validation.options.get_session_config_entry("session.disable_prepacking") == "1"
        assert_same_outputs(validation, OrtBackend(fixture_bundle, precision))


def test_int8_weight_sessions_are_validated_as_the_runtime_runs_them(fixture_bundle: Path, tmp_path: Path) -> None:
    """Packed, the fused int8-weight MatMul computes differently; checking it unpacked would validate
    numbers the runtime never produces."""
    stored = transformed_bundle(fixture_bundle, "fp32", int8_weight_storage, tmp_path, weight_storage="int8")
    runtime = OrtBackend(tmp_path, "fp32")
    assert_same_outputs(stored, runtime)
    unpacked = OrtBackend(tmp_path, "fp32", prepack_weights=False)
    assert not np.array_equal(stepped_logits(unpacked, probe_sequences(runtime), 20), stepped_logits(runtime, probe_sequences(runtime), 20)), \
        "packing no longer changes int8-weight results: these sessions could skip it too"


def test_torch_model_and_its_weights_are_freed_before_the_sessions_open(tiny_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    loaded: list[weakref.ref] = []
    opened: list[bool] = []
    load_model, open_backend = exporter.load_model, exporter.validation_backend

    def recording_load(path: Path):
        model = load_model(path)
        loaded.extend(weakref.ref(tensor) for tensor in [model, *model.parameters()])
        return model

    def checking_backend(*args, **kwargs):
        opened.append(all(ref() is None for ref in loaded))
        return open_backend(*args, **kwargs)

    monkeypatch.setattr(exporter, "load_model", recording_load)
    monkeypatch.setattr(exporter, "validation_backend", checking_backend)
    exporter.export_bundle(tiny_checkpoint, tmp_path / "bundle", calibration_count=2, echo=lambda line: None)
    assert loaded and opened == [True]
