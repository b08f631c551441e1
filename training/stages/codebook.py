"""Dead-code restarts: a training-time remedy for codebook collapse (the model's math is unchanged).

Small VQ models trained from scratch often end up using a few percent of their codebook: codes that
no encoder output is near get no gradient and never move. Every ``every`` steps, codes that no
latent picked during that interval are moved onto randomly chosen recent encoder outputs, and their
Adam moments are cleared. Under DDP, usage is summed over ranks and rank 0's choice is broadcast, so
every rank keeps the same codebook.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from taming_deploy.training.distributed import DistEnv
from taming_deploy.training.models.quantizer import VectorQuantizer


class CodebookRestarter:
    def __init__(self, quantizer: VectorQuantizer, optimizer: torch.optim.Optimizer, every: int, until: int, env: DistEnv):
        self.quantizer, self.optimizer, self.every, self.until, self.env = quantizer, optimizer, every, until, env
        self.usage = torch.zeros(quantizer.n_embed, device=quantizer.embedding.weight.device)
        self.recent: torch.Tensor | None = None  # (N, embed_dim) encoder outputs of the last step

    def observe(self, indices: torch.Tensor, latent: torch.Tensor) -> None:
        self.usage += torch.bincount(indices.reshape(-1), minlength=self.quantizer.n_embed).float()
        self.recent = latent.detach().permute(0, 2, 3, 1).reshape(-1, latent.shape[1]).float()

    @torch.no_grad()
    def maybe_restart(self, step: int) -> int:
        """Restart unused codes if this step ends an interval; returns how many were restarted."""
        if self.every <= 0 or step >= self.until or (step + 1) % self.every != 0 or self.recent is None:
            return 0
        if self.env.distributed:
            dist.all_reduce(self.usage)
        weight = self.quantizer.embedding.weight
        dead = torch.nonzero(self.usage == 0).flatten()
        if len(dead) > 0:
            picks = torch.randint(0, len(self.recent), (len(dead),), device=self.recent.device)
            noise = 0.01 * self.recent.std() * torch.randn(len(dead), weight.shape[1], device=weight.device)
            weight.data[dead] = self.recent[picks].to(weight.dtype) + noise
            if self.env.distributed:
                dist.broadcast(weight.data, src=0)
            state = self.optimizer.state.get(weight, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][dead] = 0
        self.usage.zero_()
        return len(dead)
