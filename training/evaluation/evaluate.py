"""``taming-deploy eval``: reconstruction quality of a first stage, label following of a conditional model.

Reconstruction (:func:`evaluate_reconstruction`): held-out synthetic scenes (the seeds of
``SyntheticLandscapes.validation``, never drawn in training) go through encoder, quantizer and decoder;
the decoded images, clamped to [-1, 1], are compared with the originals by PSNR (peak-to-peak 2, per
image then averaged) and LPIPS (VGG16, lin v0.1). A checkpoint runs on its PyTorch first stage (a
first-stage-only VQGAN run works too); an exported bundle runs its encoder and decoder graphs on the
chosen backend, so the numbers are those of what is deployed.

Label following (:func:`evaluate_label_following`): for the label maps of held-out scenes, at each
requested (width, height), the model generates one image per map through ``Pipeline.generate`` (the
public API, sliding window and all), and the shipped segmenter (``taming_deploy.training.evaluation.segmenter``)
labels the generated pixels. Pixel accuracy and mIoU of those labels against the input maps measure
how well the images follow their conditions. The same segmenter on the real renders of the same
scenes gives the ceiling: the generated score can only be read relative to it. When the model has a
first stage, the segmenter also labels its reconstructions of the real renders: the best a generated
image can do through that decoder, which separates the first stage's share of the gap from the
GPT's. The k-th map is sampled with seed ``seed + k``.

:func:`run_eval` is what the CLI calls: it evaluates whatever the path supports and returns the lines
of a printable table (and writes the full results as JSON on request).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Literal

import numpy as np
import torch

from taming_deploy.errors import UserError
from taming_deploy.fileutil import atomic_file, check_output_file
from taming_deploy.images import save_image
from taming_deploy.output_marks import marked_document
from taming_deploy.spec import ConditionSpec
from taming_deploy.model_paths import DEFAULT_MODEL, is_bundle, is_checkpoint
from taming_deploy.progress import ProgressCallback
from taming_deploy.validation import parse_size
from taming_deploy.training.data.sources import VALIDATION_SEED_BASE, to_model_range
from taming_deploy.training.data.synthetic_landscapes import LABELS, colorize, render_scene
from taming_deploy.training.evaluation.metrics import confusion_matrix, lpips_per_image, psnr_per_image, segmentation_scores
from taming_deploy.training.evaluation.segmenter import Segmenter, load_segmenter, segment, uint8_to_model

What = Literal["all", "reconstruction", "labels"]
WHATS = ("all", "reconstruction", "labels")
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((256, 256), (512, 256))  # (width, height)
# The quality goals set for the embedded default model; shown beside the measured numbers, never enforced.
TARGETS = {"psnr": 26.0, "lpips": 0.15, "miou": 0.5}

# A progress bar factory: ``bar(description, unit)`` is a context manager yielding
# ``update(done, total, info="")`` (``taming_deploy.progress.progress_bar`` has this form).
ProgressBar = Callable[[str, str], ContextManager[ProgressCallback]]
# Told after each part (the reconstruction, each label-following size): (results so far, that part's lines).
PartDone = Callable[[dict, list[str]], None]
# What ``eval`` measures by default, and with ``--quick`` (a few minutes on 2 cores, measured in the README).
FULL = {"recon_count": 64, "label_count": 8, "sizes": DEFAULT_SIZES}
QUICK = {"recon_count": 16, "label_count": 2, "sizes": ((256, 256),)}


@contextlib.contextmanager
def no_bar(description: str, unit: str) -> Iterator[ProgressCallback]:
    yield lambda done, total, info="": None


def _ignore_part(results: dict, lines: list[str]) -> None:
    pass


def _ignore_line(line: str) -> None:
    pass


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` torch intra-op threads (None: leave the setting alone), restored afterwards.

    On a machine whose cores are busy with other work, one thread can be far faster than several:
    each small operation waits for every pool thread to be scheduled (measured here, 2 cores with a
    training run on them: sampling a tiny model 100x slower with 2 threads than with 1).
    """
    if threads is None:
        yield
        return
    if threads < 1:
        raise UserError(f"threads must be >= 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _resolve(path: Path | str | None) -> Path:
    path = DEFAULT_MODEL if path is None else Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such model (expected a taming-deploy checkpoint or an exported bundle)")
    if not (is_checkpoint(path) or is_bundle(path)):
        raise UserError(f"{path} is neither a taming-deploy checkpoint (config.json + model.safetensors) "
                        f"nor an exported bundle (manifest.json)")
    return path


# --- reconstruction ------------------------------------------------------------------------------------


def _reconstructor(path: Path, backend: str) -> tuple[Callable[[np.ndarray], np.ndarray], str, int]:
    """(images (B, 3, H, W) in [-1, 1] -> clamped reconstructions, runner name, downsampling factor)."""
    if is_checkpoint(path) and not is_bundle(path):
        from taming_deploy.training.checkpoint import load_model, read_config

        if read_config(path).first_stage is None:
            raise UserError(f"{path} holds no first stage (VQGAN): nothing to reconstruct with")
        if backend not in ("auto", "torch"):
            raise UserError(f"{path} is a checkpoint: reconstruction runs it on torch, not --backend {backend}")
        first_stage = load_model(path).first_stage_model.eval()

        @torch.no_grad()
        def run(images: np.ndarray) -> np.ndarray:
            reconstruction, _ = first_stage(torch.from_numpy(images))
            return reconstruction.clamp(-1, 1).numpy()

        return run, "torch", first_stage.config.downsample_factor
    from taming_deploy.backends import load_backend

    runner = load_backend(path, backend)  # type: ignore[arg-type]
    return (lambda images: np.clip(runner.decode(runner.encode(images)), -1, 1)), runner.name, runner.spec.downsample_factor


def evaluate_reconstruction(path: Path | str | None, count: int = 64, size: int = 256, batch_size: int = 1,
                            backend: str = "auto", bar: ProgressBar = no_bar) -> dict:
    """PSNR and LPIPS of first-stage reconstructions of ``count`` held-out ``size`` x ``size`` scenes.

    ``path``: a checkpoint with a first stage (run on torch) or an exported bundle (its encoder and
    decoder on ``backend``); None: the embedded default model. Scenes are rendered one batch at a
    time, so memory is set by ``batch_size``, not by ``count``. The default, one image at a time, is
    as fast as batches on a CPU and needs far less memory (eight 256 px scenes of the embedded model,
    ONNX Runtime, one torch thread: peak RSS 0.90 GB at batch 1, 2.28 GB at 4, 2.67 GB at 8; 25-26 s
    at batch 1 and 4 on a shared 2-core machine).
    """
    from taming_deploy.training.losses.lpips import load_lpips

    path = _resolve(path)
    if count < 1 or size < 1 or batch_size < 1:
        raise UserError(f"count, size and batch size must be positive, got {count}, {size}, {batch_size}")
    reconstruct, runner, factor = _reconstructor(path, backend)
    if size % factor:
        raise UserError(f"image size {size} is not a multiple of the first stage's downsampling factor {factor}")
    lpips = load_lpips()
    started = time.perf_counter()
    psnrs, distances = [], []
    with bar(f"reconstruction {size}x{size}", "img") as update:
        update(0, count)
        for start in range(0, count, batch_size):
            seeds = range(VALIDATION_SEED_BASE + start, VALIDATION_SEED_BASE + min(start + batch_size, count))
            originals = to_model_range(np.stack([render_scene(seed, size, size).image for seed in seeds]))
            reconstructions = reconstruct(originals)
            psnrs.append(psnr_per_image(reconstructions, originals))
            distances.append(lpips_per_image(lpips, torch.from_numpy(reconstructions), torch.from_numpy(originals), batch_size))
            update(start + len(seeds), count)
    psnr, lpips_d = np.concatenate(psnrs), np.concatenate(distances)
    return {
        "model": str(path),
        "runner": runner,
        "count": count,
        "size": [size, size],
        "seeds": [VALIDATION_SEED_BASE, VALIDATION_SEED_BASE + count - 1],
        "psnr": float(psnr.mean()),
        "psnr_min": float(psnr.min()),
        "lpips": float(lpips_d.mean()),
        "lpips_max": float(lpips_d.max()),
        "seconds": round(time.perf_counter() - started, 2),
    }


# --- label following -----------------------------------------------------------------------------------


def example_name(size: tuple[int, int], k: int) -> str:
    return f"labels_{size[0]}x{size[1]}_{k:03d}.png"


def check_example_files(directory: Path, sizes: Sequence[tuple[int, int]], count: int, force: bool) -> None:
    """Before the work: ``directory`` is absent or a writable directory, and every example PNG the run
    will write there is absent, ours, or (with ``force``) any regular file."""
    if os.path.lexists(directory) and not directory.is_dir():
        raise UserError(f"{directory} exists and is not a directory; name a folder for the example images")
    for size in sizes:
        for k in range(count):
            check_output_file(directory / example_name(size, k), force)


def _save_example(directory: Path, size: tuple[int, int], k: int, labels: np.ndarray, real: np.ndarray,
                  generated: np.ndarray, seen_generated: np.ndarray, seen_real: np.ndarray, force: bool) -> None:
    """One PNG per map: top row labels | real | generated, bottom row what the segmenter saw in each."""
    from PIL import Image

    top = np.concatenate([colorize(labels), real, generated], axis=1)
    bottom = np.concatenate([colorize(labels), colorize(seen_real), colorize(seen_generated)], axis=1)
    with atomic_file(directory / example_name(size, k), force) as tmp:
        save_image(Image.fromarray(np.concatenate([top, bottom], axis=0)), tmp, "PNG")


def evaluate_label_following(model_path: Path | str | None, sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
                             count: int = 8, seed: int = 0, backend: str = "auto", mode: str = "exact",
                             top_k: int | None = 100, segmenter: Segmenter | None = None,
                             save_dir: Path | None = None, bar: ProgressBar = no_bar, pipeline=None,
                             reconstruct: Callable[[np.ndarray], np.ndarray] | None = None,
                             on_size: Callable[[dict], None] | None = None, force: bool = False) -> dict:
    """Pixel accuracy and mIoU of the segmenter on generated images against their input label maps.

    ``sizes``: (width, height) pairs, multiples of the model's downsampling factor; for each, the label
    maps of ``count`` held-out scenes of that size. ``mode``: the sampler's window schedule ("exact" or
    "fast"). Returns {"model", "backend", ..., "sizes": [{"size", "generated", "real", timing}]} where
    "generated" and "real" are ``metrics.segmentation_scores`` dicts. ``pipeline``: an already loaded
    ``Pipeline`` (or anything with its ``spec``, ``backend.name`` and ``generate``) to use instead of
    loading ``model_path`` with ``backend``. ``reconstruct``: the model's first stage, images (B, 3, H, W)
    in [-1, 1] -> reconstructions; when given, each size also reports "reconstructed", the segmenter's
    scores on reconstructions of the real renders. ``on_size``: called with the results so far after
    each size (the returned dict, its "sizes" filled up to that size). ``force``: example PNGs in
    ``save_dir`` replace files of the same name that taming-deploy did not write.
    """
    from taming_deploy.pipeline import Pipeline

    if count < 1:
        raise UserError(f"count must be >= 1, got {count}")
    if mode not in ("exact", "fast"):
        raise UserError(f"mode must be 'exact' or 'fast', got {mode!r}")
    path = _resolve(model_path) if pipeline is None else Path(str(model_path))
    segmenter = segmenter if segmenter is not None else load_segmenter()
    if pipeline is None:
        pipeline = Pipeline.load(path, backend)  # type: ignore[arg-type]
    if _label_mismatch(pipeline.spec.condition) or tuple(segmenter.config.label_names) != LABELS:
        problem = _label_mismatch(pipeline.spec.condition) or "the segmenter's labels are not the synthetic landscape labels"
        raise UserError(f"{path}: label following cannot be measured: {problem}")
    factor = pipeline.spec.downsample_factor
    for width, height in sizes:
        if width < factor or height < factor or width % factor or height % factor:
            raise UserError(f"size {width}x{height} is not a positive multiple of the model's downsampling factor {factor}")
    n_classes = segmenter.config.n_classes
    results: list[dict] = []
    summary = {
        "model": str(path),
        "backend": pipeline.backend.name,
        "mode": mode,
        "top_k": top_k,
        "seed": seed,
        "seeds": [VALIDATION_SEED_BASE, VALIDATION_SEED_BASE + count - 1],
        "sizes": results,
    }
    for width, height in sizes:
        generated_cm = np.zeros((n_classes, n_classes), np.int64)
        real_cm = np.zeros((n_classes, n_classes), np.int64)
        reconstructed_cm = np.zeros((n_classes, n_classes), np.int64)
        sample_seconds = decode_seconds = 0.0
        started = time.perf_counter()
        per_map = (height // factor) * (width // factor)
        with bar(f"label following {width}x{height}", "tok") as update:
            update(0, count * per_map, f"map 1/{count}")
            for k in range(count):
                def on_token(done: int, _total: int, k: int = k) -> None:
                    update(k * per_map + done, count * per_map, f"map {k + 1}/{count}")

                scene = render_scene(VALIDATION_SEED_BASE + k, height, width)
                generation = pipeline.generate(scene.labels, seed=seed + k, top_k=top_k, mode=mode,  # type: ignore[arg-type]
                                               on_token=on_token)
                sample_seconds += generation.stats["sample_seconds"]
                decode_seconds += generation.stats["decode_seconds"]
                image = np.asarray(generation.images[0].convert("RGB"))
                if image.shape[:2] != scene.labels.shape:
                    raise UserError(f"the model generated a {image.shape[1]}x{image.shape[0]} image for a {width}x{height} map")
                inputs = uint8_to_model(np.stack([image, scene.image]))
                if reconstruct is not None:
                    inputs = torch.cat([inputs, torch.from_numpy(reconstruct(inputs[1:].numpy()))])
                seen = segment(segmenter, inputs)
                generated_cm += confusion_matrix(seen[0], scene.labels, n_classes)
                real_cm += confusion_matrix(seen[1], scene.labels, n_classes)
                if reconstruct is not None:
                    reconstructed_cm += confusion_matrix(seen[2], scene.labels, n_classes)
                if save_dir is not None:
                    _save_example(Path(save_dir), (width, height), k, scene.labels, scene.image, image, seen[0], seen[1], force)
                update((k + 1) * per_map, count * per_map, f"map {k + 1}/{count}")
        results.append({
            "size": [width, height],
            "count": count,
            "generated": segmentation_scores(generated_cm, segmenter.config.label_names),
            "real": segmentation_scores(real_cm, segmenter.config.label_names),
            **({"reconstructed": segmentation_scores(reconstructed_cm, segmenter.config.label_names)} if reconstruct else {}),
            "sample_seconds_per_image": round(sample_seconds / count, 2),
            "decode_seconds_per_image": round(decode_seconds / count, 2),
            "seconds": round(time.perf_counter() - started, 2),
        })
        if on_size is not None:
            on_size(summary)
    return summary


# --- everything a path supports -------------------------------------------------------------------------


@dataclass(frozen=True)
class Capabilities:
    """What a model path can be evaluated on, from its config or manifest alone (nothing is loaded)."""

    reconstruction: bool
    label_following: bool
    downsample_factor: int | None
    why_not_labels: str = ""  # when label following is not possible


def capabilities(path: Path | str | None) -> Capabilities:
    path = _resolve(path)
    if is_checkpoint(path) and not is_bundle(path):
        from taming_deploy.training.checkpoint import read_config

        config = read_config(path)
        has_first = config.first_stage is not None
        factor = config.first_stage.downsample_factor if config.first_stage is not None else None
        if not config.is_complete:
            return Capabilities(has_first, False, factor, "not a complete model (first stage, condition, transformer)")
        cond = config.spec().condition
    else:
        from taming_deploy.bundle import Bundle

        bundle = Bundle(path)
        has_first = bundle.has_graph("encoder") and bundle.has_graph("decoder")
        factor, cond = bundle.spec.downsample_factor, bundle.spec.condition
    return Capabilities(has_first, not _label_mismatch(cond), factor, _label_mismatch(cond))


def supported(path: Path | str | None) -> tuple[bool, bool]:
    """(reconstruction possible, label following possible) for a model path."""
    found = capabilities(path)
    return found.reconstruction, found.label_following


def _label_mismatch(cond: ConditionSpec) -> str:
    """Why the segmenter cannot judge a model with this condition ("" when it can)."""
    if cond.kind != "segmentation":
        return f"conditioned on {cond.kind}, not on label maps"
    if cond.n_labels != len(LABELS) or (cond.label_names is not None and tuple(cond.label_names) != LABELS):
        known = ", ".join(cond.label_names) if cond.label_names else f"{cond.n_labels} unnamed labels"
        return (f"its labels ({known}) are not the synthetic landscape labels the segmenter knows "
                f"({', '.join(LABELS)})")
    return ""


def evaluate(path: Path | str | None, what: What = "all", recon_count: int = 64, recon_size: int = 256,
             label_count: int = 8, sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES, seed: int = 0,
             backend: str = "auto", mode: str = "exact", top_k: int | None = 100, save_dir: Path | None = None,
             threads: int | None = None, bar: ProgressBar = no_bar,
             on_part: PartDone = _ignore_part, force: bool = False) -> tuple[dict, list[str]]:
    """Run the evaluations ``what`` asks for ("all": whatever the path supports); (results, table lines).

    All arguments are checked before anything slow runs. ``threads``: torch threads for the run (see
    :func:`torch_threads`); None keeps torch's setting. ``on_part`` is told as soon as each part is
    done (first the header, then the reconstruction, then each label-following size, then the
    closing lines): together its lines are the returned table.
    """
    if what not in WHATS:
        raise UserError(f"what must be one of {', '.join(WHATS)}, got {what!r}")
    if mode not in ("exact", "fast"):
        raise UserError(f"mode must be 'exact' or 'fast', got {mode!r}")
    if recon_count < 1 or recon_size < 1 or label_count < 1:
        raise UserError(f"counts and sizes must be positive, got {recon_count} reconstruction images of "
                        f"{recon_size} px and {label_count} label maps")
    path = _resolve(path)
    found = capabilities(path)
    if what == "reconstruction" and not found.reconstruction:
        raise UserError(f"{path} has no first stage (encoder and decoder) to measure reconstruction with")
    if what == "labels" and not found.label_following:
        raise UserError(f"{path}: no label following to measure: {found.why_not_labels}")
    if what == "all" and not (found.reconstruction or found.label_following):
        raise UserError(f"{path}: nothing to evaluate: no first stage, and {found.why_not_labels}")
    run_reconstruction = found.reconstruction and what in ("all", "reconstruction")
    run_labels = found.label_following and what in ("all", "labels")
    factor = found.downsample_factor or 1
    if run_reconstruction and recon_size % factor:
        raise UserError(f"image size {recon_size} is not a multiple of the first stage's downsampling factor {factor}")
    if run_labels:
        for width, height in sizes:
            if width < factor or height < factor or width % factor or height % factor:
                raise UserError(f"size {width}x{height} is not a positive multiple of the model's downsampling factor {factor}")
        if save_dir is not None:
            check_example_files(Path(save_dir), sizes, label_count, force)
    results: dict = {"model": str(path), "torch_threads": None, "notes": []}
    if what == "all" and not found.label_following:
        results["notes"].append(f"label following not measured: {found.why_not_labels}")
    if what == "all" and not found.reconstruction:
        results["notes"].append("reconstruction not measured: no first stage")
    lines: list[str] = []

    def part_done(new_lines: list[str]) -> None:
        lines.extend(new_lines)
        on_part(results, new_lines)

    def size_done(follow: dict) -> None:
        results["label_following"] = follow
        row_lines = [format_label_row(follow["sizes"][-1])]
        part_done((format_label_header(follow) if len(follow["sizes"]) == 1 else []) + row_lines)

    with torch_threads(threads):
        results["torch_threads"] = torch.get_num_threads()
        part_done(format_header(results))
        if run_reconstruction:
            results["reconstruction"] = evaluate_reconstruction(path, recon_count, recon_size, backend=backend, bar=bar)
            part_done(format_reconstruction(results["reconstruction"]))
        if run_labels:
            reconstruct = _reconstructor(path, backend)[0] if found.reconstruction else None
            results["label_following"] = evaluate_label_following(path, sizes, label_count, seed, backend, mode, top_k,
                                                                  save_dir=save_dir, bar=bar, reconstruct=reconstruct,
                                                                  on_size=size_done, force=force)
    part_done(format_closing(results))
    return results, lines


def format_header(results: dict) -> list[str]:
    threads = f"  (torch threads: {results['torch_threads']})" if results.get("torch_threads") else ""
    return [f"model: {results['model']}{threads}"]


def format_reconstruction(rec: dict) -> list[str]:
    return [
        f"reconstruction ({rec['count']} held-out {rec['size'][0]}x{rec['size'][1]} synthetic scenes, {rec['runner']}, "
        f"{rec['seconds']:.0f} s)",
        f"  PSNR   {rec['psnr']:7.2f} dB   (worst image {rec['psnr_min']:.2f} dB; goal >= {TARGETS['psnr']:g} dB)",
        f"  LPIPS  {rec['lpips']:7.4f}      (worst image {rec['lpips_max']:.4f}; goal <= {TARGETS['lpips']:g})",
    ]


def format_label_header(follow: dict) -> list[str]:
    return [
        f"label following (held-out label maps, {follow['backend']}, mode {follow['mode']}, top-k {follow['top_k']}, "
        f"seeds {follow['seed']}+k; segmenter on generated images vs. on the real renders and on the first "
        f"stage's reconstructions of them; goal mIoU >= {TARGETS['miou']:g})",
        f"  {'size':>9}  {'maps':>4}  {'accuracy':>8}  {'mIoU':>6}  {'real acc':>8}  {'real mIoU':>9}  "
        f"{'rec mIoU':>8}  {'s/image':>7}",
    ]


def format_label_row(row: dict) -> str:
    g, r = row["generated"], row["real"]
    rec_miou = f"{row['reconstructed']['miou']:8.4f}" if "reconstructed" in row else f"{'-':>8}"
    per_image = row["seconds"] / row["count"]
    return (f"  {row['size'][0]:>4}x{row['size'][1]:<4}  {row['count']:>4}  {g['pixel_accuracy']:8.4f}  "
            f"{g['miou']:6.4f}  {r['pixel_accuracy']:8.4f}  {r['miou']:9.4f}  {rec_miou}  {per_image:7.1f}")


def format_closing(results: dict) -> list[str]:
    """The per-class summary of label following (when measured) and the notes."""
    lines = []
    worst: dict[str, float] = {}
    for row in results.get("label_following", {}).get("sizes", []):
        for name, iou in row["generated"]["per_class_iou"].items():
            if iou is not None:
                worst[name] = min(worst.get(name, 1.0), iou)
    if worst:
        lines.append("  per-class IoU on generated images (lowest over sizes): "
                     + ", ".join(f"{name} {iou:.2f}" for name, iou in worst.items()))
    return lines + [f"note: {note}" for note in results.get("notes", [])]


def format_table(results: dict) -> list[str]:
    """The printable summary of :func:`evaluate`'s results (what ``on_part`` was told, all at once)."""
    lines = format_header(results)
    if "reconstruction" in results:
        lines += format_reconstruction(results["reconstruction"])
    follow = results.get("label_following")
    if follow is not None and follow["sizes"]:
        lines += format_label_header(follow) + [format_label_row(row) for row in follow["sizes"]]
    return lines + format_closing(results)


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """'256x256,512x256' -> ((256, 256), (512, 256)) as (width, height)."""
    return tuple(parse_size(part.strip(), "--sizes") for part in text.split(","))  # type: ignore[misc]


def run_eval(path: Path | str | None = None, what: str = "all", recon_count: int = 64, recon_size: int = 256,
             label_count: int = 8, sizes: str | Sequence[tuple[int, int]] = DEFAULT_SIZES, seed: int = 0,
             backend: str = "auto", mode: str = "exact", top_k: int | None = 100, json_out: Path | None = None,
             save_dir: Path | None = None, threads: int | None = None, bar: ProgressBar = no_bar,
             echo: Callable[[str], None] = _ignore_line, force: bool = False) -> list[str]:
    """The CLI entry point: evaluate, return the table lines, and give each part's lines to ``echo`` as
    soon as it is done; with ``json_out``, the results so far replace that file (atomically) after each part.

    ``path`` None: the embedded default model. ``sizes``: (width, height) pairs or 'WxH,WxH'. Raises
    UserError on bad input, before any slow work.
    """
    parsed = parse_sizes(sizes) if isinstance(sizes, str) else tuple(sizes)
    if json_out is not None:
        check_output_file(Path(json_out), force)  # before the minutes of evaluation

    def on_part(results: dict, lines: list[str]) -> None:
        for line in lines:
            echo(line)
        if json_out is not None:
            with atomic_file(Path(json_out), force) as tmp:
                tmp.write_text(json.dumps(marked_document(results), indent=2) + "\n")

    _, lines = evaluate(path, what, recon_count=recon_count, recon_size=recon_size,  # type: ignore[arg-type]
                        label_count=label_count, sizes=parsed, seed=seed, backend=backend, mode=mode,
                        top_k=top_k, save_dir=save_dir, threads=threads, bar=bar, on_part=on_part, force=force)
    if json_out is not None:
        lines.append(f"results written to {json_out}")
        echo(lines[-1])
    return lines
