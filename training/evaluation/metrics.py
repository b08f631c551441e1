"""Evaluation numbers: PSNR, LPIPS, and pixel accuracy / mIoU from a confusion matrix.

Conventions:

- Images are (B, 3, H, W) in [-1, 1] (torch tensors or numpy arrays). PSNR uses the peak-to-peak range
  of that interval, 2, so ``PSNR = 10 log10(2**2 / MSE)`` = the usual ``10 log10(255**2 / MSE)`` on
  0..255 pixels. It is computed per image, then averaged over images (not from the pooled MSE). An
  image identical to its reference has infinite PSNR, which then makes the mean infinite.
- Segmentation scores come from one confusion matrix accumulated over all pixels of all images
  (dataset-level, the usual definition; not a mean of per-image scores). Rows are the target class,
  columns the predicted class.
- mIoU is the mean over classes of ``TP / (TP + FP + FN)``. A class absent from both the targets and
  the predictions (its row and column are all zero) has an undefined IoU (0 / 0) and is left out of
  the mean; a class that occurs only in the predictions, or only in the targets, counts with IoU 0.
"""
from __future__ import annotations

import math

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _as_float64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def psnr_per_image(images: ArrayLike, references: ArrayLike, peak_to_peak: float = 2.0) -> np.ndarray:
    """(B,) PSNR in dB of each image against its reference; both (B, ...) in the same range."""
    a, b = _as_float64(images), _as_float64(references)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"PSNR needs two batches of one shape (B, ...), got {a.shape} and {b.shape}")
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(peak_to_peak**2 / mse)


def psnr(images: ArrayLike, references: ArrayLike, peak_to_peak: float = 2.0) -> float:
    """Mean over images of the per-image PSNR (dB); images in [-1, 1] by default (peak-to-peak 2)."""
    return float(np.mean(psnr_per_image(images, references, peak_to_peak)))


@torch.no_grad()
def lpips_per_image(metric: torch.nn.Module, images: torch.Tensor, references: torch.Tensor, batch_size: int = 8) -> np.ndarray:
    """(B,) LPIPS distance of each image to its reference, in batches of ``batch_size``.

    ``metric`` is ``training.losses.lpips.load_lpips()`` (returns (B, 1, 1, 1)); images in [-1, 1].
    """
    out = []
    for start in range(0, len(images), batch_size):
        d = metric(images[start : start + batch_size].float(), references[start : start + batch_size].float())
        out.append(d.reshape(-1).cpu().numpy().astype(np.float64))
    return np.concatenate(out) if out else np.zeros(0)


def mean_lpips(metric: torch.nn.Module, images: torch.Tensor, references: torch.Tensor, batch_size: int = 8) -> float:
    """Mean over images of the LPIPS distance."""
    return float(np.mean(lpips_per_image(metric, images, references, batch_size)))


def confusion_matrix(predictions: ArrayLike, targets: ArrayLike, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) int64 pixel counts, ``[target, prediction]``; any matching shapes.

    Ids outside ``0 .. n_classes - 1`` in either input raise ValueError (they would be miscounted).
    """
    p = predictions.detach().cpu().numpy() if isinstance(predictions, torch.Tensor) else np.asarray(predictions)
    t = targets.detach().cpu().numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
    if p.shape != t.shape:
        raise ValueError(f"predictions {p.shape} and targets {t.shape} differ in shape")
    p, t = p.astype(np.int64).ravel(), t.astype(np.int64).ravel()
    for name, ids in (("prediction", p), ("target", t)):
        if ids.size and (ids.min() < 0 or ids.max() >= n_classes):
            raise ValueError(f"{name} ids must lie in [0, {n_classes}), got [{ids.min()}, {ids.max()}]")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def pixel_accuracy(confusion: np.ndarray) -> float:
    """Share of pixels whose predicted class is the target class (NaN for an empty matrix)."""
    total = confusion.sum()
    return float(np.trace(confusion) / total) if total else math.nan


def per_class_iou(confusion: np.ndarray) -> np.ndarray:
    """(n_classes,) IoU per class; NaN for a class absent from both targets and predictions."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)


def mean_iou(confusion: np.ndarray) -> float:
    """Mean IoU over the classes present in the targets or the predictions (NaN if none is)."""
    iou = per_class_iou(confusion)
    present = ~np.isnan(iou)
    return float(iou[present].mean()) if present.any() else math.nan


def segmentation_scores(confusion: np.ndarray, label_names: tuple[str, ...] | None = None) -> dict:
    """{"pixel_accuracy", "miou", "per_class_iou": {name: IoU or None (absent)}, "pixels"}."""
    iou = per_class_iou(confusion)
    names = label_names or tuple(str(k) for k in range(len(iou)))
    return {
        "pixel_accuracy": pixel_accuracy(confusion),
        "miou": mean_iou(confusion),
        "per_class_iou": {name: (None if math.isnan(v) else float(v)) for name, v in zip(names, iou)},
        "pixels": int(confusion.sum()),
    }
