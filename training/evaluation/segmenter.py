"""A small segmenter of synthetic landscapes that judges whether generated images follow their label maps.

The network is a compact fully convolutional encoder-decoder (about 0.25 M parameters): four stride-2
stages (1/2 .. 1/16 resolution) with two dilated convolutions at 1/16 for a receptive field of a few
hundred pixels (enough to tell sky from water by what lies around them), a U-Net decoder back to 1/2
resolution with skip connections, and class logits bilinearly upsampled to the input size. Input:
RGB (B, 3, H, W) in [-1, 1], any H and W (padded to a multiple of 16 inside); output: (B, 8, H, W)
logits over ``training.data.synthetic_landscapes.LABELS``.

Training (:func:`train_segmenter`, or ``python -m taming_deploy.training.evaluation.segmenter --out DIR``) renders
fresh scenes every step from seeds drawn in ``[2**41, 2**42)``: disjoint from the seeds VQGAN and
transformer training draws (``[0, 2**31)``) and from the validation scenes (``2**40 + k``), on which the
segmenter is then scored. To judge generated images fairly rather than only clean renders, the
training images are degraded at random the way decoded images are: blur, down- and up-sampling, noise,
small colour shifts (and flips). Scene sizes vary per batch (heights 192-288, square and 2:1 wide) so
that one network serves 256x256 windows and wide sliding-window images alike. Everything random comes
from ``seed``: the same seed, thread count and torch build give the same weights.

The shipped weights (``weights/segmenter.safetensors`` + ``weights/segmenter.json``, no pickle) were
trained with the defaults of :func:`train_segmenter` (1500 steps, seed 0, one torch thread: 12 minutes
of a shared 2-core CPU); ``segmenter.json`` records the recipe and the held-out scores. Measured on
held-out validation scenes (clean renders): 256x256, 32 scenes: pixel accuracy 0.984, mIoU 0.940
(weakest class snow, IoU 0.80); 512x256, 8 scenes: 0.987 / 0.931. Degraded copies of the same 256x256
scenes: JPEG quality 20: 0.971 / 0.911; 4x down- and up-sampled: 0.976 / 0.926; 8x: 0.938 / 0.809;
noise sigma 0.08: 0.983 / 0.936. Scene height matters less than one might fear: mIoU 0.86 at 128 px,
0.84-0.89 from 192 to 512 px, but 0.59 at 64 px, so label following at very small sizes says little
(the "real" ceiling that ``evaluate`` reports next to every score shows this).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from taming_deploy.errors import UserError
from taming_deploy.fileutil import atomic_directory
from taming_deploy.training.data.sources import VALIDATION_SEED_BASE, to_model_range
from taming_deploy.training.data.synthetic_landscapes import LABELS, render_scene
from taming_deploy.training.evaluation.metrics import confusion_matrix, segmentation_scores

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = "segmenter.safetensors"
CONFIG_FILE = "segmenter.json"
CONFIG_FORMAT = "taming-deploy-segmenter"
CONFIG_VERSION = 1
TRAIN_SEED_BASE = 1 << 41  # training scenes: seeds in [2**41, 2**42), never drawn by model training or validation
_MULTIPLE = 16  # total downsampling of the network


@dataclass(frozen=True)
class SegmenterConfig:
    n_classes: int = len(LABELS)
    widths: tuple[int, ...] = (16, 32, 48, 64)  # channels at 1/2, 1/4, 1/8, 1/16 resolution
    context_dilations: tuple[int, ...] = (2, 4)  # extra 3x3 convolutions at 1/16
    label_names: tuple[str, ...] = LABELS

    def to_dict(self) -> dict:
        return {"n_classes": self.n_classes, "widths": list(self.widths),
                "context_dilations": list(self.context_dilations), "label_names": list(self.label_names)}

    @classmethod
    def from_dict(cls, d: dict) -> "SegmenterConfig":
        return cls(n_classes=int(d["n_classes"]), widths=tuple(int(w) for w in d["widths"]),
                   context_dilations=tuple(int(k) for k in d["context_dilations"]),
                   label_names=tuple(d["label_names"]))


def _block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class Segmenter(nn.Module):
    """``forward(images (B, 3, H, W) in [-1, 1]) -> logits (B, n_classes, H, W)``."""

    def __init__(self, config: SegmenterConfig = SegmenterConfig()):
        super().__init__()
        if len(config.widths) != 4:
            raise ValueError("the segmenter has four resolution stages: widths needs four entries")
        self.config = config
        w = config.widths
        self.down = nn.ModuleList()
        cin = 3
        for k, cout in enumerate(w):
            layers = [_block(cin, cout, stride=2), _block(cout, cout)]
            if k == len(w) - 1:
                layers += [_block(cout, cout, dilation=d) for d in config.context_dilations]
            self.down.append(nn.Sequential(*layers))
            cin = cout
        # decoder: 1/16 -> 1/8 -> 1/4 -> 1/2, each fusing the encoder features of its resolution
        self.up = nn.ModuleList(_block(w[k + 1] + w[k], w[k]) for k in reversed(range(len(w) - 1)))
        self.head = nn.Conv2d(w[0], config.n_classes, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        pad_h, pad_w = -height % _MULTIPLE, -width % _MULTIPLE
        x = F.pad(images, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else images
        skips = []
        for stage in self.down:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        for fuse in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = fuse(torch.cat([x, skip], dim=1))
        logits = self.head(x)
        logits = F.interpolate(logits, size=(height + pad_h, width + pad_w), mode="bilinear", align_corners=False)
        return logits[..., :height, :width]


@torch.no_grad()
def segment(model: Segmenter, images: torch.Tensor | np.ndarray, batch_size: int = 8) -> np.ndarray:
    """(B, 3, H, W) images in [-1, 1] -> (B, H, W) int64 predicted class ids (model in eval mode)."""
    model.eval()
    images = torch.as_tensor(images, dtype=torch.float32)
    out = [model(images[k : k + batch_size]).argmax(dim=1) for k in range(0, len(images), batch_size)]
    return torch.cat(out).numpy().astype(np.int64)


def uint8_to_model(rgb: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) uint8 pictures (e.g. generated PIL images) -> (..., 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(to_model_range(np.asarray(rgb, dtype=np.uint8)))


# --- weights -------------------------------------------------------------------------------------------


def save_segmenter(path: Path, model: Segmenter, info: dict | None = None) -> None:
    """Write ``segmenter.safetensors`` + ``segmenter.json`` (config and ``info``) atomically into ``path``."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_directory(Path(path)) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        document = {"format": CONFIG_FORMAT, "format_version": CONFIG_VERSION, "config": model.config.to_dict(), **(info or {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n")


def read_segmenter_info(path: Path | None = None) -> dict:
    """The JSON document next to the weights (config, training recipe, held-out scores)."""
    path = Path(path) if path is not None else WEIGHTS_DIR
    try:
        document = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read the segmenter config {path / CONFIG_FILE}: {exc}") from None
    if document.get("format") != CONFIG_FORMAT:
        raise UserError(f"{path / CONFIG_FILE} is not a segmenter config (format {document.get('format')!r})")
    if int(document.get("format_version", 0)) > CONFIG_VERSION:
        raise UserError(f"{path / CONFIG_FILE}: segmenter format version {document['format_version']} is newer than this code")
    return document


def load_segmenter(path: Path | None = None) -> Segmenter:
    """The segmenter in ``path`` (default: the shipped weights), in eval mode on the CPU."""
    path = Path(path) if path is not None else WEIGHTS_DIR
    document = read_segmenter_info(path)
    model = Segmenter(SegmenterConfig.from_dict(document["config"]))
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"cannot read the segmenter weights {path / WEIGHTS_FILE}: {exc}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{path / WEIGHTS_FILE} does not match its config: {exc}") from None
    return model.eval()


# --- data ------------------------------------------------------------------------------------------------


def render_batch(seeds: list[int], height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scenes of ``seeds`` -> (images (B, 3, H, W) in [-1, 1], labels (B, H, W) int64)."""
    scenes = [render_scene(int(s), height, width) for s in seeds]
    images = uint8_to_model(np.stack([s.image for s in scenes]))
    labels = torch.from_numpy(np.stack([s.labels for s in scenes]).astype(np.int64))
    return images, labels


def validation_seeds(count: int) -> list[int]:
    """The held-out scenes of ``SyntheticLandscapes.validation`` (same seeds, any size)."""
    return [VALIDATION_SEED_BASE + k for k in range(count)]


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(2.5 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of one (3, H, W) image, edges replicated."""
    k = _gaussian_kernel(sigma)
    r = len(k) // 2
    x = F.pad(image[None], (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return x[0]


def degrade(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips, colour shifts and decoder-like degradations (blur, resampling, noise), per image."""
    out_images, out_labels = [], []

    def uniform(lo: float, hi: float, shape: tuple[int, ...] = ()) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=generator)

    for image, label in zip(images, labels):
        if uniform(0, 1) < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        x = (image + 1) / 2  # [0, 1]
        grey = x.mean(dim=0, keepdim=True)
        x = grey + (x - grey) * uniform(0.75, 1.25)  # saturation
        mean = x.mean()
        x = mean + (x - mean) * uniform(0.8, 1.2)  # contrast
        x = x * uniform(0.92, 1.08, (3, 1, 1)) + uniform(-0.06, 0.06)  # per-channel gain, brightness
        kind = float(uniform(0, 1))
        if kind < 0.3:
            x = _blur(x, float(uniform(0.5, 2.0)))
        elif kind < 0.55:
            factor = float(uniform(2.0, 5.0))
            h, w = x.shape[-2:]
            small = F.interpolate(x[None], size=(max(1, round(h / factor)), max(1, round(w / factor))),
                                  mode="bilinear", align_corners=False, antialias=True)
            x = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0]
        if uniform(0, 1) < 0.5:
            x = x + uniform(0.0, 0.04) * torch.randn(x.shape, generator=generator)
        out_images.append(x.clamp(0, 1) * 2 - 1)
        out_labels.append(label)
    return torch.stack(out_images), torch.stack(out_labels)


# --- training --------------------------------------------------------------------------------------------

TRAIN_HEIGHTS = (192, 224, 256, 288)
TRAIN_ASPECTS = (1, 2)  # width = aspect * height


@dataclass
class TrainRecipe:
    steps: int = 1500
    pixels_per_batch: int = 8 * 256 * 256  # batch size = this / (H * W), at least 2
    lr: float = 4e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    seed: int = 0
    class_weight_power: float = 0.5  # cross-entropy weight of a class ~ (its pixel share) ** -power: rare snow and sand count
    threads: int = 1  # torch threads while training: one is much faster than two on a shared 2-core machine
    validation_count: int = 32  # held-out 256x256 scenes scored at the end (plus a quarter as many 512x256)
    config: SegmenterConfig = field(default_factory=SegmenterConfig)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["config"] = self.config.to_dict()
        return d


def _batch_plan(rng: np.random.Generator, pixels: int) -> tuple[list[int], int, int]:
    height = int(rng.choice(TRAIN_HEIGHTS))
    width = height * int(rng.choice(TRAIN_ASPECTS))
    batch = max(2, round(pixels / (height * width)))
    seeds = [int(s) for s in rng.integers(TRAIN_SEED_BASE, 2 * TRAIN_SEED_BASE, size=batch)]
    return seeds, height, width


def class_weights(rng: np.random.Generator, n_classes: int, power: float, scenes: int = 64) -> torch.Tensor:
    """(n_classes,) loss weights from the pixel shares in ``scenes`` training scenes, mean weight per pixel 1."""
    counts = np.ones(n_classes)
    for seed in rng.integers(TRAIN_SEED_BASE, 2 * TRAIN_SEED_BASE, size=scenes):
        counts += np.bincount(render_scene(int(seed), 128, 128).labels.ravel(), minlength=n_classes)
    share = counts / counts.sum()
    weights = share**-power
    return torch.tensor(weights / (weights * share).sum(), dtype=torch.float32)


def score_segmenter(model: Segmenter, count: int, height: int, width: int, batch_size: int = 4) -> dict:
    """Pixel accuracy and mIoU on ``count`` held-out validation scenes (clean renders) at height x width."""
    confusion = np.zeros((model.config.n_classes,) * 2, np.int64)
    seeds = validation_seeds(count)
    for start in range(0, count, batch_size):
        images, labels = render_batch(seeds[start : start + batch_size], height, width)
        confusion += confusion_matrix(segment(model, images), labels, model.config.n_classes)
    return {"size": [width, height], "count": count, **segmentation_scores(confusion, model.config.label_names)}


def train_segmenter(recipe: TrainRecipe = TrainRecipe(), out: Path | None = None,
                    log: Callable[[str], None] = functools.partial(print, flush=True),
                    log_every: int = 50) -> tuple[Segmenter, dict]:
    """Train a segmenter from scratch on fresh synthetic scenes; score it on held-out scenes; save to ``out``.

    Returns (model in eval mode, info) where info holds the recipe, the training time and the scores.
    """
    threads_before = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        return _train(recipe, out, log, log_every)
    finally:
        torch.set_num_threads(threads_before)


def _train(recipe: TrainRecipe, out: Path | None, log: Callable[[str], None], log_every: int) -> tuple[Segmenter, dict]:
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    model = Segmenter(recipe.config)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 2% of the peak
        if step < recipe.warmup_steps:
            return recipe.lr * (step + 1) / recipe.warmup_steps
        t = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return recipe.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))

    weights = class_weights(rng, recipe.config.n_classes, recipe.class_weight_power)
    started = time.perf_counter()
    model.train()
    running = []
    for step in range(recipe.steps):
        seeds, height, width = _batch_plan(rng, recipe.pixels_per_batch)
        images, labels = degrade(*render_batch(seeds, height, width), generator)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = F.cross_entropy(model(images), labels, weight=weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == recipe.steps:
            log(f"step {step + 1}/{recipe.steps}  loss {np.mean(running):.4f}  lr {lr_at(step):.2e}  "
                f"{time.perf_counter() - started:.0f} s")
            running = []
    train_seconds = time.perf_counter() - started
    model.eval()
    scores = {
        "validation_256x256": score_segmenter(model, recipe.validation_count, 256, 256),
        "validation_512x256": score_segmenter(model, max(1, recipe.validation_count // 4), 256, 512),
    }
    info = {
        "reproduce": (f"python -m taming_deploy.training.evaluation.segmenter --out DIR --steps {recipe.steps} --seed {recipe.seed} "
                      f"--lr {recipe.lr:g} --pixels-per-batch {recipe.pixels_per_batch} --threads {recipe.threads} "
                      f"--validation-count {recipe.validation_count}"),
        "recipe": recipe.to_dict(),
        "training": {
            "train_seconds": round(train_seconds, 1),
            "seed_range": [TRAIN_SEED_BASE, 2 * TRAIN_SEED_BASE],
            "torch": torch.__version__,
            "threads": recipe.threads,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "class_weights": [round(float(w), 4) for w in weights],
        "scores": scores,
    }
    for name, s in scores.items():
        log(f"{name}: pixel accuracy {s['pixel_accuracy']:.4f}  mIoU {s['miou']:.4f}")
    if out is not None:
        save_segmenter(out, model, info)
        log(f"saved {Path(out) / WEIGHTS_FILE} and {CONFIG_FILE}")
    return model, info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the label-following segmenter on synthetic landscapes.")
    parser.add_argument("--out", type=Path, required=True, help="directory for segmenter.safetensors + segmenter.json")
    defaults = TrainRecipe()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--pixels-per-batch", type=int, default=defaults.pixels_per_batch)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--validation-count", type=int, default=defaults.validation_count)
    args = parser.parse_args(argv)
    recipe = TrainRecipe(steps=args.steps, seed=args.seed, lr=args.lr, pixels_per_batch=args.pixels_per_batch,
                         threads=args.threads, validation_count=args.validation_count)
    train_segmenter(recipe, args.out)


if __name__ == "__main__":
    main()
