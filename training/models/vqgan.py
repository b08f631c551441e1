"""VQGAN first stage: convolutional encoder/decoder around a vector quantizer.

Module and parameter names follow the original Taming Transformers code so that its
state dicts load with ``strict=True``; the math is the one described in REFERENCE.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from taming_deploy.training.models.quantizer import GumbelQuantizer, QuantizedLatent, VectorQuantizer

QUANTIZERS = ("vq", "gumbel")


@dataclass(frozen=True)
class AutoencoderConfig:
    """The original ``ddconfig`` plus codebook size and embedding width.

    ``quantizer``: "vq" (VQModel) or "gumbel" (GumbelVQ, import only). ``remap_codes``: the number of
    codes in the original's ``remap`` list (0: no remap); ``unknown_index`` as in the original.
    """

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    in_channels: int
    out_ch: int
    resolution: int
    z_channels: int
    embed_dim: int
    n_embed: int
    dropout: float = 0.0
    double_z: bool = False
    beta: float = 0.25
    legacy: bool = True
    quantizer: str = "vq"
    remap_codes: int = 0
    unknown_index: str | int = "random"

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def codebook_tokens(self) -> int:
        """How many tokens the quantizer emits: the codebook, or the remapped codes (+1 for "extra")."""
        if not self.remap_codes:
            return self.n_embed
        return self.remap_codes + (1 if self.unknown_index == "extra" else 0)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "AutoencoderConfig":
        d = dict(d)
        d["ch_mult"] = tuple(d["ch_mult"])
        d["attn_resolutions"] = tuple(d["attn_resolutions"])
        return cls(**d)


def normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, 1x1 convs for q, k, v and output."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).reshape(b, c, h * w).transpose(1, 2)  # (b, hw, c)
        k = self.k(y).reshape(b, c, h * w)  # (b, c, hw)
        v = self.v(y).reshape(b, c, h * w)  # (b, c, hw)
        weights = torch.softmax(torch.bmm(q, k) * (c**-0.5), dim=2)  # (b, hw_query, hw_key)
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one zero column/row on the right/bottom only."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        levels = len(cfg.ch_mult)
        resolution = cfg.resolution  # decides where attention sits, whatever the input size
        channels = cfg.ch
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.ch_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(channels, cfg.ch * mult, cfg.dropout))
                channels = cfg.ch * mult
                if resolution in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(channels))
            if level != levels - 1:
                stage.downsample = Downsample(channels)
                resolution //= 2
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(channels, channels, cfg.dropout)
        self.mid.attn_1 = AttnBlock(channels)
        self.mid.block_2 = ResnetBlock(channels, channels, cfg.dropout)
        self.norm_out = normalize(channels)
        self.conv_out = nn.Conv2d(channels, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        levels = len(cfg.ch_mult)
        channels = cfg.ch * cfg.ch_mult[-1]
        resolution = cfg.resolution // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, channels, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(channels, channels, cfg.dropout)
        self.mid.attn_1 = AttnBlock(channels)
        self.mid.block_2 = ResnetBlock(channels, channels, cfg.dropout)
        # up[0] is the full-resolution level; it is built last and runs last.
        stages: list[nn.Module] = []
        for level in reversed(range(levels)):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(channels, cfg.ch * cfg.ch_mult[level], cfg.dropout))
                channels = cfg.ch * cfg.ch_mult[level]
                if resolution in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(channels))
            if level != 0:
                stage.upsample = Upsample(channels)
                resolution *= 2
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = normalize(channels)
        self.conv_out = nn.Conv2d(channels, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VQModel(nn.Module):
    """encode = encoder -> quant_conv -> quantize; decode = post_quant_conv -> decoder."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize: VectorQuantizer | GumbelQuantizer
        if cfg.quantizer == "gumbel":
            self.quantize = GumbelQuantizer(cfg.z_channels, cfg.n_embed, cfg.embed_dim, cfg.remap_codes, cfg.unknown_index)
        else:
            self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, cfg.beta, cfg.legacy, cfg.remap_codes, cfg.unknown_index)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) input -> (B, h, w) tokens, without the quantized latent (the encoder graph)."""
        return self.quantize.codes(self.quant_conv(self.encoder(x)))

    def encode(self, x: torch.Tensor) -> QuantizedLatent:
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codebook indices -> decoder output (unclamped)."""
        return self.decode(self.quantize.lookup(indices))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizedLatent]:
        latent = self.encode(x)
        return self.decode(latent.quant), latent


class SegmentationVQModel(VQModel):
    """A VQModel on one-hot label maps; ``colorize`` is a random projection kept for checkpoint parity."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__(cfg)
        self.register_buffer("colorize", torch.randn(3, cfg.in_channels, 1, 1))

    @property
    def n_labels(self) -> int:
        return self.config.in_channels

    def one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, H, W) int64 class ids -> (B, n_labels, H, W) float 0/1, the training input."""
        return F.one_hot(labels, self.n_labels).permute(0, 3, 1, 2).float()
