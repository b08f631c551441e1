"""The conditional transformer: condition tokens first, then the image tokens in row-major order.

Submodule names match the original Net2NetTransformer (``first_stage_model``, ``cond_stage_model``,
``transformer``); a model holds whichever stages its config names.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from taming_deploy.training.config import ModelConfig
from taming_deploy.training.models.conditions import (
    ClassCondition,
    ConditionStage,
    MapCondition,
    SegmentationCondition,
    UnconditionalCondition,
)
from taming_deploy.training.models.gpt import GPT
from taming_deploy.training.models.vqgan import VQModel


def build_condition_stage(config: ModelConfig) -> ConditionStage:
    cond = config.condition
    assert cond is not None
    if cond.kind == "segmentation":
        assert config.condition_autoencoder is not None
        return SegmentationCondition(config.condition_autoencoder)
    if cond.kind in ("depth", "image"):
        assert config.condition_autoencoder is not None
        return MapCondition(config.condition_autoencoder)
    if cond.kind == "class":
        assert cond.n_classes is not None
        return ClassCondition(cond.n_classes)
    return UnconditionalCondition(cond.sos_token)


class TamingModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        if config.first_stage is not None:
            self.first_stage_model = VQModel(config.first_stage)
        if config.condition is not None:
            self.cond_stage_model = build_condition_stage(config)
        if config.transformer is not None:
            self.transformer = GPT(config.transformer)

    def forward(self, cond_tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, Lz, V) predicting each image token from the condition and the
        image tokens before it. With pkeep < 1, training replaces image inputs by random tokens."""
        inputs = image_tokens
        if self.training and self.config.pkeep < 1.0:
            keep = torch.bernoulli(torch.full(inputs.shape, self.config.pkeep, device=inputs.device)).bool()
            random_tokens = torch.randint_like(inputs, self.first_stage_model.config.codebook_tokens)
            inputs = torch.where(keep, inputs, random_tokens)
        sequence = torch.cat((cond_tokens, inputs), dim=1)
        logits, _ = self.transformer(sequence[:, :-1])
        return logits[:, cond_tokens.shape[1] - 1 :]

    def loss(self, cond_tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        logits = self(cond_tokens, image_tokens)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), image_tokens.reshape(-1))
