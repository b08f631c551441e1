"""Quantizers of the first stage: the vector quantizer (nearest codebook entry by squared Euclidean
distance, computed in fp32) and the original's Gumbel quantizer (argmax of a 1x1 projection's logits).

Both may carry the original's ``remap``: a ``used`` buffer listing the codes kept, whose positions are
the tokens the transformer sees (``unknown_index`` "extra" adds one more token for every other code).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
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
    dtype = torch.promote_types(z.dtype, torch.float32)  # fp32, or fp64 for the exporter's float64 reference
    z = z.to(dtype)
    codebook = codebook.to(dtype)
    distances = (
        z.pow(2).sum(dim=1, keepdim=True)
        + codebook.pow(2).sum(dim=1)
        - 2 * z @ codebook.t()
    )
    return distances.argmin(dim=1)


class CodeRemap(nn.Module):
    """The original's remap of codebook indices to the codes listed in the buffer ``used``.

    ``unknown_index``: "random" (the original draws a random token for a code outside ``used``; here
    the best code among ``used`` is chosen instead, see ``codes``), "extra" (one more token, number
    len(used), for every other code), or a fixed token. Decoding maps a token back to its code; the
    extra token decodes as ``used[0]``, as in the original.
    """

    n_embed: int

    def __init__(self, remap_codes: int, unknown_index: str | int):
        super().__init__()
        self.remap_codes = remap_codes
        self.unknown_index = unknown_index
        if remap_codes:
            self.register_buffer("used", torch.arange(remap_codes))

    @property
    def remapped(self) -> bool:
        return self.remap_codes > 0

    @property
    def restricts_to_used(self) -> bool:
        """Whether the chosen code must be one of ``used`` (no token stands for the other codes)."""
        return self.remapped and self.unknown_index == "random"

    def to_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """Full codebook indices -> tokens (positions in ``used``, or the unknown token)."""
        unknown = self.remap_codes if self.unknown_index == "extra" else int(self.unknown_index)
        table = torch.full((self.n_embed,), unknown, dtype=torch.long, device=codes.device)
        table[self.used] = torch.arange(self.remap_codes, device=codes.device)
        return table[codes]

    def to_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.remapped:
            return tokens
        table = torch.cat((self.used, self.used[:1])) if self.unknown_index == "extra" else self.used
        return table[tokens]


class VectorQuantizer(CodeRemap):
    """Codebook lookup with a straight-through gradient and the commitment loss.

    legacy=True (the released models): loss = mean((sg(z_q) - z)^2) + beta * mean((z_q - sg(z))^2);
    legacy=False puts beta on the other term. The forward value of z_q is the same either way.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy: bool = True,
                 remap_codes: int = 0, unknown_index: str | int = "random"):
        super().__init__(remap_codes, unknown_index)
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.beta = beta
        self.legacy = legacy
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim, h, w) latent -> (B, h, w) tokens."""
        b, c, h, w = z.shape
        z_rows = z.permute(0, 2, 3, 1).reshape(-1, c)
        if self.restricts_to_used:
            return nearest_code(z_rows, self.embedding.weight[self.used]).view(b, h, w)
        indices = nearest_code(z_rows, self.embedding.weight)
        return (self.to_tokens(indices) if self.remapped else indices).view(b, h, w)

    def forward(self, z: torch.Tensor) -> QuantizedLatent:
        indices = self.codes(z)
        z_q = self.lookup(indices)
        commit = torch.mean((z_q.detach() - z) ** 2)
        codebook = torch.mean((z_q - z.detach()) ** 2)
        loss = commit + self.beta * codebook if self.legacy else self.beta * commit + codebook
        z_q = z + (z_q - z).detach()
        return QuantizedLatent(quant=z_q, indices=indices, codebook_loss=loss, latent=z)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) tokens -> (B, embed_dim, h, w) codebook vectors."""
        return self.embedding(self.to_codes(indices)).permute(0, 3, 1, 2)


class GumbelQuantizer(CodeRemap):
    """The original's GumbelQuantize (``proj``: 1x1 conv to n_embed logits; ``embed``: the table), encoding
    deterministically: code = argmax of the logits. The original adds Gumbel noise even in eval mode, so its
    own encoding is random; the noise-free argmax is the mode of what it samples. Decoding: embed[code].

    The logits are computed as a matrix product in fp32 (the projection's weights as a (n_embed, C)
    matrix), so the exported graph's fp16 pass keeps them fp32 like a codebook distance (export/fp16.py).
    """

    def __init__(self, z_channels: int, n_embed: int, embed_dim: int, remap_codes: int = 0, unknown_index: str | int = "random"):
        super().__init__(remap_codes, unknown_index)
        self.n_embed = n_embed
        self.proj = nn.Conv2d(z_channels, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embed_dim)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B*h*w, n_embed) fp32 logits, rows in row-major (b, h, w) order."""
        c = z.shape[1]
        dtype = torch.promote_types(z.dtype, torch.float32)
        rows = z.permute(0, 2, 3, 1).reshape(-1, c).to(dtype)
        weight = self.proj.weight.reshape(self.n_embed, c).to(dtype)
        return rows @ weight.t() + self.proj.bias.to(dtype)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        b, _, h, w = z.shape
        logits = self.logits(z)
        if self.remapped:  # the original keeps only the used codes' logits, so every code is one of them
            return logits[:, self.used].argmax(dim=1).view(b, h, w)
        return logits.argmax(dim=1).view(b, h, w)

    def forward(self, z: torch.Tensor) -> QuantizedLatent:
        """The deterministic codes; ``codebook_loss`` is the original's prior term (KL of the code
        distribution to the uniform one, before its kl_weight)."""
        probabilities = F.softmax(self.logits(z), dim=1)
        kl = torch.sum(probabilities * torch.log(probabilities * self.n_embed + 1e-10), dim=1).mean()
        indices = self.codes(z)
        return QuantizedLatent(quant=self.lookup(indices), indices=indices, codebook_loss=kl, latent=z)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embed(self.to_codes(indices)).permute(0, 3, 1, 2)
