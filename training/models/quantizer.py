"""Vector quantizer: nearest codebook entry by squared Euclidean distance, computed in fp32."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class QuantizedLatent:
    quant: torch.Tensor  # (B, embed_dim, h, w); straight-through gradient to the encoder
    indices: torch.Tensor  # (B, h, w) int64, row-major
    codebook_loss: torch.Tensor  # scalar
    latent: torch.Tensor  # (B, embed_dim, h, w): the encoder output before quantization


def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(N, D) vectors, (K, D) codebook -> (N,) index of the nearest entry.

    d = |z|^2 + |e|^2 - 2 z.e, evaluated in fp32 whatever the input precision: in fp16 the two
    large sum terms swamp the difference between neighbouring codes and flip the argmin.
    """
    z = z.float()
    codebook = codebook.float()
    distances = (
        z.pow(2).sum(dim=1, keepdim=True)
        + codebook.pow(2).sum(dim=1)
        - 2 * z @ codebook.t()
    )
    return distances.argmin(dim=1)


class VectorQuantizer(nn.Module):
    """Codebook lookup with a straight-through gradient and the commitment loss.

    legacy=True (the released models): loss = mean((sg(z_q) - z)^2) + beta * mean((z_q - sg(z))^2);
    legacy=False puts beta on the other term. The forward value of z_q is the same either way.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy: bool = True):
        super().__init__()
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.beta = beta
        self.legacy = legacy
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    def forward(self, z: torch.Tensor) -> QuantizedLatent:
        b, c, h, w = z.shape
        z_rows = z.permute(0, 2, 3, 1).reshape(-1, c)
        indices = nearest_code(z_rows, self.embedding.weight)
        z_q = self.embedding(indices).view(b, h, w, c).permute(0, 3, 1, 2)
        commit = torch.mean((z_q.detach() - z) ** 2)
        codebook = torch.mean((z_q - z.detach()) ** 2)
        loss = commit + self.beta * codebook if self.legacy else self.beta * commit + codebook
        z_q = z + (z_q - z).detach()
        return QuantizedLatent(quant=z_q, indices=indices.view(b, h, w), codebook_loss=loss, latent=z)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) indices -> (B, embed_dim, h, w) codebook vectors."""
        return self.embedding(indices).permute(0, 3, 1, 2)
