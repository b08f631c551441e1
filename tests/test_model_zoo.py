"""Every released model kind of the original, from a checkpoint in its layout: import, export with the
default settings, and greedy sampling through PyTorch and ONNX Runtime give the same tokens as the
original's sliding-window loop (training/reference_sampler.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from original_checkpoints import GUMBEL, LABELATOR, VQMODEL, VQSEG, gpt, net2net_project, vq_stage, write_original
from taming_deploy.export.exporter import export_bundle
from taming_deploy.pipeline import Pipeline
from taming_deploy.training.checkpoint import load_model
from taming_deploy.training.import_taming import import_taming
from taming_deploy.training.reference_sampler import reference_greedy

pytestmark = pytest.mark.slow


def deploys_like_the_original(folder: Path, project: dict, cond, size: tuple[int, int] | None = None) -> np.ndarray:
    """Import, export (defaults), sample greedily on torch and ONNX Runtime; both equal the original's loop."""
    ckpt, yaml_path = write_original(folder / "original", project)
    import_taming(ckpt, yaml_path, folder / "imported")
    torch_pipeline = Pipeline.load(folder / "imported", backend="torch")
    on_torch = torch_pipeline.generate(cond, greedy=True, size=size)
    export_bundle(folder / "imported", folder / "bundle", echo=lambda line: None)
    on_ort = Pipeline.load(folder / "bundle", backend="ort").generate(cond, greedy=True, size=size)
    model = load_model(folder / "imported")
    cond_tokens, latent = torch_pipeline.condition_tokens(cond, size)
    spec = torch_pipeline.spec
    original = reference_greedy(model.transformer, cond_tokens, latent, spec.window, spec.image_codebook_size)
    np.testing.assert_array_equal(on_torch.tokens, original)
    np.testing.assert_array_equal(on_ort.tokens, original)
    assert len(np.unique(original)) > 1  # tokens follow their context, not one constant code
    return original


def test_depth_model_exports_and_generates_from_a_16_bit_depth_png(tmp_path):
    depth = vq_stage(VQMODEL, n_embed=16, in_channels=1, out_ch=1)
    project = net2net_project(vq_stage(), depth, "depth", gpt())
    values = np.linspace(0, 65535, 32 * 48, dtype=np.float64).reshape(32, 48) ** 1.5 / 65535**0.5
    Image.fromarray(values.astype(np.uint16)).save(tmp_path / "depth.png")
    tokens = deploys_like_the_original(tmp_path, project, tmp_path / "depth.png")
    assert tokens.shape == (1, 16, 24)  # 12x12 window (block 300) slides over a 16x24 latent


def label_map(path: Path, n_labels: int, height: int = 32, width: int = 48) -> Path:
    """Horizontal bands of labels with a diagonal edge, as an 8-bit class-id PNG."""
    rows, cols = np.mgrid[0:height, 0:width]
    Image.fromarray(((rows + cols // 3) * n_labels // (height + width // 3)).astype(np.uint8), mode="L").save(path)
    return path


def test_gumbel_first_stage_with_segmentation_condition(tmp_path):
    segmentation = vq_stage(VQSEG, n_embed=16, in_channels=5, out_ch=5)
    project = net2net_project(vq_stage(GUMBEL, n_embed=32, embed_dim=8), segmentation, "segmentation", gpt())
    deploys_like_the_original(tmp_path, project, label_map(tmp_path / "labels.png", 5))


def rgb_picture(path: Path, height: int = 32, width: int = 48) -> Path:
    rows, cols = np.mgrid[0:height, 0:width]
    rgb = np.stack([rows * 255 // height, cols * 255 // width, (rows * cols) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def test_image_condition_encoded_by_the_first_stage_itself(tmp_path):
    """cond_stage_config: __is_first_stage__ (e.g. super-resolution from an upscaled low-resolution picture)."""
    project = net2net_project(vq_stage(), "__is_first_stage__", "lr", gpt())
    deploys_like_the_original(tmp_path, project, rgb_picture(tmp_path / "picture.png"))


def test_image_condition_from_a_3_channel_vq_condition_stage(tmp_path):
    """A VQModel condition with in_channels 3 (keypoint renders, edge maps), resized by --size."""
    project = net2net_project(vq_stage(), vq_stage(VQMODEL, n_embed=16), "keypoints", gpt())
    tokens = deploys_like_the_original(tmp_path, project, rgb_picture(tmp_path / "picture.png", 20, 30), size=(48, 32))
    assert tokens.shape == (1, 16, 24)


def test_segmentation_with_f16_first_stages_shaped_like_the_released_ones(tmp_path):
    """ch_mult [1,1,2,2,4] and attention at resolution 16 (as the released ImageNet / S-FLCKR
    first stages), tiny in channels; the 5x5 window (block 64) keeps the calibration images at 80 px."""
    released = {"ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 1, "attn_resolutions": [16], "resolution": 256}
    first = vq_stage(n_embed=32, **released)
    segmentation = vq_stage(VQSEG, n_embed=16, in_channels=6, out_ch=6, **released)
    project = net2net_project(first, segmentation, "segmentation", gpt(block_size=64))
    tokens = deploys_like_the_original(tmp_path, project, label_map(tmp_path / "labels.png", 6, 96, 128))
    assert tokens.shape == (1, 6, 8)


def test_class_conditional(tmp_path):
    project = net2net_project(vq_stage(), {"target": LABELATOR, "params": {"n_classes": 10}}, "class_label", gpt())
    deploys_like_the_original(tmp_path, project, 7, size=(48, 32))


def test_unconditional(tmp_path):
    project = net2net_project(vq_stage(), "__is_unconditional__", "image", gpt())
    deploys_like_the_original(tmp_path, project, None, size=(48, 32))
