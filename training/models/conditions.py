"""Condition stages: what turns a user's condition into the tokens prepended to the image tokens.

- segmentation: a VQ autoencoder on one-hot label maps; input (B, H, W) class ids -> (B, h, w) tokens
- depth: a VQ autoencoder on 1-channel depth in [-1, 1]; input (B, 1, H, W) -> (B, h, w) tokens
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


class DepthCondition(VQModel):
    def condition_tokens(self, depth: torch.Tensor) -> torch.Tensor:
        return self.encode(depth).indices


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


ConditionStage = SegmentationCondition | DepthCondition | ClassCondition | UnconditionalCondition
