"""First-stage training losses of Taming Transformers.

VQGAN (the original's ``VQLPIPSWithDiscriminator``), for images x and reconstructions x_rec in [-1, 1]:

    rec      = |x - x_rec| + perceptual_weight * LPIPS(x, x_rec)      per pixel (LPIPS broadcast per image)
    nll      = mean(rec)
    g_loss   = -mean(D(x_rec))
    d_weight = clamp(||d nll / d W|| / (||d g_loss / d W|| + 1e-4), 0, 1e4).detach() * disc_weight
               with W the decoder's last layer weight (``decoder.conv_out.weight``)
    loss     = nll + d_weight * disc_factor * g_loss + codebook_weight * mean(codebook_loss)
    d_loss   = disc_factor * 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))   (hinge; D on detached inputs)

disc_factor is 0 while ``global_step < disc_start`` (``adopt_weight``), so before that step the discriminator
neither trains nor influences the autoencoder. When gradients are off (validation), d_weight is 0, as in
the original (where the failing autograd call is caught).

Segmentation VQ (the original's ``BCELossWithQuant``): BCE-with-logits of the reconstruction logits against
the one-hot label map, + codebook_weight * codebook_loss; no discriminator.

Each loss returns ``(loss, log)`` where log maps ``"{split}/name"`` to detached 0-dim tensors (the original's
keys). Not carried over: the original's unused ``pixelloss_weight``, ``disc_conditional`` and ActNorm options.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from taming_deploy.training.losses.discriminator import make_discriminator


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``value`` before step ``threshold``, ``weight`` from then on."""
    return value if global_step < threshold else weight


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.mean(F.softplus(-logits_real)) + torch.mean(F.softplus(logits_fake)))


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float = 1.0) -> torch.Tensor:
    """clamp(||grad nll|| / (||grad g_loss|| + 1e-4), 0, 1e4) * disc_weight, gradients at ``last_layer``,
    detached. The graph is kept (retain_graph) for the caller's backward; 0 when gradients are off."""
    if not (torch.is_grad_enabled() and nll_loss.requires_grad and g_loss.requires_grad
            and last_layer.requires_grad):
        return torch.zeros((), device=nll_loss.device)
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    d_weight = torch.norm(nll_grad) / (torch.norm(g_grad) + 1e-4)
    return torch.clamp(d_weight, 0.0, 1e4).detach() * disc_weight


@dataclass
class VQLossConfig:
    """The original's ``lossconfig.params`` (names kept, so a released config's params fit)."""

    disc_start: int
    codebook_weight: float = 1.0
    disc_num_layers: int = 3
    disc_in_channels: int = 3
    disc_factor: float = 1.0
    disc_weight: float = 1.0
    perceptual_weight: float = 1.0
    disc_ndf: int = 64
    disc_loss: str = "hinge"


class VQLPIPSWithDiscriminator(nn.Module):
    """The VQGAN loss: ``generator_loss`` for the autoencoder step, ``discriminator_loss`` for D's step.

    Submodules ``discriminator`` (``main.N.*``, as in the original, so ``loss.discriminator.*`` tensors of
    an original checkpoint fit) and ``perceptual_loss`` (frozen LPIPS; ``None`` when perceptual_weight is 0).
    ``perceptual`` overrides the LPIPS module (tests); by default the pretrained one is loaded, which raises
    UserError with the install command when its weight packages are missing.
    """

    def __init__(self, config: VQLossConfig, perceptual: nn.Module | None = None) -> None:
        super().__init__()
        if config.disc_loss not in D_LOSSES:
            raise ValueError(f"unknown disc_loss {config.disc_loss!r}; one of {sorted(D_LOSSES)}")
        self.config = config
        if perceptual is None and config.perceptual_weight > 0:
            from taming_deploy.training.losses.lpips import load_lpips

            perceptual = load_lpips()
        self.perceptual_loss = perceptual
        self.discriminator = make_discriminator(config.disc_in_channels, config.disc_ndf, config.disc_num_layers)
        self.disc_loss = D_LOSSES[config.disc_loss]

    def disc_factor(self, global_step: int) -> float:
        return adopt_weight(self.config.disc_factor, global_step, threshold=self.config.disc_start)

    def generator_loss(self, codebook_loss: torch.Tensor, inputs: torch.Tensor, reconstructions: torch.Tensor,
                       global_step: int, last_layer: torch.Tensor, split: str = "train"
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.config
        rec_loss = torch.abs(inputs - reconstructions)
        if cfg.perceptual_weight > 0:
            p_loss = self.perceptual_loss(inputs, reconstructions)
            rec_loss = rec_loss + cfg.perceptual_weight * p_loss
        else:
            p_loss = torch.zeros((), device=inputs.device)
        nll_loss = torch.mean(rec_loss)
        disc_factor = self.disc_factor(global_step)
        if disc_factor > 0:
            g_loss = -torch.mean(self.discriminator(reconstructions))
            d_weight = adaptive_weight(nll_loss, g_loss, last_layer, cfg.disc_weight)
        else:  # before disc_start the GAN term is multiplied by 0: skip D and the two extra gradients
            g_loss = torch.zeros((), device=inputs.device)
            d_weight = torch.zeros((), device=inputs.device)
        codebook_loss = codebook_loss.mean()
        loss = nll_loss + d_weight * disc_factor * g_loss + cfg.codebook_weight * codebook_loss
        log = {
            f"{split}/total_loss": loss.detach(),
            f"{split}/quant_loss": codebook_loss.detach(),
            f"{split}/nll_loss": nll_loss.detach(),
            f"{split}/rec_loss": rec_loss.detach().mean(),
            f"{split}/p_loss": p_loss.detach().mean(),
            f"{split}/d_weight": d_weight.detach(),
            f"{split}/disc_factor": torch.tensor(float(disc_factor)),
            f"{split}/g_loss": g_loss.detach(),
        }
        return loss, log

    def discriminator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, global_step: int,
                           split: str = "train") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits_real = self.discriminator(inputs.detach())
        logits_fake = self.discriminator(reconstructions.detach())
        d_loss = self.disc_factor(global_step) * self.disc_loss(logits_real, logits_fake)
        log = {
            f"{split}/disc_loss": d_loss.detach(),
            f"{split}/logits_real": logits_real.detach().mean(),
            f"{split}/logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, log


def segmentation_loss(codebook_loss: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor,
                      codebook_weight: float = 1.0, split: str = "train"
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Segmentation VQ loss: BCE-with-logits(logits, one-hot targets) + codebook_weight * codebook_loss.

    ``targets`` is the float one-hot map (B, n_labels, H, W), ``logits`` the decoder output of that shape.
    """
    bce_loss = F.binary_cross_entropy_with_logits(logits, targets)
    codebook_loss = codebook_loss.mean()
    loss = bce_loss + codebook_weight * codebook_loss
    log = {
        f"{split}/total_loss": loss.detach(),
        f"{split}/bce_loss": bce_loss.detach(),
        f"{split}/quant_loss": codebook_loss.detach(),
    }
    return loss, log


class BCELossWithQuant(nn.Module):
    """Module form of :func:`segmentation_loss` (the original's name and call order)."""

    def __init__(self, codebook_weight: float = 1.0) -> None:
        super().__init__()
        self.codebook_weight = codebook_weight

    def forward(self, codebook_loss: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor,
                split: str = "train") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return segmentation_loss(codebook_loss, targets, logits, self.codebook_weight, split)
