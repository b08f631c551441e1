"""What a first stage's reconstruction numbers mean on the synthetic landscapes: resampling baselines.

    python benchmarks/reconstruction_baselines.py [--model PATH ...] [--images 16] [--size 256] [--threads N]

The same held-out scenes as `taming-deploy eval` (``SyntheticLandscapes.validation``) go through:

- ``avg-pool f + bicubic`` / ``+ bilinear``: each f x f patch replaced by its mean colour, then
  upsampled back. This keeps 3 real numbers per patch, unquantised: far more information than one of
  a VQGAN's codes (log2(codebook size) bits per patch), but no learned prior. It shows how much of
  the scenes' variance lies above the frequency a factor-f latent grid samples;
- each ``--model`` (a checkpoint with a first stage, or an exported bundle; none given: the embedded
  default model), through ``training.evaluation.evaluate.evaluate_reconstruction``.

Printed per row: mean PSNR (dB, peak-to-peak 2, per image then averaged) and mean LPIPS (VGG16 lin
v0.1), the issue's targets in the header.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchlib import print_table, set_threads
from taming_deploy.training.data.sources import SyntheticLandscapes
from taming_deploy.training.evaluation.evaluate import TARGETS, evaluate_reconstruction
from taming_deploy.training.evaluation.metrics import lpips_per_image, psnr_per_image
from taming_deploy.training.losses.lpips import load_lpips


def resampled(images: torch.Tensor, factor: int, mode: str) -> torch.Tensor:
    """Average-pool by ``factor``, upsample back with ``mode`` (bicubic or bilinear), clamp to [-1, 1]."""
    small = F.avg_pool2d(images, factor)
    return F.interpolate(small, scale_factor=factor, mode=mode, align_corners=False).clamp(-1, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, action="append", default=[],
                        help="checkpoint or bundle to evaluate (repeatable; default: the embedded model)")
    parser.add_argument("--images", type=int, default=16, help="held-out scenes (default 16)")
    parser.add_argument("--size", type=int, default=256, help="scene size in pixels (default 256)")
    parser.add_argument("--factors", default="4,8", help="pooling factors of the baselines (default 4,8)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    set_threads(args.threads)

    scenes = SyntheticLandscapes().validation(args.images, args.size)
    originals = torch.from_numpy(scenes.images)
    lpips = load_lpips()
    rows = []
    for factor in (int(f) for f in args.factors.split(",")):
        for mode in ("bicubic", "bilinear"):
            with torch.no_grad():
                images = resampled(originals, factor, mode)
            psnr = float(np.mean(psnr_per_image(images.numpy(), scenes.images)))
            distance = float(np.mean(lpips_per_image(lpips, images, originals)))
            rows.append([f"avg-pool {factor} + {mode}", f"{psnr:.2f}", f"{distance:.3f}"])
    for model in args.model or [None]:
        result = evaluate_reconstruction(model, count=args.images, size=args.size)
        rows.append([f"{model or 'embedded default'} ({result['runner']})", f"{result['psnr']:.2f}", f"{result['lpips']:.3f}"])
    print(f"{args.images} held-out {args.size}x{args.size} synthetic scenes")
    print_table(rows, ["reconstruction", f"PSNR dB (target >= {TARGETS['psnr']:g})", f"LPIPS (target <= {TARGETS['lpips']:g})"])


if __name__ == "__main__":
    main()
