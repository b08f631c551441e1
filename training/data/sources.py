"""Where training pictures come from: the synthetic landscapes or a folder of images with label maps.

A source draws a batch from a numpy Generator; the trainers seed that generator with
(seed, step, rank), so a batch depends on nothing else: a resumed run sees exactly the batches the
uninterrupted run would have seen, and ranks see different data.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from taming_deploy.conditions import labels_from_palette_colours
from taming_deploy.errors import UserError
from taming_deploy.training.data.synthetic_landscapes import LABELS, PALETTE, render_scene

SYNTHETIC = "synthetic:landscapes"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VALIDATION_SEED_BASE = 1 << 40  # synthetic validation scenes come from seeds training never draws


@dataclass
class Batch:
    images: np.ndarray  # (B, 3, S, S) float32 in [-1, 1]
    labels: np.ndarray  # (B, S, S) int64 class ids


class Source(Protocol):
    label_names: tuple[str, ...] | None
    palette: tuple[tuple[int, int, int], ...] | None

    def sample(self, rng: np.random.Generator, batch_size: int, size: int) -> Batch: ...

    def validation(self, count: int, size: int) -> Batch: ...


def to_model_range(rgb: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float32 in [-1, 1]."""
    return (np.moveaxis(rgb, -1, -3).astype(np.float32) / 127.5) - 1.0


class SyntheticLandscapes:
    label_names = LABELS
    palette = PALETTE

    def sample(self, rng: np.random.Generator, batch_size: int, size: int) -> Batch:
        return self._render([int(s) for s in rng.integers(0, 2**31, size=batch_size)], size)

    def validation(self, count: int, size: int) -> Batch:
        return self._render([VALIDATION_SEED_BASE + k for k in range(count)], size)

    @staticmethod
    def _render(seeds: list[int], size: int) -> Batch:
        scenes = [render_scene(seed, size, size) for seed in seeds]
        return Batch(to_model_range(np.stack([s.image for s in scenes])), np.stack([s.labels for s in scenes]).astype(np.int64))


@dataclass(frozen=True)
class Pair:
    image: Path
    labels: Path | None


def find_pairs(root: Path) -> list[Pair]:
    """``root/images/*`` with ``root/labels/<stem>.png``; or a list file of 'image [labels]' lines; or a
    plain folder of images (no labels: first-stage training only)."""
    if root.is_file():
        pairs = []
        for number, line in enumerate(root.read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) > 2:
                raise UserError(f"{root}:{number}: expected 'image [labels]', got {line!r}")
            base = root.parent
            pairs.append(Pair(base / fields[0], base / fields[1] if len(fields) == 2 else None))
        return pairs
    image_dir = root / "images" if (root / "images").is_dir() else root
    label_dir = root / "labels" if (root / "labels").is_dir() else None
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if label_dir is None:
        return [Pair(p, None) for p in images]
    labels = {p.stem: p for p in label_dir.iterdir() if p.suffix.lower() == ".png"}
    unpaired = [p.name for p in images if p.stem not in labels] + [
        f"labels/{p.name}" for stem, p in labels.items() if stem not in {i.stem for i in images}
    ]
    if unpaired:
        shown = ", ".join(unpaired[:8]) + (f" ... ({len(unpaired)} in all)" if len(unpaired) > 8 else "")
        raise UserError(f"{root}: files without a partner image/label map: {shown}")
    return [Pair(p, labels[p.stem]) for p in images]


def open_training_image(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise UserError(f"unreadable training file {path}: {exc}") from None
    return image


def is_validation(path: Path, percent: float) -> bool:
    """A stable split by file name, so adding files never moves old ones between splits."""
    return int(hashlib.sha1(path.name.encode()).hexdigest()[:8], 16) % 10_000 < percent * 100


class ImageFolder:
    """Images (and label maps: 8-bit class ids, or RGB in a given palette) with random crop and flip."""

    def __init__(self, root: Path, palette: tuple[tuple[int, int, int], ...] | None = None,
                 label_names: tuple[str, ...] | None = None, validation_percent: float = 2.0):
        root = Path(root)
        if not root.exists():
            raise UserError(f"--data {root}: no such folder or list file")
        pairs = find_pairs(root)
        if not pairs:
            raise UserError(f"--data {root}: no images ({', '.join(IMAGE_SUFFIXES)})")
        self.train = [p for p in pairs if not is_validation(p.image, validation_percent)]
        self.held_out = [p for p in pairs if is_validation(p.image, validation_percent)] or self.train[:1]
        self.palette = palette
        self.label_names = label_names

    def load(self, pair: Pair) -> tuple[np.ndarray, np.ndarray | None]:
        image = np.asarray(open_training_image(pair.image).convert("RGB"))
        if pair.labels is None:
            return image, None
        label_image = open_training_image(pair.labels)
        if label_image.mode in ("RGB", "RGBA"):
            if self.palette is None:
                raise UserError(f"{pair.labels}: an RGB label map needs the dataset's palette in the config")
            labels = labels_from_palette_colours(np.asarray(label_image.convert("RGB")), self.palette, str(pair.labels))
        else:
            labels = np.asarray(label_image).astype(np.int64)
        if labels.shape != image.shape[:2]:
            raise UserError(f"{pair.labels}: size {labels.shape[::-1]} differs from its image {pair.image} {image.shape[1::-1]}")
        return image, labels

    def crop(self, rng: np.random.Generator, pair: Pair, size: int, augment: bool) -> tuple[np.ndarray, np.ndarray]:
        image, labels = self.load(pair)
        h, w = image.shape[:2]
        if min(h, w) < size:  # upscale small images so that a crop fits (nearest for labels)
            scale = size / min(h, w)
            new = (max(size, round(w * scale)), max(size, round(h * scale)))
            image = np.asarray(Image.fromarray(image).resize(new, Image.Resampling.BICUBIC))
            if labels is not None:
                labels = np.asarray(Image.fromarray(labels.astype(np.int32)).resize(new, Image.Resampling.NEAREST)).astype(np.int64)
            h, w = image.shape[:2]
        top = int(rng.integers(0, h - size + 1)) if augment else (h - size) // 2
        left = int(rng.integers(0, w - size + 1)) if augment else (w - size) // 2
        image = image[top : top + size, left : left + size]
        labels = np.zeros((size, size), np.int64) if labels is None else labels[top : top + size, left : left + size]
        if augment and rng.random() < 0.5:
            image, labels = image[:, ::-1], labels[:, ::-1]
        return image, labels

    def _batch(self, rng: np.random.Generator, pairs: list[Pair], size: int, augment: bool) -> Batch:
        crops = [self.crop(rng, p, size, augment) for p in pairs]
        return Batch(to_model_range(np.stack([c[0] for c in crops])), np.stack([c[1] for c in crops]).astype(np.int64))

    def sample(self, rng: np.random.Generator, batch_size: int, size: int) -> Batch:
        picks = rng.integers(0, len(self.train), size=batch_size)
        return self._batch(rng, [self.train[k] for k in picks], size, augment=True)

    def validation(self, count: int, size: int) -> Batch:
        return self._batch(np.random.default_rng(0), self.held_out[:count], size, augment=False)


def open_source(data: str, palette=None, label_names=None) -> Source:
    if data == SYNTHETIC:
        return SyntheticLandscapes()
    return ImageFolder(Path(data), palette=palette, label_names=label_names)
