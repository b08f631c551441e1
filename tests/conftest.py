"""Shared fixtures. The reference fixture is a checkpoint of the original implementation with outputs
recorded by running it (see tests/data/segcond_small); TAMING_DEPLOY_REFERENCE points the suite at
another such directory."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REFERENCE_DIR = Path(os.environ.get("TAMING_DEPLOY_REFERENCE", Path(__file__).parent / "data" / "segcond_small"))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def expected() -> dict[str, np.ndarray]:
    with np.load(REFERENCE_DIR / "expected.npz") as data:
        return dict(data)


@pytest.fixture(scope="session")
def imported_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference checkpoint converted to this project's format once per test session."""
    from training.import_taming import import_taming

    out = tmp_path_factory.mktemp("imported") / "checkpoint"
    import_taming(REFERENCE_DIR / "last.ckpt", REFERENCE_DIR / "project.yaml", out)
    return out


@pytest.fixture(scope="session")
def reference_model(imported_checkpoint: Path):
    from training.checkpoint import load_model

    return load_model(imported_checkpoint)


@pytest.fixture(scope="session")
def label_png(tmp_path_factory: pytest.TempPathFactory, expected: dict[str, np.ndarray]) -> Path:
    """The fixture's label map as an 8-bit class-id PNG."""
    from PIL import Image

    path = tmp_path_factory.mktemp("labels") / "labels.png"
    Image.fromarray(expected["labels"].astype(np.uint8), mode="L").save(path)
    return path


@pytest.fixture(scope="session")
def fixture_bundle(tmp_path_factory: pytest.TempPathFactory, imported_checkpoint: Path) -> Path:
    """The reference checkpoint exported (fp32 + fp16, validated) once per test session."""
    from export.exporter import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "bundle"
    export_bundle(imported_checkpoint, out, calibration_count=4, echo=lambda line: None)
    return out
