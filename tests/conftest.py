"""Shared fixtures. The reference fixture is a checkpoint of the original implementation with outputs
recorded by running it (see tests/data/segcond_small); TAMING_DEPLOY_REFERENCE points the suite at
another such directory."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# One torch/OpenMP thread per test process (and the CLI subprocesses it starts), unless the caller set
# one: the suite runs one xdist worker per core, and on a 2-core machine two workers with a thread pool
# each oversubscribe the cores; the small models here then spend most of their time waiting for pool
# threads (measured: test_sampler's original-loop test 4x the wall and CPU time with the default).
os.environ.setdefault("OMP_NUM_THREADS", "1")

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
    from taming_deploy.training.import_taming import import_taming

    out = tmp_path_factory.mktemp("imported") / "checkpoint"
    import_taming(REFERENCE_DIR / "last.ckpt", REFERENCE_DIR / "project.yaml", out)
    return out


@pytest.fixture(scope="session")
def reference_model(imported_checkpoint: Path):
    from taming_deploy.training.checkpoint import load_model

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
    from taming_deploy.export.exporter import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "bundle"
    export_bundle(imported_checkpoint, out, calibration_count=4, echo=lambda line: None)
    return out


def tiny_model_config(kind: str = "segmentation"):
    """A complete model small enough to export and sample in seconds: f=4, 8 landscape labels with
    their palette (segmentation), or an unconditional model."""
    from taming_deploy.spec import ConditionSpec
    from taming_deploy.training.config import ModelConfig
    from taming_deploy.training.data.synthetic_landscapes import LABELS, PALETTE
    from taming_deploy.training.models.gpt import GPTConfig
    from taming_deploy.training.models.vqgan import AutoencoderConfig

    autoencoder = AutoencoderConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(), in_channels=3,
                                    out_ch=3, resolution=32, z_channels=8, embed_dim=8, n_embed=32)
    if kind == "segmentation":
        condition = ConditionSpec(kind="segmentation", n_labels=8, codebook_size=16, label_names=LABELS, palette=PALETTE)
        cond_autoencoder = AutoencoderConfig(**{**autoencoder.__dict__, "in_channels": 8, "out_ch": 8, "n_embed": 16})
    else:
        condition, cond_autoencoder = ConditionSpec(kind="unconditional", sos_token=0), None
    return ModelConfig(first_stage=autoencoder, condition=condition, condition_autoencoder=cond_autoencoder,
                       transformer=GPTConfig(vocab_size=32, block_size=512, n_layer=1, n_head=2, n_embd=32))


def save_tiny_model(path: Path, kind: str = "segmentation") -> Path:
    import torch

    from taming_deploy.training.checkpoint import save_checkpoint
    from taming_deploy.training.models.net2net import TamingModel

    torch.manual_seed(0)
    config = tiny_model_config(kind)
    save_checkpoint(path, config, TamingModel(config).state_dict())
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "checkpoint")
