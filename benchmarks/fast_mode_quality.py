"""What fast mode costs in likelihood: samples of both modes scored under the exact windows.

    python benchmarks/fast_mode_quality.py [--model fixture|default] [--checkpoint DIR | --bundle DIR]
        [--images 8] [--top-k 100] [--temperature 1.0] [--window-stride 8] [--seed 0]
        [--labels FILE] [--latent 24x32] [--backend ort|torch] [--threads N]

K images are sampled (top-k, one fixed seed, as one batch) in exact mode and in fast mode for the same
condition maps. Every sample's tokens are then scored under the EXACT windows: for each cell the
original's placement, teacher-forced through the transformer (one prefill per placement, one cached
step per further target: the logits the exact sampler computes), log-softmax over the image
codebook, and the negative log-likelihood of the token the sample holds there. Printed: the mean NLL
per token (nats) of the exact-mode samples and of the fast-mode samples, each with its standard
error over images, and their per-image difference (fast - exact) with its standard error.

Conditions: the shared fixture uses its label map (tests/data/segcond_small/expected.npz "labels",
replicated K times); another model uses --labels FILE (a class-id PNG, replicated), else, when it has
the synthetic landscapes' 8 labels, K generated scenes of --latent cells (training/data).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchlib import FIXTURE_DIR, add_model_arguments, apply_common_arguments, parse_latent, prepare_model, timed
from taming_deploy.backends.base import Backend
from taming_deploy.sampler import sample_tokens
from taming_deploy.sampling import SamplingOptions, TokenStream
from taming_deploy.spec import ModelSpec
from taming_deploy.windows import schedule, window_shape


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def exact_window_nll(backend: Backend, condition_tokens: np.ndarray, image: np.ndarray) -> np.ndarray:
    """(N, h, w) NLL of each of ``image``'s tokens under the exact placement, teacher-forced: the
    exact sampler's calls, feeding the image's own tokens instead of sampled ones."""
    spec = backend.spec
    n, h, w = image.shape
    wh, ww = window_shape((h, w), spec.window)
    nll = np.zeros((n, h, w))
    cache = backend.new_cache(n)
    rows = np.arange(n)
    for placement in schedule((h, w), spec.window, "exact"):
        top, left = placement.top, placement.left
        window = image[:, top : top + wh, left : left + ww].reshape(n, -1)
        prefix = condition_tokens[:, top : top + wh, left : left + ww].reshape(n, -1) if spec.condition.spatial else condition_tokens
        filled: int | None = None
        for i, j in placement.targets:
            target = (i - top) * ww + (j - left)
            if filled is None:
                logits = backend.transformer_step(np.concatenate((prefix, window[:, :target]), axis=1), 0, cache)
            else:
                logits = backend.transformer_step(window[:, filled:target], prefix.shape[1] + filled, cache)
            nll[:, i, j] = -log_softmax(logits[:, : spec.image_codebook_size])[rows, image[:, i, j]]
            filled = target
    return nll


def moved_fraction(latent: tuple[int, int], spec: ModelSpec, stride: int) -> float:
    """Cells whose fast-mode window sits elsewhere than the exact one."""
    def placed(mode: str) -> dict[tuple[int, int], tuple[int, int]]:
        return {t: (p.top, p.left) for p in schedule(latent, spec.window, mode, stride) for t in p.targets}  # type: ignore[arg-type]

    exact, fast = placed("exact"), placed("fast")
    return sum(exact[c] != fast[c] for c in exact) / len(exact)


def condition_labels(spec: ModelSpec, fixture: bool, labels_file: Path | None, latent: tuple[int, int], count: int) -> tuple[np.ndarray, str]:
    """(K, H, W) class-id maps and where they came from."""
    from taming_deploy.conditions import read_label_map

    if labels_file is not None:
        ids = read_label_map(labels_file, spec.condition)
        return np.repeat(ids[None], count, axis=0), f"{labels_file} (x{count})"
    if fixture:
        with np.load(FIXTURE_DIR / "expected.npz") as data:
            ids = data["labels"].astype(np.int64)
        return np.repeat(ids[None], count, axis=0), f"the fixture's label map expected.npz 'labels' (x{count})"
    from taming_deploy.training.data.synthetic_landscapes import LABELS, render_scene

    if spec.condition.kind != "segmentation" or spec.condition.n_labels != len(LABELS):
        raise SystemExit("this model does not take the synthetic landscapes' labels: pass --labels FILE")
    f = spec.downsample_factor
    scenes = [render_scene(seed, latent[0] * f, latent[1] * f).labels for seed in range(count)]
    return np.stack(scenes).astype(np.int64), f"{count} synthetic landscape scenes (seeds 0..{count - 1})"


def load_backend(name: str, checkpoint: Path | None, bundle: Path, threads: int | None) -> Backend:
    if name == "torch":
        if checkpoint is None:
            raise SystemExit("the torch backend needs a checkpoint")
        from taming_deploy.backends.torch_backend import TorchBackend

        return TorchBackend.load(checkpoint)
    from taming_deploy.backends.ort_backend import OrtBackend

    return OrtBackend(bundle, threads=threads)


def mean_and_error(per_image: np.ndarray) -> tuple[float, float]:
    return float(per_image.mean()), float(per_image.std(ddof=1) / np.sqrt(len(per_image))) if len(per_image) > 1 else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.set_defaults(model="fixture")
    parser.add_argument("--images", type=int, default=8, help="K images per mode (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--window-stride", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--labels", type=Path, help="a class-id label map (PNG) as the condition")
    parser.add_argument("--latent", type=parse_latent, default=(24, 32), help="latent rows x columns of generated scenes")
    parser.add_argument("--backend", choices=("ort", "torch"), default="ort")
    args = parser.parse_args(argv)
    apply_common_arguments(args)
    model = prepare_model(args.model, args.checkpoint, args.bundle, args.cache_dir)
    backend = load_backend(args.backend, model.checkpoint, model.bundle, args.threads)
    spec = backend.spec
    if not spec.condition.spatial:
        raise SystemExit("fast mode only differs from exact mode for spatial conditions with images wider than the window")
    fixture = args.model == "fixture" and args.checkpoint is None and args.bundle is None
    labels, source = condition_labels(spec, fixture, args.labels, args.latent, args.images)
    cond = backend.condition_tokens(labels)
    latent = cond.shape[1:]
    options = SamplingOptions(top_k=args.top_k, temperature=args.temperature)
    print(f"model: {model.name} ({args.backend}); condition: {source}; latent {latent[0]}x{latent[1]}, "
          f"window {spec.window[0]}x{spec.window[1]}; {args.images} images, top-k {args.top_k}, temperature "
          f"{args.temperature:g}, seed {args.seed}; fast stride {args.window_stride}: "
          f"{moved_fraction(latent, spec, args.window_stride):.0%} of cells sampled under another window")
    per_image: dict[str, np.ndarray] = {}
    for mode in ("exact", "fast"):
        (image, stats), sampling = timed(
            lambda: sample_tokens(backend, cond, latent, options, TokenStream.for_batch(args.seed, len(cond)), mode, args.window_stride))
        nll, scoring = timed(lambda: exact_window_nll(backend, cond, image))
        per_image[mode] = nll.reshape(len(nll), -1).mean(axis=1)
        print(f"   ... {mode}: sampled in {sampling:.1f} s ({stats.prefills} prefills), scored in {scoring:.1f} s", flush=True)
    print("\nmean NLL per token under the exact windows (nats; +- standard error over images)")
    for mode in ("exact", "fast"):
        mean, error = mean_and_error(per_image[mode])
        print(f"  {mode}-mode samples: {mean:.4f} +- {error:.4f}")
    mean, error = mean_and_error(per_image["fast"] - per_image["exact"])
    print(f"  fast - exact (paired by image): {mean:+.4f} +- {error:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
