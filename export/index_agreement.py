"""Index agreement of a quantizing graph (encoder, condition encoder), judged against a float64 run.

A code is an argmin (Gumbel: argmax) over the codebook, so two correct computations may pick
different codes where two codes are near-tied. Judging the ONNX graph by torch fp32 punishes the
better graph where torch fp32 is itself the less accurate one (GroupNorm statistics over large uniform
regions lose precision in fp32). So the reference is the same stage run in float64, and a differing
code counts as a mismatch only when the two codes' float64 scores (VQ: squared distance to the latent;
Gumbel: minus the logit) differ by more than ``tie_tolerance`` times the cell's scale (VQ: |z|^2 + |e|^2,
the size of the terms whose rounding decides the distance; Gumbel: |z| |w| + |b|). Both the raw
agreement and this tie-adjusted one are reported; the check is on the tie-adjusted one, and the
number of mismatches allowed grows with the number of indices checked.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch

from taming_deploy.training.models.quantizer import GumbelQuantizer
from taming_deploy.training.models.vqgan import SegmentationVQModel, VQModel


@dataclass(frozen=True)
class IndexLimits:
    """How many of n indices may differ beyond a tie: max(min_mismatches, floor(mismatch_rate * n))."""

    tie_tolerance: float
    mismatch_rate: float
    min_mismatches: int

    def threshold(self, n: int) -> float:
        return 1.0 - max(self.min_mismatches, math.floor(self.mismatch_rate * n)) / n


@dataclass(frozen=True)
class IndexAgreement:
    raw: float  # fraction of indices equal
    adjusted: float  # fraction not differing beyond a tie
    count: int


class Float64Reference:
    """A quantizing stage run in float64 on fixed inputs, one at a time: its tokens, and the score of
    any token at any cell (lower is better)."""

    @torch.no_grad()
    def __init__(self, stage: VQModel, inputs: np.ndarray):
        reference = copy.deepcopy(stage).double().eval()
        rows, tokens = [], []
        for x in inputs:
            x = torch.from_numpy(np.ascontiguousarray(x[None]))
            x = reference.one_hot(x) if isinstance(reference, SegmentationVQModel) else x
            z = reference.quant_conv(reference.encoder(x.double()))
            tokens.append(reference.quantize.codes(z))
            rows.append(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
        self.tokens = torch.cat(tokens).numpy()
        self.rows = torch.cat(rows)
        self.quantize = reference.quantize

    @torch.no_grad()
    def scores(self, tokens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(score, scale) per cell of the given tokens. With a remap, a token's code is the one it
        decodes to (the "extra" token's, used[0], so differences there are never forgiven as ties)."""
        q = self.quantize
        codes = q.to_codes(torch.from_numpy(np.ascontiguousarray(tokens)).reshape(-1))
        if isinstance(q, GumbelQuantizer):
            weight, bias = q.proj.weight.reshape(q.n_embed, -1)[codes], q.proj.bias[codes]
            return -((self.rows * weight).sum(dim=1) + bias), self.rows.norm(dim=1) * weight.norm(dim=1) + bias.abs()
        code = q.embedding.weight[codes]
        return ((self.rows - code) ** 2).sum(dim=1), (self.rows**2).sum(dim=1) + (code**2).sum(dim=1)

    def agreement(self, got: np.ndarray, expected: np.ndarray, tie_tolerance: float) -> IndexAgreement:
        """``got`` against ``expected`` (both (N, h, w) tokens on this reference's inputs)."""
        differ = torch.from_numpy((got != expected).reshape(-1))
        score_got, scale = self.scores(got)
        score_expected, _ = self.scores(expected)
        beyond_tie = differ & ((score_got - score_expected).abs() > tie_tolerance * scale)
        return IndexAgreement(float(1 - differ.double().mean()), float(1 - beyond_tie.double().mean()), differ.numel())

