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


def test_an_imported_model_holds_the_checkpoint_tensors_once(tmp_path):
    """model_holding assigns the state's own tensors (no second copy of the weights), converts those
    of another dtype to the model's, and copies a tensor whose storage another one already uses (the
    checkpoint format refuses shared tensors)."""
    from taming_deploy.training.checkpoint import model_holding, save_checkpoint
    from taming_deploy.training.models.net2net import TamingModel

    project = {"cond_stage_key": "image", "transformer_config": GPT, "first_stage_config": FIRST,
               "cond_stage_config": "__is_unconditional__"}
    config, _ = model_config({"target": "taming.models.cond_transformer.Net2NetTransformer", "params": project})
    torch.manual_seed(1)
    state = TamingModel(config).state_dict()
    emb = "transformer.tok_emb.weight"
    state[emb] = state[emb].half()  # a checkpoint saved in half precision
    tied = "transformer.blocks.0.attn.key.weight"
    state["transformer.blocks.0.attn.query.weight"] = state[tied]  # two keys, one tensor
    model = model_holding(config, state, "test")
    params = dict(model.named_parameters())
    for name in ("transformer.blocks.0.mlp.0.weight", tied, "first_stage_model.encoder.conv_in.weight"):
        assert params[name].data_ptr() == state[name].data_ptr(), name  # the tensor itself, not a copy
    assert params[emb].dtype == torch.float32
    torch.testing.assert_close(params[emb], state[emb].float(), rtol=0, atol=0)
    query = params["transformer.blocks.0.attn.query.weight"]
    assert query.data_ptr() != params[tied].data_ptr()
    torch.testing.assert_close(query, params[tied], rtol=0, atol=0)
    assert all(not p.is_meta for p in model.parameters()) and all(not b.is_meta for b in model.buffers())
    save_checkpoint(tmp_path / "saved", config, model.state_dict())  # safetensors refuses tensors that share memory
