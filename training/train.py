"""`taming-deploy train STAGE`: build the stage from its config and run the loop (also under torchrun)."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from taming_deploy.training import distributed
from taming_deploy.training.data.sources import open_source
from taming_deploy.training.loop import run_training
from taming_deploy.training.stages.cond import ConditionStage
from taming_deploy.training.stages.transformer import TransformerStage
from taming_deploy.training.stages.vqgan import VQGANStage
from taming_deploy.training.train_config import TrainConfig


def train(cfg: TrainConfig, data: str, out: Path, resume: bool = False, echo: Callable[[str], None] = print) -> Path:
    env = distributed.setup()
    try:
        torch.manual_seed(cfg.train.seed + env.rank)
        source = open_source(data)
        if cfg.stage == "vqgan":
            stage = VQGANStage(cfg, env, source)
        elif cfg.stage == "cond":
            stage = ConditionStage(cfg, env, source)
        else:
            stage = TransformerStage(cfg, env, source, out)
        if env.is_main:
            Path(out).mkdir(parents=True, exist_ok=True)
            record = {"stage": cfg.stage, "data": data, "world_size": env.world_size, "config": cfg.__dict__ | {"train": cfg.train.__dict__}}
            (Path(out) / "train_config.json").write_text(json.dumps(record, indent=2, default=str))
        return run_training(stage, cfg, out, env, resume, echo)
    finally:
        distributed.teardown()
