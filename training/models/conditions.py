"""Condition stages: what turns a user's condition into the tokens prepended to the image tokens.

- segmentation: a VQ autoencoder on one-hot label maps; input (B, H, W) class ids -> (B, h, w) tokens
- depth / image: a VQ autoencoder on a continuous map in [-1, 1]: 1-channel depth, or an RGB image
  (``__is_first_stage__``: a copy of the first stage); input (B, C, H, W) -> (B, h, w) tokens
- class: one token, the class id; input (B,) ints -> (B, 1)
- unconditional: one constant SOS token; input: the batch size -> (B, 1)
The last two have no parameters, so no ``cond_stage_model.`` keys exist for them.
"""
from __future__ import annotations

import torch
from torch import nn

from taming_deploy.training.models.vqgan import SegmentationVQModel, VQModel


class SegmentationCondition(SegmentationVQModel):
    def condition_tokens(self, labels: torch.Tensor) -> torch.Tensor:
        return self.encode(self.one_hot(labels)).indices


class MapCondition(VQModel):
    """Depth or image conditions: the VQ autoencoder's codes of the map itself."""

    def condition_tokens(self, condition: torch.Tensor) -> torch.Tensor:
        return self.codes(condition)


class ClassCondition(nn.Module):
    def __init__(self, n_classes: int):
        super().__init__()
        self.n_classes = n_classes

    def condition_tokens(self, class_ids: torch.Tensor) -> torch.Tensor:
        return class_ids.long().view(-1, 1)


class UnconditionalCondition(nn.Module):
    def __init__(self, sos_token: int):
        super().__init__()
        self.sos_token = sos_token

    def condition_tokens(self, batch_size: int) -> torch.Tensor:
        return torch.full((batch_size, 1), self.sos_token, dtype=torch.long, device=None)


ConditionStage = SegmentationCondition | MapCondition | ClassCondition | UnconditionalCondition
