"""Calibration inputs for the exporter: real pictures (a folder, or the synthetic landscapes), their
conditions, and the token sequences the transformer sees on them.

fp16 decisions and validation use these instead of zeros or noise, because activation ranges on
real content are what decide where fp16 overflows.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from taming_deploy.conditions import read_depth_map, read_label_map, resize_depth, resize_labels
from taming_deploy.errors import UserError
from taming_deploy.images import from_pil
from taming_deploy.spec import ModelSpec
from taming_deploy.windows import window_shape

SYNTHETIC = "synthetic:landscapes"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class CalibrationSet:
    images: np.ndarray  # (N, 3, H, W) float32 in [-1, 1]
    conditions: np.ndarray | None  # (N, H, W) int64 labels, (N, 1, H, W) float32 depth, (N, 3, H, W) images, or None

    def __len__(self) -> int:
        return len(self.images)


def depth_from_layout(labels: np.ndarray) -> np.ndarray:
    """A plausible depth proxy for a landscape: far at the horizon, near at the bottom, sky farthest."""
    h = labels.shape[-2]
    rows = np.linspace(1.0, -1.0, h, dtype=np.float32)[:, None]
    return np.broadcast_to(rows, labels.shape).astype(np.float32)


def synthetic_set(spec: ModelSpec, count: int, size: tuple[int, int], seed: int) -> CalibrationSet:
    from taming_deploy.training.data.synthetic_landscapes import render_scene

    scenes = [render_scene(seed + k, size[1], size[0]) for k in range(count)]
    images = np.concatenate([from_pil(Image.fromarray(s.image)) for s in scenes])
    kind = spec.condition.kind
    conditions = None
    if kind == "segmentation":
        assert spec.condition.n_labels is not None
        # a model trained on other labels still gets layouts with its own id range
        conditions = np.stack([s.labels.astype(np.int64) % spec.condition.n_labels for s in scenes])
    elif kind == "depth":
        conditions = np.stack([depth_from_layout(s.labels) for s in scenes])[:, None]
    elif kind == "image":  # image conditions are pictures too: the calibration images themselves
        conditions = images
    return CalibrationSet(images, conditions)


def folder_set(folder: Path, spec: ModelSpec, count: int, size: tuple[int, int]) -> CalibrationSet:
    """Images from ``folder``; conditions from ``folder/labels/<stem>.png`` (segmentation) or
    ``folder/depth/<stem>.png`` (depth); image conditions are the images themselves."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if not files:
        raise UserError(f"{folder}: no calibration images ({', '.join(IMAGE_SUFFIXES)})")
    images, conditions = [], []
    for path in files:
        images.append(from_pil(Image.open(path).convert("RGB").resize(size, Image.Resampling.BICUBIC)))
        if not spec.condition.spatial or spec.condition.kind == "image":
            continue
        subfolder = "labels" if spec.condition.kind == "segmentation" else "depth"
        condition_path = Path(folder) / subfolder / f"{path.stem}.png"
        if not condition_path.is_file():
            raise UserError(f"{path}: no condition map at {condition_path} for calibrating the condition encoder")
        if spec.condition.kind == "segmentation":
            conditions.append(resize_labels(read_label_map(condition_path, spec.condition), size))
        else:
            conditions.append(resize_depth(read_depth_map(condition_path), size)[None])
    stacked = np.concatenate(images)
    if spec.condition.kind == "image":
        return CalibrationSet(stacked, stacked)
    return CalibrationSet(stacked, np.stack(conditions) if conditions else None)


def calibration_set(source: str, spec: ModelSpec, count: int = 8, size: tuple[int, int] | None = None, seed: int = 0) -> CalibrationSet:
    """``source``: a folder of images, or ``synthetic:landscapes``. Images are window-sized by default."""
    f = spec.downsample_factor
    size = size or (spec.window[1] * f, spec.window[0] * f)
    if source == SYNTHETIC:
        return synthetic_set(spec, count, size, seed)
    if not Path(source).is_dir():
        raise UserError(f"--calibration {source}: not a folder of images (or {SYNTHETIC})")
    return folder_set(Path(source), spec, count, size)


def token_sequences(spec: ModelSpec, image_tokens: np.ndarray, condition_tokens: np.ndarray) -> np.ndarray:
    """(N, h, w) image tokens + condition tokens -> (N, L) transformer inputs of the first window
    (condition tokens, then the window's image tokens, without the last one), as the sampler feeds them."""
    n, h, w = image_tokens.shape
    wh, ww = window_shape((h, w), spec.window)
    image = image_tokens[:, :wh, :ww].reshape(n, -1)
    cond = condition_tokens[:, :wh, :ww].reshape(n, -1) if spec.condition.spatial else condition_tokens
    return np.concatenate((cond, image), axis=1)[:, :-1]
