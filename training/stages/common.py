"""Pieces the stages share: mixed precision, gradient accumulation under DDP, the learning-rate schedule, image grids, checkpointed weights."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from taming_deploy.training.distributed import DistEnv


def autocast(env: DistEnv, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA ('auto' or 'bf16'), nothing on CPU or with 'fp32'."""
    if env.device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def learning_rate(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to a tenth of ``base``: a pure function of the step (resume-safe)."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def wrap_ddp(module: nn.Module, env: DistEnv) -> nn.Module:
    if not env.distributed:
        return module
    return DistributedDataParallel(module, device_ids=[env.device.index] if env.device.type == "cuda" else None)


@contextlib.contextmanager
def sync_gradients(module: nn.Module, last_micro_batch: bool) -> Iterator[None]:
    """DDP all-reduces gradients only on the last micro-batch of an accumulated step."""
    if isinstance(module, DistributedDataParallel) and not last_micro_batch:
        with module.no_sync():
            yield
    else:
        yield


def average_gradients(module: nn.Module, env: DistEnv) -> None:
    """Explicit all-reduce for a module that is not DDP-wrapped (the discriminator, which the
    generator pass also calls, so DDP's one-forward-one-backward bookkeeping does not fit it)."""
    if not env.distributed:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= env.world_size


def broadcast_from_rank0(tensors: list[torch.Tensor], env: DistEnv) -> None:
    """Make every rank hold rank 0's values (what DDP does for the modules it wraps)."""
    if env.distributed:
        for t in tensors:
            dist.broadcast(t.data, src=0)


def to_device(array: np.ndarray, env: DistEnv) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(env.device, non_blocking=True)


def image_grid(rows: list[np.ndarray]) -> np.ndarray:
    """Rows of (N, 3, H, W) images in [-1, 1] -> one (H*rows, W*N, 3) uint8 picture."""
    lines = []
    for row in rows:
        pixels = ((np.clip(row, -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
        lines.append(np.concatenate(list(pixels), axis=1))
    return np.concatenate(lines, axis=0)


class ModelWeights:
    """``weights``/``restore`` for a stage whose whole trained state is ``self.model`` (no extra networks)."""

    model: nn.Module

    def weights(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return self.model.state_dict(), {}

    def restore(self, weights: dict[str, torch.Tensor], extra: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(weights)
