"""import-taming for every supported condition kind, from original-style configs and checkpoints,
and generation from each kind's natural condition."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from helpers import assert_one_line_error, run_cli
from taming_deploy.pipeline import Pipeline
from taming_deploy.training.import_taming import import_taming, model_config

DDCONFIG = {"double_z": False, "z_channels": 8, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
FIRST = {"target": "taming.models.vqgan.VQModel",
         "params": {"embed_dim": 8, "n_embed": 32, "ddconfig": DDCONFIG, "lossconfig": {"target": "taming.modules.losses.DummyLoss"}}}
GPT = {"target": "taming.modules.transformer.mingpt.GPT",
       "params": {"vocab_size": 32, "block_size": 300, "n_layer": 1, "n_head": 2, "n_embd": 32}}
CONDITIONS = {
    "depth": ({"target": "taming.models.vqgan.VQModel",
               "params": {"embed_dim": 8, "n_embed": 16, "ddconfig": {**DDCONFIG, "in_channels": 1, "out_ch": 1}}}, "depth"),
    "class": ({"target": "taming.modules.util.Labelator", "params": {"n_classes": 10}}, "class_label"),
    "unconditional": ("__is_unconditional__", "image"),
    "sos": ({"target": "taming.modules.util.SOSProvider", "params": {"sos_token": 3}}, "image"),
}


def original_files(kind: str, folder: Path) -> tuple[Path, Path]:
    """A project.yaml and a Lightning-style checkpoint (with loss.* tensors) of the given kind."""
    cond, key = CONDITIONS[kind]
    project = {"model": {"target": "taming.models.cond_transformer.Net2NetTransformer",
                         "params": {"cond_stage_key": key, "transformer_config": GPT, "first_stage_config": FIRST,
                                    "cond_stage_config": cond}}}
    (folder / "project.yaml").write_text(yaml.safe_dump(project))
    from taming_deploy.training.models.net2net import TamingModel

    config, _ = model_config(project["model"])
    torch.manual_seed(0)
    state = TamingModel(config).state_dict()
    state["first_stage_model.loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4)
    torch.save({"state_dict": state, "global_step": 7}, folder / "last.ckpt")
    return folder / "last.ckpt", folder / "project.yaml"


@pytest.mark.parametrize("kind", sorted(CONDITIONS))
def test_import_and_generate_each_condition_kind(kind, tmp_path):
    ckpt, project = original_files(kind, tmp_path)
    config = import_taming(ckpt, project, tmp_path / "imported")
    pipeline = Pipeline.load(tmp_path / "imported", backend="torch")
    if kind == "depth":
        depth = np.linspace(0, 65535, 32 * 48, dtype=np.float32).reshape(32, 48)
        Image.fromarray(depth.astype(np.uint16)).save(tmp_path / "depth.png")  # a 16-bit depth PNG
        result = pipeline.generate(tmp_path / "depth.png", greedy=True)
        assert result.tokens.shape == (1, 16, 24)
    elif kind == "class":
        result = pipeline.generate(7, greedy=True, size=(32, 32))
        assert result.tokens.shape == (1, 16, 16)
    else:
        result = pipeline.generate(None, greedy=True, size=(24, 16))
        assert result.tokens.shape == (1, 8, 12)
    assert config.condition is not None
    expected_kind = {"sos": "unconditional"}.get(kind, kind)
    assert config.condition.kind == expected_kind
    if kind == "sos":
        assert config.condition.sos_token == 3
    assert result.images[0].size == (result.tokens.shape[2] * 2, result.tokens.shape[1] * 2)


def test_class_id_out_of_range_is_a_clear_error(tmp_path):
    ckpt, project = original_files("class", tmp_path)
    import_taming(ckpt, project, tmp_path / "imported")
    proc = run_cli("generate", "--model", str(tmp_path / "imported"), "--backend", "torch", "--class-id", "12",
                   "--out", str(tmp_path / "o.png"))
    assert_one_line_error(proc, "class id 12", "0..9")


def test_unsupported_condition_stage_is_named(tmp_path):
    ckpt, project = original_files("class", tmp_path)
    doc = yaml.safe_load(project.read_text())
    doc["model"]["params"]["cond_stage_config"] = {"target": "taming.modules.misc.coord.CoordStage", "params": {}}
    project.write_text(yaml.safe_dump(doc))
    proc = run_cli("import-taming", str(ckpt), "--config", str(project), "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "CoordStage", "not supported")
