"""Tiny checkpoints in the original's layout (Lightning-style .ckpt + OmegaConf-style project.yaml) for
every released model kind: the same targets, parameter names and extra tensors (loss.*) as a
checkpoint the original code writes, with random weights."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import yaml

NET2NET = "taming.models.cond_transformer.Net2NetTransformer"
VQMODEL = "taming.models.vqgan.VQModel"
GUMBEL = "taming.models.vqgan.GumbelVQ"
VQSEG = "taming.models.vqgan.VQSegmentationModel"
LABELATOR = "taming.modules.util.Labelator"
GPT_TARGET = "taming.modules.transformer.mingpt.GPT"

DDCONFIG = {"double_z": False, "z_channels": 8, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
LOSS = {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator", "params": {"disc_start": 0}}


def vq_stage(target: str = VQMODEL, n_embed: int = 32, embed_dim: int = 8, **ddconfig) -> dict:
    """A first-stage or VQ condition-stage config: ``ddconfig`` entries override DDCONFIG's."""
    params: dict = {"embed_dim": embed_dim, "n_embed": n_embed, "ddconfig": {**DDCONFIG, **ddconfig}, "lossconfig": LOSS}
    if target == VQSEG:
        params["n_labels"] = params["ddconfig"]["in_channels"]
    if target == GUMBEL:
        params["temperature_scheduler_config"] = {"target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
                                                  "params": {"warm_up_steps": 0, "max_decay_steps": 1000,
                                                             "lr_start": 0.9, "lr_max": 0.9, "lr_min": 1e-6}}
        params["kl_weight"] = 1e-8
    return {"target": target, "params": params}


def gpt(vocab_size: int = 32, block_size: int = 300, n_layer: int = 1, n_head: int = 2, n_embd: int = 32) -> dict:
    return {"target": GPT_TARGET, "params": {"vocab_size": vocab_size, "block_size": block_size, "n_layer": n_layer,
                                             "n_head": n_head, "n_embd": n_embd}}


def net2net_project(first_stage: dict, cond_stage: dict | str, cond_key: str, transformer: dict) -> dict:
    return {"model": {"target": NET2NET, "base_learning_rate": 4.5e-6,
                      "params": {"cond_stage_key": cond_key, "transformer_config": transformer,
                                 "first_stage_config": first_stage, "cond_stage_config": cond_stage,
                                 "permuter_config": {"target": "taming.modules.transformer.permuter.Identity"}}}}


def randomised(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Non-zero position embeddings and spread-out codebooks (fresh inits have zeros and near-equal
    codes), so that every token depends on its context and codes are far from ties."""
    generator = torch.Generator().manual_seed(seed)
    out = dict(state)
    for key, value in state.items():
        if key.endswith(("pos_emb", "quantize.embedding.weight", "quantize.embed.weight")):
            out[key] = torch.randn(value.shape, generator=generator) * (0.02 if key.endswith("pos_emb") else 1.0)
    return out


def write_original(folder: Path, project: dict, seed: int = 0) -> tuple[Path, Path]:
    """project.yaml and last.ckpt (state_dict with the original's names, loss.* tensors, global_step)."""
    from taming_deploy.training.import_taming import model_config, remap_buffers
    from taming_deploy.training.models.net2net import TamingModel

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "project.yaml").write_text(yaml.safe_dump(project))
    assert project["model"]["target"] == NET2NET
    config, _ = model_config(copy.deepcopy(project["model"]), folder / "project.yaml")
    torch.manual_seed(seed)
    state = randomised(TamingModel(config).state_dict(), seed)
    state.update(remap_buffers(project["model"], folder / "project.yaml"))  # the original's buffer holds the .npy
    if project["model"]["params"].get("cond_stage_config") == "__is_first_stage__":
        # the original registers its first stage a second time as the condition stage
        for key in [k for k in state if k.startswith("first_stage_model.")]:
            state["cond_stage_model." + key[len("first_stage_model."):]] = state[key]
    state["first_stage_model.loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4)
    torch.save({"state_dict": state, "global_step": 7, "epoch": 1}, folder / "last.ckpt")
    return folder / "last.ckpt", folder / "project.yaml"
