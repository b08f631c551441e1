"""The ``taming-deploy`` command line. Each command is a thin layer over a library function.

User mistakes (bad files, sizes, options) end in one line on stderr and exit code 2; torch, onnx and
TensorRT are imported only by the commands that need them.
"""
from __future__ import annotations

import functools
import json
import math
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer

from taming_deploy.errors import UserError
from taming_deploy.validation import DEFAULT_MAX_PIXELS, check_backend, parse_size

Force = Annotated[bool, typer.Option("--force", help="Also replace outputs taming-deploy did not write (in a directory: only the entries this command writes; other files are kept)")]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train, export and run Taming Transformers (VQGAN + GPT) models.",
)


def print_version(value: bool) -> None:
    if value:
        from taming_deploy import __version__

        typer.echo(f"taming-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def options(
    version: Annotated[bool, typer.Option("--version", callback=print_version, is_eager=True, help="Print the version and exit")] = False,
) -> None:
    pass


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


def condition_size(cond: Path | None) -> tuple[int, int] | None:
    """(width, height) of a condition image that the pipeline has already read, or None."""
    from PIL import Image

    if cond is None:
        return None
    with Image.open(cond) as image:
        return image.size


def size_notices(spec: Any, wanted: tuple[int, int] | None) -> list[str]:
    """What the user should know about the output size: rounding to the downsampling factor, and a
    latent grid smaller than the window the model was trained on (it follows the map less there)."""
    from taming_deploy.conditions import snap_size

    factor, (rows, cols) = spec.downsample_factor, spec.window
    width, height = snap_size(*wanted, factor) if wanted else (cols * factor, rows * factor)
    notices = []
    if wanted and wanted != (width, height):
        notices.append(f"size {wanted[0]}x{wanted[1]} rounded to {width}x{height}, a multiple of the model's "
                       f"downsampling factor {factor}")
    if height // factor < rows or width // factor < cols:
        notices.append(f"{width}x{height} is {width // factor}x{height // factor} latent cells, under the "
                       f"{cols}x{rows} window the model was trained on (below {cols * factor}x{rows * factor} px it "
                       "follows the condition less)")
    return notices


@app.command("import-taming")
@user_errors_exit
def import_taming_command(
    ckpt: Annotated[Path, typer.Argument(help="Original Lightning checkpoint (.ckpt)")],
    config: Annotated[Path, typer.Option("--config", help="Its project.yaml")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the taming-deploy checkpoint")],
    trust_pickle: Annotated[
        bool, typer.Option("--trust-pickle", help="Allow arbitrary unpickling (can run code from the file)")
    ] = False,
    force: Force = False,
) -> None:
    """Convert a checkpoint of the original Taming Transformers into this project's format."""
    try:
        from taming_deploy.training.import_taming import import_taming
    except ImportError:
        raise UserError("import-taming needs PyTorch: pip install 'taming-deploy[train]'") from None
    cfg = import_taming(ckpt, config, out, trust_pickle=trust_pickle, force=force)
    stages = [name for name in ("first_stage", "condition", "transformer") if getattr(cfg, name) is not None]
    typer.echo(f"wrote {out} ({', '.join(stages)})")


@app.command()
@user_errors_exit
def generate(
    cond: Annotated[Optional[Path], typer.Option(help="Condition: label PNG (class ids or palette colours), depth PNG, or RGB image (see `info`)")] = None,
    class_id: Annotated[Optional[int], typer.Option(help="Class id, for class-conditional models")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Bundle or checkpoint directory; omit it to use the embedded model (`taming-deploy info` describes it)")] = None,
    backend: Annotated[str, typer.Option(help="auto, torch, ort or trt")] = "auto",
    out: Annotated[Path, typer.Option(help="Output image, .png, .jpg or .webp (numbered when -n > 1, unless --grid)")] = Path("out.png"),
    size: Annotated[Optional[str], typer.Option(help="Output size WxH in pixels (resizes the condition)")] = None,
    n: Annotated[int, typer.Option("-n", help="Images to sample in one batch")] = 1,
    grid: Annotated[bool, typer.Option(help="With -n > 1, write one grid image")] = False,
    mode: Annotated[str, typer.Option(help="exact (the original's windows) or fast (one window per stride)")] = "exact",
    window_stride: Annotated[Optional[int], typer.Option(help="Fast mode only: tokens per window placement [default: 8]")] = None,
    greedy: Annotated[bool, typer.Option(help="Take the most likely token (deterministic)")] = False,
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely tokens (0: all)")] = 100,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling mass")] = None,
    temperature: Annotated[float, typer.Option(help="Divides the logits before sampling: below 1 more likely tokens, above 1 more varied ones")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Random seed: same seed, model and backend give the same image")] = None,
    save_tokens: Annotated[Optional[Path], typer.Option(help="Save the sampled token grid (.npy)")] = None,
    stats: Annotated[Optional[Path], typer.Option(help="Write timing and call counts (.json)")] = None,
    max_pixels: Annotated[int, typer.Option(help="Refuse batches (n x width x height) and condition images beyond this many pixels")] = DEFAULT_MAX_PIXELS,
    force: Force = False,
) -> None:
    """Generate images from a condition by sliding-window sampling."""
    from taming_deploy.fileutil import atomic_file, check_output_file
    from taming_deploy.images import grid as make_grid
    from taming_deploy.output_marks import marked_document
    from taming_deploy.images import output_format, save_image
    from taming_deploy.pipeline import Pipeline
    from taming_deploy.progress import progress_bar
    from taming_deploy.validation import DEFAULT_WINDOW_STRIDE, check_request, check_sampling_options, check_stride_mode

    check_backend(backend)
    if top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0 = off), got {top_k}")
    check_stride_mode(window_stride, mode)
    stride = DEFAULT_WINDOW_STRIDE if window_stride is None else window_stride
    check_request(n, parse_size(size), seed, mode, stride)  # before loading the model
    check_sampling_options(greedy, temperature, top_k or None, top_p)
    if cond is not None and class_id is not None:
        raise UserError("pass either --cond or --class-id, not both")
    one_file = n == 1 or grid
    paths = [out] if one_file else [out.with_name(f"{out.stem}_{k:03d}{out.suffix}") for k in range(n)]
    outputs = [path for path in [*paths, save_tokens, stats] if path is not None]
    if len({path.resolve() for path in outputs}) < len(outputs):
        raise UserError("--out, --save-tokens and --stats must name different files")
    for path in outputs:
        check_output_file(path, force)  # before minutes of sampling, not after
    fmt = output_format(out)
    notes: list[str] = []  # shown once sampling starts, so that an error in the inputs stays the only line
    pipeline = Pipeline.load(model, backend, note=notes.append)  # type: ignore[arg-type]
    condition = cond if cond is not None else class_id
    requested = parse_size(size)

    shown: list[bool] = []

    def show_notes_once() -> None:
        """The backend choice and size notices, once the inputs have been read and sampling starts."""
        if not shown:
            shown.append(True)
            for text in notes + size_notices(pipeline.spec, requested or condition_size(cond)):
                typer.echo(text, err=True)

    with progress_bar("sampling", "tok") as update:

        def on_token(done: int, total: int) -> None:
            show_notes_once()
            update(done, total)

        result = pipeline.generate(
            condition,
            n=n,
            size=requested,
            seed=seed,
            mode=mode,  # type: ignore[arg-type]
            window_stride=stride,
            greedy=greedy,
            top_k=top_k or None,
            top_p=top_p,
            temperature=temperature,
            on_token=on_token,
            max_pixels=max_pixels,
        )
    show_notes_once()
    images = [result.images[0] if n == 1 else make_grid(result.images)] if one_file else result.images
    for path, image in zip(paths, images):
        with atomic_file(path, force) as tmp:
            save_image(image, tmp, fmt)
    written = [str(path) for path in paths]
    if save_tokens is not None:
        with atomic_file(save_tokens, force) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, result.tokens[0] if n == 1 else result.tokens)
    if stats is not None:
        with atomic_file(stats, force) as tmp:
            tmp.write_text(json.dumps(marked_document(result.stats), indent=2))
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
    force: Force = False,
) -> None:
    """Export a checkpoint to a bundle of validated ONNX graphs (fp32 and fp16)."""
    try:
        from taming_deploy.export.exporter import export_bundle
    except ImportError as exc:
        raise UserError(f"export needs the export extra ({exc.name} is missing): pip install 'taming-deploy[export]'") from None
    manifest = export_bundle(model, out, calibration=calibration, calibration_count=calibration_count, fp16=fp16, echo=typer.echo, decoder=decoder, int8_weights=int8_weights, force=force)
    typer.echo(f"wrote {out} ({', '.join(manifest.graphs)}; validation passed)")


@app.command()
@user_errors_exit
def info(
    path: Annotated[Optional[Path], typer.Argument(help="A bundle or a checkpoint directory [default: the embedded model]")] = None,
    legend: Annotated[Optional[Path], typer.Option(help="Also draw the model's labels (id, name, colour swatch) into this PNG")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text")] = False,
    system: Annotated[bool, typer.Option("--system", help="Describe this machine instead: TensorRT, CUDA, GPU, ONNX Runtime")] = False,
    force: Force = False,
) -> None:
    """Print what a bundle or checkpoint holds, with the id, name and colour of every label (or, with
    --system, what this machine has)."""
    from taming_deploy.info import describe, model_condition
    from taming_deploy.model_paths import DEFAULT_MODEL

    if system:
        print_system_info(path, as_json)
        return
    if legend is not None:
        from taming_deploy.fileutil import check_output_file
        from taming_deploy.images import output_format

        output_format(legend)
        check_output_file(legend, force)
    if as_json:
        from taming_deploy.info_json import describe_json

        typer.echo(json.dumps(describe_json(path or DEFAULT_MODEL), indent=1))
    else:
        for line in describe(path):
            typer.echo(line)
    if legend is not None:
        write_legend(model_condition(path), legend, force)
        typer.echo(f"wrote {legend}", err=as_json)


def write_legend(cond: Any, out: Path, force: bool) -> None:
    """``info --legend``: the label swatches of ``cond`` (a ConditionSpec) as an image."""
    from taming_deploy.fileutil import atomic_file
    from taming_deploy.images import output_format, save_image
    from taming_deploy.labels import legend_image

    image = legend_image(cond)
    with atomic_file(out, force) as tmp:
        save_image(image, tmp, output_format(out))


def print_system_info(path: Optional[Path], as_json: bool) -> None:
    from taming_deploy.system_info import system_json, system_lines

    if path is not None:
        raise UserError("info --system describes this machine and takes no PATH")
    typer.echo(json.dumps(system_json(), indent=1) if as_json else "\n".join(system_lines()))


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
    force: Annotated[bool, typer.Option("--force", help="Start a new run in a directory that holds files: the entries a run writes are replaced, other files kept")] = False,
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
    final = run(cfg, data, out, resume=resume, echo=typer.echo, force=force)
    typer.echo(f"finished: {final}")


@app.command()
@user_errors_exit
def build(
    bundle: Annotated[Optional[Path], typer.Argument(help="Exported bundle directory [default: the embedded model]")] = None,
    precision: Annotated[Optional[str], typer.Option(help="fp16 (the bundle's fp16 graphs) or fp32 [default: fp16 if the bundle has fp16 graphs, else fp32]")] = None,
    max_size: Annotated[str, typer.Option(help="Largest image the engines accept, WxH pixels")] = "1024x1024",
    max_batch: Annotated[int, typer.Option(help="Largest batch (-n) the engines accept")] = 4,
    workspace_gib: Annotated[float, typer.Option(help="TensorRT workspace memory limit (GiB)")] = 4.0,
    opt_level: Annotated[int, typer.Option(help="TensorRT builder optimisation level (0-5)")] = 3,
    force: Force = False,
) -> None:
    """Build TensorRT engines for this machine's GPU from a bundle (kept in BUNDLE/engines; for the
    embedded model in the user's cache, $XDG_CACHE_HOME/taming-deploy/engines)."""
    from taming_deploy.engines import build_engines
    from taming_deploy.model_paths import DEFAULT_MODEL

    if precision not in (None, "fp16", "fp32"):
        raise UserError(f"--precision must be fp16 or fp32, got {precision!r}")
    size = parse_size(max_size, "--max-size")
    assert size is not None
    out = build_engines(bundle or DEFAULT_MODEL, precision=precision, max_size=size, max_batch=max_batch, workspace_gib=workspace_gib,
                        opt_level=opt_level, log=typer.echo, force=force)
    typer.echo(f"wrote {out}")


@app.command("eval")
@user_errors_exit
def eval_command(
    model: Annotated[Optional[Path], typer.Option(help="Bundle or checkpoint [default: the embedded model]")] = None,
    what: Annotated[str, typer.Option(help="all, reconstruction or labels")] = "all",
    quick: Annotated[bool, typer.Option("--quick", help="A few minutes on 2 cores: 16 reconstruction images, 2 label maps at 256x256 (options given explicitly still apply)")] = False,
    count: Annotated[Optional[int], typer.Option(help="Held-out images for reconstruction [default: 64; --quick: 16]")] = None,
    size: Annotated[int, typer.Option(help="Reconstruction image size (pixels)")] = 256,
    label_count: Annotated[Optional[int], typer.Option(help="Label maps per size for label following [default: 8; --quick: 2]")] = None,
    sizes: Annotated[Optional[str], typer.Option(help="WxH[,WxH...] for label following [default: 256x256,512x256; --quick: 256x256]")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed of the first label map (map k uses seed + k)")] = 0,
    backend: Annotated[str, typer.Option(help="auto, torch, ort or trt")] = "auto",
    mode: Annotated[str, typer.Option(help="exact or fast sampling")] = "exact",
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely tokens (0: all)")] = 100,
    threads: Annotated[Optional[int], typer.Option(help="torch threads")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results (.json), replaced after each part")] = None,
    save_images: Annotated[Optional[Path], typer.Option(help="Folder for labels/real/generated comparison PNGs")] = None,
    force: Force = False,
) -> None:
    """Reconstruction PSNR/LPIPS on held-out scenes and label-following accuracy/mIoU of generated images.

    Needs PyTorch (pip install 'taming-deploy[train]' and the LPIPS weights): LPIPS and the segmenter
    that judges label following are torch networks. Each part's numbers print as soon as it is done.
    """
    check_backend(backend)
    if top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0 = off), got {top_k}")
    try:
        from taming_deploy.training.evaluation.evaluate import FULL, QUICK, run_eval
    except ImportError:
        raise UserError("taming-deploy eval needs PyTorch (LPIPS and the segmenter are torch networks): "
                        "pip install 'taming-deploy[train]'") from None
    from taming_deploy.progress import progress_bar

    preset = QUICK if quick else FULL
    run_eval(model, what, recon_count=count if count is not None else preset["recon_count"], recon_size=size,
             label_count=label_count if label_count is not None else preset["label_count"],
             sizes=sizes if sizes is not None else preset["sizes"], seed=seed, backend=backend, mode=mode,
             top_k=top_k or None, json_out=json_out, save_dir=save_images, threads=threads,
             bar=progress_bar, echo=typer.echo, force=force)


@app.command()
@user_errors_exit
def serve(
    model: Annotated[Optional[Path], typer.Argument(help="Bundle or checkpoint directory [default: the embedded model]")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    replicas: Annotated[int, typer.Option(help="Pipeline replicas (Ray actors), spread over the cluster's nodes")] = 1,
    address: Annotated[Optional[str], typer.Option(help="Join this Ray cluster (e.g. ray://head:10001 or head:6379) instead of starting a one-node Ray here")] = None,
    backend: Annotated[str, typer.Option(help="auto, torch, ort or trt, in every replica")] = "auto",
    max_batch: Annotated[int, typer.Option(help="Requests a replica samples together (1: no batching)")] = 8,
    batch_wait_ms: Annotated[float, typer.Option(help="How long a replica waits for more requests before sampling a batch")] = 20.0,
    max_pixels: Annotated[int, typer.Option(help="Largest request: output pixels, all n images together")] = 1024 * 1024,
    max_n: Annotated[int, typer.Option(help="Largest n per request")] = 8,
    timeout_s: Annotated[float, typer.Option(help="Request timeout (seconds)")] = 600.0,
    cpus_per_replica: Annotated[float, typer.Option(help="CPUs Ray reserves for each replica")] = 1.0,
) -> None:
    """Serve generation over HTTP on Ray Serve (POST /generate, GET /health, GET /info)."""
    try:
        from taming_deploy.serving import ServiceConfig, check_listen_address, serve_forever
    except ImportError as exc:
        raise UserError(f"serve needs Ray Serve ({exc.name} is missing): pip install 'taming-deploy[serve]'") from None
    from taming_deploy.http_request import ServiceLimits
    from taming_deploy.pipeline import Pipeline

    check_backend(backend)
    for name, value in (("--replicas", replicas), ("--max-batch", max_batch), ("--max-pixels", max_pixels), ("--max-n", max_n)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    if not 1 <= port <= 65535:
        raise UserError(f"--port must be between 1 and 65535, got {port}")
    if not (0 <= batch_wait_ms < math.inf and 0 < timeout_s < math.inf and 0 <= cpus_per_replica < math.inf):
        raise UserError("--batch-wait-ms and --cpus-per-replica must be finite numbers >= 0 and --timeout-s one > 0")
    check_listen_address(host, port, address)
    Pipeline.load(model, backend)  # type: ignore[arg-type]  # a bad model fails here, in one line, before Ray starts
    config = ServiceConfig(model=None if model is None else str(model.resolve()), backend=backend,
                           limits=ServiceLimits(max_pixels=max_pixels, max_n=max_n, timeout_s=timeout_s), max_batch=max_batch,
                           batch_wait_s=batch_wait_ms / 1000)
    serve_forever(config, host, port, replicas, address, cpus_per_replica, echo=lambda line: typer.echo(line, err=True))


def exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (a service manager, a job scheduler, ``kill``) ends the command as Ctrl-C does: through
    its cleanup, so an output being written is left as it was and its temporary directory removed.
    Python's default for SIGTERM ends the process on the spot."""
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, exit_on_sigterm)  # `serve` installs its own after Ray starts
    app(prog_name="taming-deploy")


if __name__ == "__main__":
    sys.exit(main())
