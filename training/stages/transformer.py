"""Transformer stage: cross-entropy on image tokens after the condition tokens, first stages frozen.

Token maps of whole training images are computed once (``token_cache.npz`` in the run directory,
reused on resume); each step then takes random window-sized crops of (condition, image) token maps,
which is what the sliding-window sampler shows the transformer at generation time.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from taming_deploy.backends.torch_backend import TorchBackend
from taming_deploy.errors import UserError
from taming_deploy.model_paths import CHECKPOINT_WEIGHTS
from taming_deploy.sampler import sample_tokens
from taming_deploy.sampling import SamplingOptions, TokenStream
from taming_deploy.training.checkpoint import load_model
from taming_deploy.training.config import ModelConfig
from taming_deploy.training.data.sources import Source
from taming_deploy.training.distributed import DistEnv, barrier
from taming_deploy.training.models.gpt import GPTConfig
from taming_deploy.training.models.net2net import TamingModel
from taming_deploy.training.stages.common import ModelWeights, autocast, image_grid, learning_rate, set_learning_rate, sync_gradients, to_device, wrap_ddp
from taming_deploy.training.stages.cond import label_pictures
from taming_deploy.training.train_config import TrainConfig

TOKEN_CACHE = "token_cache.npz"
ENCODE_BATCH = 16
VALIDATION_MAPS = 8


@dataclass
class TokenMaps:
    condition: np.ndarray  # (N, h, w) int64
    image: np.ndarray  # (N, h, w) int64


def linear_weight_names(model: torch.nn.Module) -> set[str]:
    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def _window_starts(size: int, window: int) -> list[int]:
    return sorted({*range(0, size - window + 1, window), size - window})


def tile_windows(maps: np.ndarray, window: tuple[int, int]) -> np.ndarray:
    """(N, h, w) token maps -> (N * tiles, wh * ww) windows that together cover every position.

    Windows step by their own size; where that leaves a remainder, the last window of the row or
    column ends at the edge (overlapping its neighbour). Validating on all of them scores the whole
    scene, not only its top-left corner (mostly sky in a landscape, and far easier than the rest).
    """
    _, h, w = maps.shape
    wh, ww = min(window[0], h), min(window[1], w)
    tiles = [maps[:, t : t + wh, l : l + ww] for t in _window_starts(h, wh) for l in _window_starts(w, ww)]
    return np.stack(tiles, axis=1).reshape(-1, wh * ww)


@torch.no_grad()
def encode_maps(model: TamingModel, images: np.ndarray, labels: np.ndarray, device: torch.device) -> TokenMaps:
    conds, tokens = [], []
    for k in range(0, len(images), ENCODE_BATCH):
        tokens.append(model.first_stage_model.encode(torch.from_numpy(images[k : k + ENCODE_BATCH]).to(device)).indices.cpu())
        conds.append(model.cond_stage_model.condition_tokens(torch.from_numpy(labels[k : k + ENCODE_BATCH]).to(device)).cpu())
    return TokenMaps(torch.cat(conds).numpy(), torch.cat(tokens).numpy())


class TransformerStage(ModelWeights):
    def __init__(self, cfg: TrainConfig, env: DistEnv, source: Source, run_dir: Path):
        self.cfg, self.env, self.source = cfg, env, source
        assert cfg.first_stage is not None and cfg.cond_stage is not None
        first, cond = load_model(cfg.first_stage), load_model(cfg.cond_stage)
        if first.config.first_stage is None:
            raise UserError(f"{cfg.first_stage}: no first stage in this checkpoint")
        if cond.config.condition is None or not cond.config.condition.spatial:
            raise UserError(f"{cfg.cond_stage}: no segmentation/depth condition stage in this checkpoint")
        self.config = ModelConfig(
            first_stage=first.config.first_stage,
            condition=cond.config.condition,
            condition_autoencoder=cond.config.condition_autoencoder,
            transformer=GPTConfig(**cfg.model),
            window=cfg.window,
            pkeep=cfg.pkeep,
        )
        self.model = TamingModel(self.config)
        self.model.first_stage_model.load_state_dict(first.first_stage_model.state_dict())
        self.model.cond_stage_model.load_state_dict(cond.cond_stage_model.state_dict())
        self.model.to(env.device)
        for frozen in (self.model.first_stage_model, self.model.cond_stage_model):
            frozen.eval().requires_grad_(False)
        self.model_ddp = wrap_ddp(self.model, env)
        decay_names = linear_weight_names(self.model.transformer)
        params = dict(self.model.transformer.named_parameters())
        groups = [
            {"params": [p for n, p in params.items() if n in decay_names], "weight_decay": cfg.train.weight_decay},
            {"params": [p for n, p in params.items() if n not in decay_names], "weight_decay": 0.0},
        ]
        self.optimizers = {"transformer": torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(0.9, 0.95))}
        self.maps = self.token_maps(run_dir, [cfg.first_stage, cfg.cond_stage])
        validation = source.validation(VALIDATION_MAPS, cfg.train.token_cache_size)
        self.validation_maps = encode_maps(self.model, validation.images, validation.labels, env.device)
        self.validation_labels = validation.labels

    def token_maps(self, run_dir: Path, checkpoints: list[Path]) -> TokenMaps:
        """Encode the training images once; reuse the file when stages and data settings match."""
        loop = self.cfg.train
        key = hashlib.sha256()
        for path in checkpoints:
            key.update((Path(path) / CHECKPOINT_WEIGHTS).read_bytes())
        key.update(f"{loop.token_cache_images} {loop.token_cache_size} {loop.seed}".encode())
        path = Path(run_dir) / TOKEN_CACHE
        if self.env.is_main and not (path.exists() and str(np.load(path)["key"]) == key.hexdigest()):
            rng = np.random.default_rng([loop.seed, 1 << 32])
            parts = []
            for start in range(0, loop.token_cache_images, ENCODE_BATCH):  # in chunks: bounded memory
                batch = self.source.sample(rng, min(ENCODE_BATCH, loop.token_cache_images - start), loop.token_cache_size)
                parts.append(encode_maps(self.model, batch.images, batch.labels, self.env.device))
            maps = TokenMaps(np.concatenate([p.condition for p in parts]), np.concatenate([p.image for p in parts]))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, key=key.hexdigest(), condition=maps.condition, image=maps.image)
            tmp.replace(path)
        barrier(self.env)
        with np.load(path) as data:
            return TokenMaps(data["condition"], data["image"])

    def sample_batch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Random window crops: (B, wh*ww) condition tokens and image tokens."""
        n, h, w = self.maps.image.shape
        wh, ww = min(self.cfg.window[0], h), min(self.cfg.window[1], w)
        picks = rng.integers(0, n, size=self.cfg.train.batch_size)
        tops = rng.integers(0, h - wh + 1, size=len(picks))
        lefts = rng.integers(0, w - ww + 1, size=len(picks))
        crop = lambda maps: np.stack([maps[k, t : t + wh, l : l + ww].reshape(-1) for k, t, l in zip(picks, tops, lefts)])  # noqa: E731
        return crop(self.maps.condition), crop(self.maps.image)

    def train_step(self, micro_batches: list[tuple[np.ndarray, np.ndarray]], step: int) -> dict[str, float]:
        optimizer = self.optimizers["transformer"]
        lr = learning_rate(step, self.cfg.train.lr, self.cfg.train.warmup_steps, self.cfg.train.steps)
        set_learning_rate(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for k, (cond, image) in enumerate(micro_batches):
            with sync_gradients(self.model_ddp, k == len(micro_batches) - 1), autocast(self.env, self.cfg.train.precision):
                logits = self.model_ddp(to_device(cond, self.env), to_device(image, self.env))
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), to_device(image, self.env).reshape(-1))
                (loss / len(micro_batches)).backward()
            total += float(loss.detach()) / len(micro_batches)
        torch.nn.utils.clip_grad_norm_(self.model.transformer.parameters(), 1.0)
        optimizer.step()
        return {"train/loss": total, "train/lr": lr}

    @torch.no_grad()
    def evaluate(self, step: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        gpt = self.model.transformer
        gpt.eval()
        wh, ww = self.cfg.window
        cond, image = (torch.from_numpy(tile_windows(maps, (wh, ww))).to(self.env.device)
                       for maps in (self.validation_maps.condition, self.validation_maps.image))
        val_loss = float(self.model.loss(cond, image))
        backend = TorchBackend(self.model, self.env.device)
        shown = 4
        f = self.config.first_stage.downsample_factor  # type: ignore[union-attr]
        cond_grid = self.validation_maps.condition[:shown, :wh, :ww]
        tokens, _ = sample_tokens(backend, cond_grid, (wh, ww), SamplingOptions(top_k=100), TokenStream.for_batch(step, len(cond_grid)))
        samples = backend.decode(tokens)
        labels = label_pictures(self.validation_labels[:shown, : wh * f, : ww * f], self.config.condition.palette)  # type: ignore[union-attr]
        gpt.train()
        return {"val/loss": val_loss}, {"val/labels_samples": image_grid([labels, np.clip(samples, -1, 1)])}
