"""The training loop shared by the three stages: data, checkpoints, resume, logs, progress.

A stage (training/stages/*) owns its model, optimizers and one optimisation step; this loop owns
everything around it. Batches are a pure function of (seed, step, rank), checkpoints are atomic
directories written every ``checkpoint_every`` steps and at the end, and ``resume`` restores model,
optimizers and RNG from the last one, so a killed run continues as if it had not stopped.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from taming_deploy.errors import UserError
from taming_deploy.progress import progress_bar
from taming_deploy.training.checkpoint import save_checkpoint
from taming_deploy.training.config import ModelConfig
from taming_deploy.training.distributed import DistEnv, barrier, mean_across_ranks
from taming_deploy.training.metrics import MetricsLog
from taming_deploy.training.train_config import TrainConfig
from taming_deploy.training.train_state import load_train_state, save_train_state

LAST = "last"  # resumable state, refreshed every checkpoint_every steps
FINAL = "final"  # the finished model: a plain project checkpoint, ready for `taming-deploy export`


class Stage(Protocol):
    config: ModelConfig
    optimizers: dict[str, torch.optim.Optimizer]

    def sample_batch(self, rng: np.random.Generator) -> Any: ...

    def train_step(self, micro_batches: list[Any], step: int) -> dict[str, float]: ...

    def weights(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(project checkpoint weights, training-only weights such as the discriminator)."""
        ...

    def restore(self, weights: dict[str, torch.Tensor], extra: dict[str, torch.Tensor]) -> None: ...

    def evaluate(self, step: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Validation scalars and image grids (H, W, 3 uint8)."""
        ...


class StepBatches(Dataset):
    """Item ``step`` = the micro-batches of that step on this rank, drawn from rng(seed, step, rank)."""

    def __init__(self, sample: Callable[[np.random.Generator], Any], seed: int, rank: int, grad_accum: int):
        self.sample, self.seed, self.rank, self.grad_accum = sample, seed, rank, grad_accum

    def __len__(self) -> int:
        return 1 << 40

    def __getitem__(self, step: int) -> list[Any]:
        rng = np.random.default_rng([self.seed, step, self.rank])
        return [self.sample(rng) for _ in range(self.grad_accum)]


def run_training(stage: Stage, cfg: TrainConfig, run_dir: Path, env: DistEnv, resume: bool, echo: Callable[[str], None]) -> Path:
    loop = cfg.train
    run_dir = Path(run_dir)
    state_dir = run_dir / LAST
    start = 0
    if resume:
        weights, extra, start = load_train_state(state_dir, stage.optimizers)
        stage.restore(weights, extra)
        if env.is_main:
            echo(f"resuming {run_dir} at step {start}")
    elif state_dir.exists():
        raise UserError(f"{run_dir} already holds a run: pass --resume to continue it or choose another --out")
    if start >= loop.steps:
        raise UserError(f"{run_dir} is at step {start}, not before --steps {loop.steps}: nothing to do")
    barrier(env)
    metrics = MetricsLog(run_dir, resume_step=start) if env.is_main else None
    batches = DataLoader(
        StepBatches(stage.sample_batch, loop.seed, env.rank, loop.grad_accum),
        batch_size=None,
        sampler=range(start, loop.steps),
        num_workers=loop.workers,
        persistent_workers=False,
    )
    window: dict[str, list[float]] = {}
    started = time.perf_counter()

    def checkpoint(step: int) -> None:
        if env.is_main:
            weights, extra = stage.weights()
            save_train_state(state_dir, stage.config, weights, stage.optimizers, step, extra)
        barrier(env)

    with progress_bar(f"{cfg.stage}", "it", enabled=None if env.is_main else False) as update:
        for step, micro_batches in zip(range(start, loop.steps), batches):
            logs = stage.train_step(micro_batches, step)
            done = step + 1
            for name, value in logs.items():
                window.setdefault(name, []).append(value)
            if done % loop.log_every == 0 or done == loop.steps:
                averaged = {k: mean_across_ranks(float(np.mean(v)), env) for k, v in window.items()}
                averaged["train/steps_per_second"] = len(next(iter(window.values()))) / max(time.perf_counter() - started, 1e-9)
                window, started = {}, time.perf_counter()
                if metrics is not None:
                    metrics.scalars(done, averaged)
            if (done % loop.image_every == 0 or done == loop.steps) and metrics is not None:
                scalars, grids = stage.evaluate(done)
                metrics.scalars(done, scalars)
                for name, grid in grids.items():
                    metrics.images(done, name, grid)
            if done % loop.checkpoint_every == 0 or done == loop.steps:
                checkpoint(done)
            update(done, loop.steps, "  ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in logs.items() if "loss" in k))
    if env.is_main:
        weights, _ = stage.weights()
        save_checkpoint(run_dir / FINAL, stage.config, weights, extra={"step": loop.steps})
        metrics.close()  # type: ignore[union-attr]
    barrier(env)
    return run_dir / FINAL
