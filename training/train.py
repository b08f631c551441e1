"""`taming-deploy train STAGE`: build the stage from its config and run the loop (also under torchrun)."""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from taming_deploy.errors import UserError
from taming_deploy.fileutil import check_can_create_in, existing_ancestor
from taming_deploy.training import distributed
from taming_deploy.training.data.sources import open_source
from taming_deploy.training.loop import FINAL, LAST, run_training
from taming_deploy.training.metrics import METRICS_FILE
from taming_deploy.training.stages.cond import ConditionStage
from taming_deploy.training.stages.transformer import TransformerStage
from taming_deploy.training.stages.vqgan import VQGANStage
from taming_deploy.training.train_config import TrainConfig


CONFIG_RECORD = "train_config.json"
RUN_ENTRIES = (CONFIG_RECORD, METRICS_FILE, "tensorboard", LAST, FINAL)  # what a run writes into its directory


def check_new_run_dir(out: Path, force: bool = False) -> None:
    """A new run writes RUN_ENTRIES into ``out``: only a new or empty directory may take them, so that no
    user file and no earlier run is overwritten (with ``force``, any directory: see ``clear_run_entries``)."""
    if os.path.lexists(out):
        if out.is_symlink() or not out.is_dir():
            raise UserError(f"{out} exists and is not a directory; choose another --out")
        if not force and (out / LAST).exists():
            raise UserError(f"{out} already holds a run: pass --resume to continue it, --force to start over, or choose another --out")
        if not force and (entries := sorted(entry.name for entry in out.iterdir())):
            shown = ", ".join(entries[:3]) + (f", ... ({len(entries)} entries)" if len(entries) > 3 else "")
            raise UserError(f"{out} already holds files ({shown}); a new run needs a new or empty --out "
                            "(or --force: the run's own entries are replaced, other files kept)")
    check_can_create_in(out if out.is_dir() else existing_ancestor(out), out / CONFIG_RECORD)


def clear_run_entries(out: Path) -> None:
    """``--force``: remove what an earlier run left under the names a run writes; nothing else."""
    for name in RUN_ENTRIES:
        entry = out / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif os.path.lexists(entry):
            entry.unlink()


def train(cfg: TrainConfig, data: str, out: Path, resume: bool = False, echo: Callable[[str], None] = print,
          force: bool = False) -> Path:
    """``force`` (a new run only): ``out`` may hold other files; the entries a run writes are replaced."""
    if resume and force:
        raise UserError("--force starts a new run in a directory that holds files; it does not apply to --resume")
    if not resume:
        check_new_run_dir(Path(out), force)  # every rank, before the rendezvous: rank 0 writes only after it
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
            if force:
                clear_run_entries(Path(out))
            record = {"stage": cfg.stage, "data": data, "world_size": env.world_size, "config": cfg.__dict__ | {"train": cfg.train.__dict__}}
            (Path(out) / CONFIG_RECORD).write_text(json.dumps(record, indent=2, default=str))
        return run_training(stage, cfg, out, env, resume, echo)
    finally:
        distributed.teardown()
