"""Image conditions (``__is_first_stage__``, 3-channel VQ condition stages): import, what --cond takes, refusals."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from helpers import assert_one_line_error, run_cli
from original_checkpoints import VQMODEL, gpt, net2net_project, vq_stage, write_original
from taming_deploy.conditions import read_condition_image, resize_condition_image
from taming_deploy.info import describe
from taming_deploy.training.checkpoint import load_model
from taming_deploy.training.import_taming import import_taming


def test_first_stage_condition_is_the_first_stage_even_when_the_checkpoint_lacks_the_copy(tmp_path):
    ckpt, project = write_original(tmp_path / "original", net2net_project(vq_stage(), "__is_first_stage__", "lr", gpt()))
    full = torch.load(ckpt, weights_only=True)
    stripped = {k: v for k, v in full["state_dict"].items() if not k.startswith("cond_stage_model.")}
    torch.save({"state_dict": stripped}, tmp_path / "stripped.ckpt")
    for name, path in (("full", ckpt), ("stripped", tmp_path / "stripped.ckpt")):
        config = import_taming(path, project, tmp_path / name)
        assert config.condition is not None and config.condition.kind == "image" and config.condition.codebook_size == 32
        model = load_model(tmp_path / name)
        first, cond = model.first_stage_model.state_dict(), model.cond_stage_model.state_dict()
        assert first.keys() == cond.keys() and all(torch.equal(first[k], cond[k]) for k in first)


def test_info_says_what_an_image_conditioned_model_expects(tmp_path):
    ckpt, project = write_original(tmp_path / "original", net2net_project(vq_stage(), vq_stage(VQMODEL, n_embed=16), "edges", gpt()))
    import_taming(ckpt, project, tmp_path / "imported")
    lines = describe(tmp_path / "imported")
    assert "condition:    image" in lines and any(line.startswith("expects:") and "RGB image" in line for line in lines)


def test_condition_image_is_rgb_scaled_to_minus_one_one(tmp_path):
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 51)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    image = read_condition_image(tmp_path / "c.png")
    assert image.shape == (3, 2, 3) and image.dtype == np.float32
    np.testing.assert_allclose(image[:, 0, 0], [1.0, -1.0, 51 / 127.5 - 1], atol=1e-6)
    assert (image[:, 1] == -1).all()
    assert resize_condition_image(image, (6, 4)).shape == (3, 4, 6)


def test_a_vq_condition_with_another_channel_count_is_refused_in_one_line(tmp_path):
    ckpt, project = write_original(tmp_path / "original", net2net_project(vq_stage(), vq_stage(VQMODEL, n_embed=16), "edges", gpt()))
    text = project.read_text().replace("in_channels: 3", "in_channels: 2", 1)
    assert text != project.read_text()
    (tmp_path / "two.yaml").write_text(text)
    proc = run_cli("import-taming", str(ckpt), "--config", str(tmp_path / "two.yaml"), "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "2-channel VQ condition", "not supported")
    assert proc.returncode == 2
