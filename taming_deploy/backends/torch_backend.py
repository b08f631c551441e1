"""The PyTorch backend: runs a project checkpoint's modules directly; the oracle for every faster path.

Importing this module needs torch (the ``train`` extra); ``backends.load_backend`` turns its absence
into a clear message.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from taming_deploy.spec import ModelSpec
from taming_deploy.training.checkpoint import load_model
from taming_deploy.training.models.net2net import TamingModel


class TorchBackend:
    name = "torch"
    positions_per_entry = True  # GPT.step takes one position per entry

    def __init__(self, model: TamingModel, device: str | torch.device = "cpu"):
        self.model = model
        self.spec: ModelSpec = model.config.spec()
        self.device = device

    @classmethod
    def load(cls, checkpoint_dir: Path, device: str = "cpu") -> "TorchBackend":
        return cls(load_model(Path(checkpoint_dir), device=device), device)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    @torch.no_grad()
    def condition_tokens(self, condition: np.ndarray) -> np.ndarray:
        return self.model.cond_stage_model.condition_tokens(self._tensor(condition)).cpu().numpy()

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> np.ndarray:
        return self.model.first_stage_model.encode(self._tensor(images)).indices.cpu().numpy()

    @torch.no_grad()
    def decode(self, tokens: np.ndarray) -> np.ndarray:
        return self.model.first_stage_model.decode_indices(self._tensor(tokens)).cpu().numpy()

    def new_cache(self, batch: int) -> torch.Tensor:
        return self.model.transformer.new_cache(batch)

    def cache_view(self, cache: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return cache[:, :, start:stop]

    @torch.no_grad()
    def transformer_step(self, tokens: np.ndarray, position: int | np.ndarray, cache: torch.Tensor) -> np.ndarray:
        return self.model.transformer.step(self._tensor(tokens), cache, position).float().cpu().numpy()
