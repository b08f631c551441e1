"""VQGAN first stage: L1 + LPIPS + PatchGAN hinge loss with the adaptive weight, codebook loss.

With ``finetune_decoder`` the stage starts from a trained VQGAN and trains its decoder alone
(post_quant_conv + decoder), under the cosine learning-rate schedule: the encoder and codebook are
frozen and codebook restarts are off, so every image keeps its token map and a GPT trained on those
tokens stays valid with the new decoder.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from taming_deploy.errors import UserError
from taming_deploy.training.checkpoint import load_model
from taming_deploy.training.config import ModelConfig
from taming_deploy.training.data.sources import Batch, Source
from taming_deploy.training.distributed import DistEnv
from taming_deploy.training.losses.vqgan_loss import VQLossConfig, VQLPIPSWithDiscriminator
from taming_deploy.training.models.net2net import TamingModel
from taming_deploy.training.models.vqgan import AutoencoderConfig, VQModel
from taming_deploy.training.stages.common import (
    autocast,
    average_gradients,
    broadcast_from_rank0,
    image_grid,
    learning_rate,
    set_learning_rate,
    sync_gradients,
    to_device,
    wrap_ddp,
)
from taming_deploy.training.stages.codebook import CodebookRestarter
from taming_deploy.training.train_config import TrainConfig

VALIDATION_IMAGES = 8


def trained_first_stage(path: Path) -> VQModel:
    model = load_model(path)
    if model.config.first_stage is None:
        raise UserError(f"finetune_decoder {path}: this checkpoint has no first stage (VQGAN)")
    return model.first_stage_model


class VQGANStage:
    def __init__(self, cfg: TrainConfig, env: DistEnv, source: Source):
        self.cfg, self.env, self.source = cfg, env, source
        trained = None if cfg.finetune_decoder is None else trained_first_stage(cfg.finetune_decoder)
        self.config = ModelConfig(first_stage=AutoencoderConfig.from_dict(cfg.model) if trained is None else trained.config)
        if self.config.first_stage.quantizer != "vq":  # type: ignore[union-attr]
            raise UserError("only vector-quantized first stages train here; Gumbel first stages are imported (import-taming)")
        self.model = TamingModel(self.config)
        self.vq = self.model.first_stage_model
        self.decoder_only = trained is not None
        if trained is not None:
            self.vq.load_state_dict(trained.state_dict())
            for frozen in (self.vq.encoder, self.vq.quant_conv, self.vq.quantize):
                frozen.requires_grad_(False)
        self.model.to(env.device)
        self.loss = VQLPIPSWithDiscriminator(VQLossConfig(**cfg.loss)).to(env.device)
        self.discriminator = self.loss.discriminator
        broadcast_from_rank0(list(self.discriminator.state_dict().values()), env)  # DDP does this for vq_ddp
        self.vq_ddp = wrap_ddp(self.vq, env)
        lr = cfg.train.lr
        self.optimizers = {
            "autoencoder": torch.optim.Adam([p for p in self.vq.parameters() if p.requires_grad], lr=lr, betas=(0.5, 0.9)),
            "discriminator": torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=(0.5, 0.9)),
        }
        self.validation = source.validation(VALIDATION_IMAGES, cfg.train.image_size)
        restart_every = 0 if self.decoder_only else cfg.train.codebook_restart_every
        self.restarter = CodebookRestarter(self.vq.quantize, self.optimizers["autoencoder"], restart_every, self.loss.config.disc_start, env)

    def sample_batch(self, rng: np.random.Generator) -> Batch:
        return self.source.sample(rng, self.cfg.train.batch_size, self.cfg.train.image_size)

    def train_step(self, micro_batches: list[Batch], step: int) -> dict[str, float]:
        opt_ae, opt_d = self.optimizers["autoencoder"], self.optimizers["discriminator"]
        if self.decoder_only:
            set_learning_rate(opt_ae, learning_rate(step, self.cfg.train.lr, self.cfg.train.warmup_steps, self.cfg.train.steps))
        accum = len(micro_batches)
        logs: dict[str, float] = {}
        reconstructions = []
        opt_ae.zero_grad(set_to_none=True)
        for k, batch in enumerate(micro_batches):
            x = to_device(batch.images, self.env)
            with sync_gradients(self.vq_ddp, k == accum - 1), autocast(self.env, self.cfg.train.precision):
                rec, latent = self.vq_ddp(x)
                loss, log = self.loss.generator_loss(
                    latent.codebook_loss, x, rec.float(), step, last_layer=self.vq.decoder.conv_out.weight
                )
                (loss / accum).backward()
            reconstructions.append(rec.detach().float())
            self.restarter.observe(latent.indices, latent.latent)
            for name, value in log.items():
                logs[name] = logs.get(name, 0.0) + float(value) / accum
        opt_ae.step()
        restarted = self.restarter.maybe_restart(step)
        if restarted:
            logs["train/codes_restarted"] = float(restarted)
        if self.loss.disc_factor(step) > 0:
            opt_d.zero_grad(set_to_none=True)
            for batch, rec in zip(micro_batches, reconstructions):
                with autocast(self.env, self.cfg.train.precision):
                    d_loss, log = self.loss.discriminator_loss(to_device(batch.images, self.env), rec, step)
                    (d_loss / accum).backward()
                for name, value in log.items():
                    logs[name] = logs.get(name, 0.0) + float(value) / accum
            average_gradients(self.discriminator, self.env)
            opt_d.step()
            broadcast_from_rank0(list(self.discriminator.buffers()), self.env)  # BatchNorm statistics
        return logs

    def weights(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return self.model.state_dict(), {f"discriminator.{k}": v for k, v in self.discriminator.state_dict().items()}

    def restore(self, weights: dict[str, torch.Tensor], extra: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(weights)
        self.discriminator.load_state_dict({k[len("discriminator.") :]: v for k, v in extra.items()})

    @torch.no_grad()
    def evaluate(self, step: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        self.vq.eval()
        x = to_device(self.validation.images, self.env)
        rec, latent = self.vq(x)
        self.vq.train()
        rec = rec.clamp(-1, 1)
        mse = torch.mean((rec - x) ** 2, dim=(1, 2, 3))
        psnr = torch.mean(10 * torch.log10(4.0 / mse.clamp_min(1e-12)))
        used = latent.indices.unique().numel() / self.config.first_stage.n_embed  # type: ignore[union-attr]
        scalars = {"val/psnr": float(psnr), "val/l1": float(torch.mean(torch.abs(rec - x))), "val/codebook_usage": used}
        return scalars, {"val/inputs_reconstructions": image_grid([x[:4].cpu().numpy(), rec[:4].cpu().numpy()])}
