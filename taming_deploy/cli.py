"""The ``taming-deploy`` command line. Each command is a thin layer over a library function.

User mistakes (bad files, sizes, options) end in one line on stderr and exit code 2; torch, onnx and
TensorRT are imported only by the commands that need them.
"""
from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer

from taming_deploy.errors import UserError
from taming_deploy.validation import DEFAULT_MAX_PIXELS

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train, export and run Taming Transformers (VQGAN + GPT) models.",
)


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def user_errors_exit(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn UserError into a one-line message and a non-zero exit, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(code=130) from None

    return wrapper


def parse_size(text: str | None) -> tuple[int, int] | None:
    """'WxH' -> (W, H)."""
    if text is None:
        return None
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size must look like 512x256 (width x height), got {text!r}") from None
    if width < 1 or height < 1:
        raise UserError(f"--size must be positive, got {text!r}")
    return width, height


@app.command("import-taming")
@user_errors_exit
def import_taming_command(
    ckpt: Annotated[Path, typer.Argument(help="Original Lightning checkpoint (.ckpt)")],
    config: Annotated[Path, typer.Option("--config", help="Its project.yaml")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the taming-deploy checkpoint")],
    trust_pickle: Annotated[
        bool, typer.Option("--trust-pickle", help="Allow arbitrary unpickling (can run code from the file)")
    ] = False,
) -> None:
    """Convert a checkpoint of the original Taming Transformers into this project's format."""
    try:
        from taming_deploy.training.import_taming import import_taming
    except ImportError:
        raise UserError("import-taming needs PyTorch: pip install 'taming-deploy[train]'") from None
    cfg = import_taming(ckpt, config, out, trust_pickle=trust_pickle)
    stages = [name for name in ("first_stage", "condition", "transformer") if getattr(cfg, name) is not None]
    typer.echo(f"wrote {out} ({', '.join(stages)})")


@app.command()
@user_errors_exit
def generate(
    cond: Annotated[Optional[Path], typer.Option(help="Condition map: label PNG (class ids or palette colours) or depth")] = None,
    class_id: Annotated[Optional[int], typer.Option(help="Class id, for class-conditional models")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Bundle or checkpoint directory [default: the embedded model]")] = None,
    backend: Annotated[str, typer.Option(help="auto, torch, ort or trt")] = "auto",
    out: Annotated[Path, typer.Option(help="Output image, .png, .jpg or .webp (numbered when -n > 1, unless --grid)")] = Path("out.png"),
    size: Annotated[Optional[str], typer.Option(help="Output size WxH in pixels (resizes the condition)")] = None,
    n: Annotated[int, typer.Option("-n", help="Images to sample in one batch")] = 1,
    grid: Annotated[bool, typer.Option(help="With -n > 1, write one grid image")] = False,
    mode: Annotated[str, typer.Option(help="exact (the original's windows) or fast (one window per stride)")] = "exact",
    window_stride: Annotated[int, typer.Option(help="Fast mode: tokens per window placement")] = 8,
    greedy: Annotated[bool, typer.Option(help="Take the most likely token (deterministic)")] = False,
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely tokens (0: all)")] = 100,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling mass")] = None,
    temperature: Annotated[float, typer.Option()] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Random seed: same seed, model and backend give the same image")] = None,
    save_tokens: Annotated[Optional[Path], typer.Option(help="Save the sampled token grid (.npy)")] = None,
    stats: Annotated[Optional[Path], typer.Option(help="Write timing and call counts (.json)")] = None,
    max_pixels: Annotated[int, typer.Option(help="Refuse batches (n x width x height) and condition images beyond this many pixels")] = DEFAULT_MAX_PIXELS,
) -> None:
    """Generate images from a condition by sliding-window sampling."""
    from taming_deploy.fileutil import atomic_file, check_output_file
    from taming_deploy.images import grid as make_grid
    from taming_deploy.images import output_format, save_image
    from taming_deploy.pipeline import Pipeline
    from taming_deploy.progress import progress_bar
    from taming_deploy.validation import check_request, check_sampling_options

    if backend not in ("auto", "torch", "ort", "trt"):
        raise UserError(f"--backend must be auto, torch, ort or trt, got {backend!r}")
    check_request(n, parse_size(size), seed, mode, window_stride)  # before loading the model
    check_sampling_options(greedy, temperature, top_k or None, top_p)
    if cond is not None and class_id is not None:
        raise UserError("pass either --cond or --class-id, not both")
    one_file = n == 1 or grid
    paths = [out] if one_file else [out.with_name(f"{out.stem}_{k:03d}{out.suffix}") for k in range(n)]
    for path in [*paths, save_tokens, stats]:
        if path is not None:
            check_output_file(path)  # before minutes of sampling, not after
    fmt = output_format(out)
    notes: list[str] = []  # shown after the run, so that an error stays the only line
    pipeline = Pipeline.load(model, backend, note=notes.append)  # type: ignore[arg-type]
    condition = cond if cond is not None else class_id
    with progress_bar("sampling", "tok") as update:
        result = pipeline.generate(
            condition,
            n=n,
            size=parse_size(size),
            seed=seed,
            mode=mode,  # type: ignore[arg-type]
            window_stride=window_stride,
            greedy=greedy,
            top_k=top_k or None,
            top_p=top_p,
            temperature=temperature,
            on_token=update,
            max_pixels=max_pixels,
        )
    images = [result.images[0] if n == 1 else make_grid(result.images)] if one_file else result.images
    for path, image in zip(paths, images):
        with atomic_file(path) as tmp:
            save_image(image, tmp, fmt)
    written = [str(path) for path in paths]
    if save_tokens is not None:
        with atomic_file(save_tokens) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, result.tokens[0] if n == 1 else result.tokens)
    if stats is not None:
        with atomic_file(stats) as tmp:
            tmp.write_text(json.dumps(result.stats, indent=2))
    for text in notes:
        typer.echo(text, err=True)
    s = result.stats
    typer.echo(
        f"wrote {', '.join(written)} on {s['backend']}: {s['tokens']} tokens in {s['sample_seconds']:.2f} s "
        f"({s['prefills']} prefills, {s['steps']} steps), decode {s['decode_seconds']:.2f} s",
        err=True,
    )


@app.command("export")
@user_errors_exit
def export_command(
    model: Annotated[Path, typer.Argument(help="taming-deploy checkpoint directory (all three stages)")],
    out: Annotated[Path, typer.Option("--out", help="Bundle directory to write (replaced atomically)")],
    calibration: Annotated[str, typer.Option(help="Folder of images (+ labels/ or depth/) or synthetic:landscapes")] = "synthetic:landscapes",
    calibration_count: Annotated[int, typer.Option(help="Calibration images")] = 8,
    fp16: Annotated[bool, typer.Option("--fp16/--no-fp16", help="Also write fp16 graphs")] = True,
    decoder: Annotated[Optional[Path], typer.Option(help="Take the decoder from this VQGAN checkpoint (a decoder fine-tune of the model's first stage)")] = None,
    int8_weights: Annotated[bool, typer.Option("--int8-weights", help="Store the fp32 graphs' weights as int8 (about 4x smaller, for ONNX Runtime; validated against fp32)")] = False,
) -> None:
    """Export a checkpoint to a bundle of validated ONNX graphs (fp32 and fp16)."""
    try:
        from taming_deploy.export.exporter import export_bundle
    except ImportError as exc:
        raise UserError(f"export needs the export extra ({exc.name} is missing): pip install 'taming-deploy[export]'") from None
    manifest = export_bundle(model, out, calibration=calibration, calibration_count=calibration_count, fp16=fp16, echo=typer.echo, decoder=decoder, int8_weights=int8_weights)
    typer.echo(f"wrote {out} ({', '.join(manifest.graphs)}; validation passed)")


@app.command()
@user_errors_exit
def info(path: Annotated[Path, typer.Argument(help="A bundle or a checkpoint directory")]) -> None:
    """Print what a bundle or checkpoint holds."""
    from taming_deploy.info import describe

    for line in describe(path):
        typer.echo(line)


@app.command()
@user_errors_exit
def verify(bundle: Annotated[Path, typer.Argument(help="Exported bundle directory")]) -> None:
    """Check every file a bundle's manifest (and engines/engines.json) names against its sha256."""
    from taming_deploy.verify import bundle_problems

    problems = bundle_problems(bundle)
    for line in problems:
        typer.echo(f"error: {line}", err=True)
    if problems:
        raise typer.Exit(code=2)
    typer.echo(f"{bundle}: every file matches its manifest")


@app.command()
@user_errors_exit
def train(
    stage: Annotated[str, typer.Argument(help="vqgan, cond or transformer")],
    config: Annotated[Path, typer.Option(help="Training config (YAML)")],
    out: Annotated[Path, typer.Option(help="Run directory (checkpoints, metrics.jsonl, tensorboard/)")],
    data: Annotated[str, typer.Option(help="Folder (images/ + labels/), list file, or synthetic:landscapes")] = "synthetic:landscapes",
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint")] = False,
    steps: Annotated[Optional[int], typer.Option(help="Override train.steps")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Override train.batch_size (per process)")] = None,
    first_stage: Annotated[Optional[Path], typer.Option(help="transformer: trained VQGAN checkpoint")] = None,
    cond_stage: Annotated[Optional[Path], typer.Option(help="transformer: trained condition checkpoint")] = None,
) -> None:
    """Train one stage; run under `torchrun --nproc_per_node N` for data-parallel training."""
    if stage not in ("vqgan", "cond", "transformer"):
        raise UserError(f"stage must be vqgan, cond or transformer, got {stage!r}")
    try:
        from taming_deploy.training.train import train as run
        from taming_deploy.training.train_config import load_train_config
    except ImportError as exc:
        raise UserError(f"training needs the train extra ({exc.name} is missing): pip install 'taming-deploy[train]'") from None
    cfg = load_train_config(config, stage, {"steps": steps, "batch_size": batch_size})
    cfg.first_stage = first_stage or cfg.first_stage
    cfg.cond_stage = cond_stage or cfg.cond_stage
    final = run(cfg, data, out, resume=resume, echo=typer.echo)
    typer.echo(f"finished: {final}")


@app.command()
@user_errors_exit
def build(
    bundle: Annotated[Path, typer.Argument(help="Exported bundle directory")],
    precision: Annotated[str, typer.Option(help="fp16 (the bundle's fp16 graphs) or fp32")] = "fp16",
    max_size: Annotated[str, typer.Option(help="Largest image the engines accept, WxH pixels")] = "1024x1024",
    max_batch: Annotated[int, typer.Option(help="Largest batch (-n) the engines accept")] = 4,
    workspace_gib: Annotated[float, typer.Option(help="TensorRT workspace memory limit (GiB)")] = 4.0,
    opt_level: Annotated[int, typer.Option(help="TensorRT builder optimisation level (0-5)")] = 3,
) -> None:
    """Build TensorRT engines for this machine's GPU from a bundle (kept in BUNDLE/engines)."""
    from taming_deploy.engines import build_engines

    if precision not in ("fp16", "fp32"):
        raise UserError(f"--precision must be fp16 or fp32, got {precision!r}")
    size = parse_size(max_size)
    assert size is not None
    out = build_engines(bundle, precision=precision, max_size=size, max_batch=max_batch, workspace_gib=workspace_gib,
                        opt_level=opt_level, log=typer.echo)
    typer.echo(f"wrote {out}")


@app.command("eval")
@user_errors_exit
def eval_command(
    model: Annotated[Optional[Path], typer.Option(help="Bundle or checkpoint [default: the embedded model]")] = None,
    what: Annotated[str, typer.Option(help="all, reconstruction or labels")] = "all",
    count: Annotated[int, typer.Option(help="Held-out images for reconstruction")] = 64,
    size: Annotated[int, typer.Option(help="Reconstruction image size (pixels)")] = 256,
    label_count: Annotated[int, typer.Option(help="Label maps per size for label following")] = 8,
    sizes: Annotated[str, typer.Option(help="WxH[,WxH...] for label following")] = "256x256,512x256",
    seed: Annotated[int, typer.Option()] = 0,
    backend: Annotated[str, typer.Option(help="auto, torch, ort or trt")] = "auto",
    mode: Annotated[str, typer.Option(help="exact or fast sampling")] = "exact",
    top_k: Annotated[int, typer.Option(help="0: all")] = 100,
    threads: Annotated[Optional[int], typer.Option(help="torch threads")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write all results (.json)")] = None,
    save_images: Annotated[Optional[Path], typer.Option(help="Folder for labels/real/generated comparison PNGs")] = None,
) -> None:
    """Reconstruction PSNR/LPIPS on held-out scenes and label-following accuracy/mIoU of generated images."""
    try:
        from taming_deploy.training.evaluation.evaluate import run_eval
    except ImportError:
        raise UserError("taming-deploy eval needs PyTorch: pip install 'taming-deploy[train]'") from None
    lines = run_eval(model, what, recon_count=count, recon_size=size, label_count=label_count, sizes=sizes, seed=seed,
                     backend=backend, mode=mode, top_k=top_k or None, json_out=json_out, save_dir=save_images,
                     threads=threads, progress=lambda message: typer.echo(message, err=True))
    for line in lines:
        typer.echo(line)


def main() -> None:
    app(prog_name="taming-deploy")


if __name__ == "__main__":
    sys.exit(main())
