"""Tiny stage configs for training tests: small enough for a CPU test, same code paths as real runs."""
from __future__ import annotations

from pathlib import Path

import yaml

from taming_deploy.training.train_config import LoopConfig, TrainConfig

TINY_AUTOENCODER = {
    "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [16], "in_channels": 3, "out_ch": 3,
    "resolution": 32, "z_channels": 8, "embed_dim": 8, "n_embed": 32,
}
TINY_COND = {**TINY_AUTOENCODER, "in_channels": 8, "out_ch": 8, "n_embed": 16}
TINY_GPT = {"vocab_size": 32, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32}
TINY_LOOP = {"batch_size": 2, "image_size": 32, "lr": 1e-3, "checkpoint_every": 3, "log_every": 1, "image_every": 1000,
             "workers": 0, "token_cache_images": 6, "token_cache_size": 32}


def tiny_config(stage: str, **loop) -> TrainConfig:
    model = {"vqgan": TINY_AUTOENCODER, "cond": TINY_COND, "transformer": TINY_GPT}[stage]
    loss = {"disc_start": 0, "disc_ndf": 8, "disc_num_layers": 2} if stage == "vqgan" else {}
    return TrainConfig(stage=stage, model=dict(model), loss=loss, train=LoopConfig(**{**TINY_LOOP, **loop}), window=(4, 4))


def write_yaml(cfg: TrainConfig, path: Path) -> Path:
    doc = {"stage": cfg.stage, "model": cfg.model, "train": cfg.train.__dict__}
    doc.update({"window": list(cfg.window)} if cfg.stage == "transformer" else {"loss": cfg.loss})
    path.write_text(yaml.safe_dump(doc))
    return path
