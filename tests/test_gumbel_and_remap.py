"""Gumbel first stages (the original's GumbelVQ) and codebook remapping (``remap``): import from the
original's layout, deterministic encoding, decoding by table lookup, export with every variant."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from helpers import assert_one_line_error, run_cli
from original_checkpoints import GUMBEL, VQMODEL, gpt, net2net_project, vq_stage, write_original
from taming_deploy.errors import UserError
from taming_deploy.training.checkpoint import load_model
from taming_deploy.training.import_taming import import_taming

UNCONDITIONAL = "__is_unconditional__"


def gumbel_project(**first_stage_params) -> dict:
    first = vq_stage(GUMBEL, n_embed=32, embed_dim=8)
    first["params"].update(first_stage_params)
    return net2net_project(first, UNCONDITIONAL, "image", gpt(block_size=64))


@pytest.fixture(scope="module")
def gumbel_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gumbel")
    ckpt, project = write_original(folder / "original", gumbel_project())
    import_taming(ckpt, project, folder / "imported")
    return folder / "imported"


def test_gumbel_checkpoint_has_the_originals_quantizer_keys(tmp_path):
    ckpt, _ = write_original(tmp_path, gumbel_project())
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    shapes = {k: tuple(v.shape) for k, v in state.items() if k.startswith("first_stage_model.quantize.")}
    # GumbelQuantize: proj = Conv2d(z_channels, n_embed, 1) with bias, embed = Embedding(n_embed, embed_dim)
    assert shapes == {"first_stage_model.quantize.proj.weight": (32, 8, 1, 1), "first_stage_model.quantize.proj.bias": (32,),
                      "first_stage_model.quantize.embed.weight": (32, 8)}


@torch.no_grad()
def test_gumbel_encodes_as_the_argmax_of_the_logits_and_decodes_by_table_lookup(gumbel_checkpoint):
    vq = load_model(gumbel_checkpoint).first_stage_model
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    z = vq.quant_conv(vq.encoder(images))
    logits = F.conv2d(z, vq.quantize.proj.weight, vq.quantize.proj.bias)  # the original's proj, by hand
    latent = vq.encode(images)
    assert torch.equal(latent.indices, logits.argmax(dim=1))
    assert len(latent.indices.unique()) > 4
    table = vq.quantize.embed.weight[latent.indices].permute(0, 3, 1, 2)
    torch.testing.assert_close(vq.decode_indices(latent.indices), vq.decoder(vq.post_quant_conv(table)), rtol=0, atol=0)


@pytest.mark.slow
def test_gumbel_exports_with_fp16_and_int8_weight_variants(gumbel_checkpoint, tmp_path):
    from taming_deploy.backends.ort_backend import OrtBackend
    from taming_deploy.export.exporter import export_bundle

    export_bundle(gumbel_checkpoint, tmp_path / "bundle", echo=lambda line: None, int8_weights=True)
    checks = json.loads((tmp_path / "bundle" / "manifest.json").read_text())["validation"]["checks"]
    assert {c["precision"] for c in checks} == {"fp32", "fp16", "int8 weights"} and all(c["passed"] for c in checks)
    images = np.random.default_rng(0).uniform(-1, 1, size=(2, 3, 32, 48)).astype(np.float32)
    expected = load_model(gumbel_checkpoint).first_stage_model.encode(torch.from_numpy(images)).indices.numpy()
    np.testing.assert_array_equal(OrtBackend(tmp_path / "bundle", "fp16").encode(images), expected)


def test_gumbel_needs_embed_dim_equal_to_z_channels(tmp_path):
    project = gumbel_project()
    project["model"]["params"]["first_stage_config"]["params"]["embed_dim"] = 4
    (tmp_path / "project.yaml").write_text(yaml.safe_dump(project))
    torch.save({"state_dict": {}}, tmp_path / "last.ckpt")
    proc = run_cli("import-taming", str(tmp_path / "last.ckpt"), "--config", str(tmp_path / "project.yaml"), "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "GumbelVQ needs embed_dim == z_channels")
    assert proc.returncode == 2


def test_unknown_first_stage_target_is_named(tmp_path):
    ckpt, project_path = write_original(tmp_path, gumbel_project())
    project = yaml.safe_load(project_path.read_text())
    project["model"]["params"]["first_stage_config"]["target"] = "taming.models.vqgan.EMAVQ"
    project_path.write_text(yaml.safe_dump(project))
    proc = run_cli("import-taming", str(ckpt), "--config", str(project_path), "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "first_stage_config", "taming.models.vqgan.EMAVQ", "not supported")
    assert proc.returncode == 2


def remap_project(folder, target: str, unknown_index: str, used: np.ndarray):
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "used_codes.npy", used)
    first = vq_stage(target, n_embed=32, embed_dim=8)
    first["params"].update(remap="used_codes.npy", unknown_index=unknown_index)  # relative to the config
    return net2net_project(first, UNCONDITIONAL, "image", gpt(block_size=64))


USED = np.array([3, 1, 4, 15, 9, 26, 5, 8, 30, 7, 2, 11], dtype=np.int64)


@torch.no_grad()
@pytest.mark.parametrize("target", [VQMODEL, GUMBEL])
def test_remap_tokens_are_positions_in_the_used_list(tmp_path, target):
    """"extra": a code outside the list is token len(used), which decodes as used[0] (the original's
    unmap); Gumbel chooses among the used codes' logits only, as the original does."""
    ckpt, project = write_original(tmp_path / "original", remap_project(tmp_path / "original", target, "extra", USED))
    config = import_taming(ckpt, project, tmp_path / "imported")
    assert config.spec().image_codebook_size == len(USED) + 1
    vq = load_model(tmp_path / "imported").first_stage_model
    assert torch.equal(vq.quantize.used, torch.from_numpy(USED))
    z = vq.quant_conv(vq.encoder(torch.rand(2, 3, 32, 48) * 2 - 1))
    tokens = vq.quantize.codes(z)
    rows = z.permute(0, 2, 3, 1).reshape(-1, 8)
    if target == VQMODEL:
        full = torch.cdist(rows, vq.quantize.embedding.weight).argmin(dim=1).view(tokens.shape)
        position = {int(code): k for k, code in enumerate(USED)}
        expected = torch.tensor([position.get(int(c), len(USED)) for c in full.flatten()]).view(tokens.shape)
        table = vq.quantize.embedding.weight
    else:
        logits = rows @ vq.quantize.proj.weight.view(32, 8).t() + vq.quantize.proj.bias
        expected = logits[:, torch.from_numpy(USED)].argmax(dim=1).view(tokens.shape)
        table = vq.quantize.embed.weight
    assert torch.equal(tokens, expected)
    all_tokens = torch.arange(len(USED) + 1).view(1, 1, -1)
    decoded_codes = torch.from_numpy(np.append(USED, USED[0]))
    torch.testing.assert_close(vq.quantize.lookup(all_tokens), table[decoded_codes].t().view(1, 8, 1, -1), rtol=0, atol=0)


def test_missing_remap_file_is_a_clear_error(tmp_path):
    ckpt, project = write_original(tmp_path / "original", remap_project(tmp_path / "original", VQMODEL, "random", USED))
    (tmp_path / "original" / "used_codes.npy").unlink()
    with pytest.raises(UserError, match=r"remap file used_codes.npy .*original/used_codes.npy.* does not exist"):
        import_taming(ckpt, project, tmp_path / "imported")
