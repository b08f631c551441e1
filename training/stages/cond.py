"""Segmentation condition stage: a VQ autoencoder on one-hot label maps, BCE-with-logits + codebook loss."""
from __future__ import annotations

import numpy as np
import torch

from taming_deploy.errors import UserError
from taming_deploy.spec import ConditionSpec
from taming_deploy.training.config import ModelConfig
from taming_deploy.training.data.sources import Source
from taming_deploy.training.distributed import DistEnv
from taming_deploy.training.losses.vqgan_loss import segmentation_loss
from taming_deploy.training.models.net2net import TamingModel
from taming_deploy.training.models.vqgan import AutoencoderConfig
from taming_deploy.training.stages.common import ModelWeights, autocast, image_grid, sync_gradients, to_device, wrap_ddp
from taming_deploy.training.stages.codebook import CodebookRestarter
from taming_deploy.training.train_config import TrainConfig

VALIDATION_MAPS = 8


def label_pictures(labels: np.ndarray, palette: tuple[tuple[int, int, int], ...] | None) -> np.ndarray:
    """(N, H, W) ids -> (N, 3, H, W) in [-1, 1], in the palette (or grey levels without one)."""
    if palette is None:
        grey = labels.astype(np.float32) / max(int(labels.max()), 1) * 2 - 1
        return np.repeat(grey[:, None], 3, axis=1)
    colours = np.asarray(palette, np.float32) / 127.5 - 1
    return colours[labels].transpose(0, 3, 1, 2)


class ConditionStage(ModelWeights):
    def __init__(self, cfg: TrainConfig, env: DistEnv, source: Source):
        self.cfg, self.env, self.source = cfg, env, source
        autoencoder = AutoencoderConfig.from_dict(cfg.model)
        if autoencoder.in_channels != autoencoder.out_ch:
            raise UserError("a segmentation autoencoder has in_channels == out_ch == the number of labels")
        names = source.label_names
        if names is not None and len(names) != autoencoder.in_channels:
            raise UserError(f"the data has {len(names)} labels but the model takes {autoencoder.in_channels}")
        self.config = ModelConfig(
            condition=ConditionSpec(kind="segmentation", n_labels=autoencoder.in_channels, codebook_size=autoencoder.n_embed,
                                    label_names=names, palette=source.palette),
            condition_autoencoder=autoencoder,
        )
        self.model = TamingModel(self.config).to(env.device)
        self.vq = self.model.cond_stage_model
        self.vq_ddp = wrap_ddp(self.vq, env)
        self.codebook_weight = float(cfg.loss.get("codebook_weight", 1.0))
        self.optimizers = {"autoencoder": torch.optim.Adam(self.vq.parameters(), lr=cfg.train.lr, betas=(0.5, 0.9))}
        self.validation = source.validation(VALIDATION_MAPS, cfg.train.image_size).labels
        self.restarter = CodebookRestarter(self.vq.quantize, self.optimizers["autoencoder"], cfg.train.codebook_restart_every,
                                           cfg.train.steps // 2, env)

    def sample_batch(self, rng: np.random.Generator) -> np.ndarray:
        return self.source.sample(rng, self.cfg.train.batch_size, self.cfg.train.image_size).labels

    def train_step(self, micro_batches: list[np.ndarray], step: int) -> dict[str, float]:
        optimizer = self.optimizers["autoencoder"]
        optimizer.zero_grad(set_to_none=True)
        logs: dict[str, float] = {}
        for k, labels in enumerate(micro_batches):
            one_hot = self.vq.one_hot(to_device(labels, self.env))
            with sync_gradients(self.vq_ddp, k == len(micro_batches) - 1), autocast(self.env, self.cfg.train.precision):
                logits, latent = self.vq_ddp(one_hot)
                loss, log = segmentation_loss(latent.codebook_loss, one_hot, logits.float(), self.codebook_weight)
                (loss / len(micro_batches)).backward()
            self.restarter.observe(latent.indices, latent.latent)
            for name, value in log.items():
                logs[name] = logs.get(name, 0.0) + float(value) / len(micro_batches)
        optimizer.step()
        restarted = self.restarter.maybe_restart(step)
        if restarted:
            logs["train/codes_restarted"] = float(restarted)
        return logs

    @torch.no_grad()
    def evaluate(self, step: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        self.vq.eval()
        labels = to_device(self.validation, self.env)
        logits, latent = self.vq(self.vq.one_hot(labels))
        self.vq.train()
        predicted = logits.argmax(dim=1)
        scalars = {
            "val/pixel_accuracy": float((predicted == labels).float().mean()),
            "val/codebook_usage": latent.indices.unique().numel() / self.vq.config.n_embed,
        }
        palette = self.config.condition.palette  # type: ignore[union-attr]
        grid = image_grid([label_pictures(self.validation[:4], palette), label_pictures(predicted[:4].cpu().numpy(), palette)])
        return scalars, {"val/labels_reconstructions": grid}
