"""A model of the released S-FLCKR size, end to end through the CLI: import, export, generate on ONNX Runtime.

    python benchmarks/released_size.py [--workdir DIR] [--keep] [--seed 0] [--tiny | --imagenet]

The tests and the other benchmarks run small models; this one measures what a user of the released
checkpoints meets: wall time, peak memory and disk sizes. It writes a checkpoint in the original
implementation's layout (tests/original_checkpoints.py: Lightning-style last.ckpt + project.yaml)
with random weights and the released S-FLCKR shapes: GPT 24 layers x 16 heads x 1024, block 512,
vocab 1024 (about 305 M parameters); first stage a VQModel f16 (ch 128, ch_mult [1,1,2,2,4], 2 res
blocks, attention at 16, z_channels = embed_dim = 256, 1024 codes); condition stage a VQModel over 182
labels (same f16 shape, 1024 codes) on the "segmentation" key, as the released project.yaml has it.
``--imagenet``: the released class-conditional ImageNet shape instead: GPT 48 layers x 24 heads x 1536,
block 256, vocab 16384 (about 1.4 B parameters, a 5.3 GiB fp32 transformer graph, so its weights go to
ONNX external data), first stage the same f16 VQModel with 16384 codes, condition a Labelator over 1000
classes; it samples class 1 instead of a label map.
Then, each as its own subprocess of the installed CLI:

1. ``taming-deploy import-taming``;
2. ``taming-deploy export`` with the default settings (fp32 + fp16 graphs). If that export fails
   (refused, e.g. by the fp16 gate on random weights, or killed: a SIGKILL is the OOM killer's), its
   status and last line are printed and the export is run again with ``--no-fp16``, and that row
   says so;
3. ``taming-deploy generate --backend ort --seed 0`` at 256x256 ``--mode exact`` and at 512x256
   (width x height) ``--mode fast``, on a label map of random rectangles of the 182 label ids.

Peak RSS is ``ru_maxrss`` of ``os.wait4`` on that one child (the CLI starts no processes of its own),
so every row is its own process's high-water mark, not the maximum over all children so far. The
checkpoint-writing step runs in a subprocess too (this script with ``--write-original``), so this
process stays small. Every file goes under ``--workdir`` (default: a new temporary directory),
removed at the end unless ``--keep``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

RELEASED_DDCONFIG = {"double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3,
                     "ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16],
                     "dropout": 0.0}
N_LABELS = 182
GPT_SHAPE = {"vocab_size": 1024, "block_size": 512, "n_layer": 24, "n_head": 16, "n_embd": 1024}


TINY_DDCONFIG = {**RELEASED_DDCONFIG, "z_channels": 8, "ch": 32, "num_res_blocks": 1}  # --tiny: same kinds, small
TINY_GPT = {**GPT_SHAPE, "n_layer": 1, "n_head": 2, "n_embd": 32}
IMAGENET_GPT = {"vocab_size": 16384, "block_size": 256, "n_layer": 48, "n_head": 24, "n_embd": 1536}
N_CLASSES = 1000


def sflckr_project(tiny: bool = False) -> dict:
    """project.yaml of the released S-FLCKR shape (tests/original_checkpoints.py conventions)."""
    sys.path.insert(0, str(REPO))
    from tests.original_checkpoints import VQMODEL, gpt, net2net_project, vq_stage

    dd, transformer, dim = (TINY_DDCONFIG, TINY_GPT, 8) if tiny else (RELEASED_DDCONFIG, GPT_SHAPE, 256)
    first = vq_stage(VQMODEL, n_embed=1024, embed_dim=dim, **dd)
    cond = vq_stage(VQMODEL, n_embed=1024, embed_dim=dim, **{**dd, "in_channels": N_LABELS, "out_ch": N_LABELS})
    cond["params"].update({"image_key": "segmentation", "n_labels": N_LABELS})  # as the released config
    return net2net_project(first, cond, "segmentation", gpt(**transformer))


def imagenet_project() -> dict:
    """project.yaml of the released class-conditional ImageNet shape (cin_transformer)."""
    sys.path.insert(0, str(REPO))
    from tests.original_checkpoints import LABELATOR, VQMODEL, gpt, net2net_project, vq_stage

    first = vq_stage(VQMODEL, n_embed=16384, embed_dim=256, **RELEASED_DDCONFIG)
    return net2net_project(first, {"target": LABELATOR, "params": {"n_classes": N_CLASSES}}, "class_label", gpt(**IMAGENET_GPT))


def write_original_checkpoint(folder: Path, seed: int, kind: str) -> None:
    sys.path.insert(0, str(REPO))
    from tests.original_checkpoints import write_original

    write_original(folder, imagenet_project() if kind == "imagenet" else sflckr_project(kind == "tiny"), seed=seed)


def write_label_map(path: Path, width: int, height: int, seed: int, rectangles: int = 12) -> None:
    """Random rectangles of label ids 0..181 over a random background, as an 8-bit class-id PNG."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    labels = np.full((height, width), rng.integers(0, N_LABELS), dtype=np.uint8)
    for _ in range(rectangles):
        x0, y0 = rng.integers(0, width - 16), rng.integers(0, height - 16)
        x1, y1 = x0 + rng.integers(16, width // 2), y0 + rng.integers(16, height // 2)
        labels[y0:y1, x0:x1] = rng.integers(0, N_LABELS)
    Image.fromarray(labels, mode="L").save(path)


@dataclass
class Step:
    name: str
    command: list[str]
    rc: int = 0
    seconds: float = 0.0
    peak_rss: int = 0  # bytes
    log: Path | None = None
    note: str = ""


def run_step(step: Step, workdir: Path) -> Step:
    """Runs the command with its output in a log file; wall time and the child's own ru_maxrss (wait4)."""
    step.log = workdir / f"{step.name.replace(' ', '_').replace('/', '_')}.log"
    print(f"$ {shlex.join(step.command)}", flush=True)
    with open(step.log, "wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(step.command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        _, status, usage = os.wait4(process.pid, 0)
        step.seconds = time.perf_counter() - started
    process.returncode = step.rc = os.waitstatus_to_exitcode(status)
    step.peak_rss = usage.ru_maxrss * 1024  # Linux: KiB
    tail = step.log.read_text(errors="replace").rstrip().splitlines()[-3:]
    for line in tail:
        print(f"    {line}", flush=True)
    print(f"    -> rc {step.rc}, {step.seconds:.1f} s, peak RSS {step.peak_rss / 2**30:.2f} GiB", flush=True)
    return step


def last_line(step: Step) -> str:
    lines = [line for line in step.log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def failure(step: Step) -> str:
    """A failed step's note: its exit status or the signal that ended it, and its last output line."""
    if step.rc < 0:
        name = signal.Signals(-step.rc).name
        why = " (the kernel's OOM killer sends it when memory runs out; see dmesg)" if name == "SIGKILL" else ""
        return f"killed by {name}{why}; last line: `{last_line(step)}`"
    return f"refused (rc {step.rc}): `{last_line(step)}`"


def disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def cli() -> list[str]:
    found = shutil.which("taming-deploy") or str(Path(sys.executable).parent / "taming-deploy")
    return [found]


def print_markdown(rows: list[list[str]], header: list[str]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where every file goes (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (checkpoints, bundle, images, logs)")
    parser.add_argument("--seed", type=int, default=0, help="weights, label map and sampling seed (default: %(default)s)")
    shapes = parser.add_mutually_exclusive_group()
    shapes.add_argument("--tiny", action="store_true", help="a tiny model of the same kinds and codebooks (checks this script in a minute)")
    shapes.add_argument("--imagenet", action="store_true", help="the class-conditional ImageNet shape (1.4 B GPT) instead of S-FLCKR")
    parser.add_argument("--write-original", type=Path, default=None, help=argparse.SUPPRESS)  # the checkpoint step's subprocess
    args = parser.parse_args()
    kind = "tiny" if args.tiny else "imagenet" if args.imagenet else "sflckr"
    if args.write_original is not None:
        write_original_checkpoint(args.write_original, args.seed, kind)
        return 0

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="released_size-"))
    workdir.mkdir(parents=True, exist_ok=True)
    workdir = workdir.resolve()
    original, checkpoint, bundle = workdir / "original", workdir / "checkpoint", workdir / "bundle"
    print(f"work directory: {workdir}; {os.cpu_count()} cores (ONNX Runtime and torch use all of them); "
          f"load average at start {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    steps: list[Step] = []
    failed = False
    try:
        steps.append(run_step(Step("write original checkpoint (random weights)",
                                   [sys.executable, str(Path(__file__).resolve()), "--write-original", str(original),
                                    "--seed", str(args.seed), *([f"--{kind}"] if kind != "sflckr" else [])]), workdir))
        failed = steps[-1].rc != 0
        if not failed:
            steps.append(run_step(Step("import-taming", [*cli(), "import-taming", str(original / "last.ckpt"), "--config",
                                                         str(original / "project.yaml"), "--out", str(checkpoint)]), workdir))
            failed = steps[-1].rc != 0
        if not failed:
            info = subprocess.run([*cli(), "info", "--json", str(checkpoint)], capture_output=True, text=True, check=True)
            parameters = json.loads(info.stdout)["parameters"]
            print("parameters: " + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in parameters.items())
                  + f"; total {sum(parameters.values()) / 1e6:.1f} M", flush=True)
            export = run_step(Step("export (default: fp32 + fp16)", [*cli(), "export", str(checkpoint), "--out", str(bundle)]), workdir)
            steps.append(export)
            if export.rc != 0:
                export.note = failure(export)
                steps.append(run_step(Step("export --no-fp16 (after the default failed)",
                                           [*cli(), "export", str(checkpoint), "--out", str(bundle), "--no-fp16"]), workdir))
            failed = steps[-1].rc != 0
        if not failed:
            for width, height, mode in ((256, 256, "exact"), (512, 256, "fast")):
                if kind == "imagenet":
                    condition = ["--class-id", "1", "--size", f"{width}x{height}"]
                else:
                    labels = workdir / f"labels_{width}x{height}.png"
                    write_label_map(labels, width, height, args.seed)
                    condition = ["--cond", str(labels)]
                stats = workdir / f"stats_{width}x{height}_{mode}.json"
                step = run_step(Step(f"generate {width}x{height} --mode {mode} (ort)",
                                     [*cli(), "generate", "--model", str(bundle), "--backend", "ort", *condition,
                                      "--mode", mode, "--seed", str(args.seed), "--out", str(workdir / f"out_{width}x{height}_{mode}.png"),
                                      "--stats", str(stats)]), workdir)
                steps.append(step)
                if step.rc == 0 and stats.is_file():
                    s = json.loads(stats.read_text())
                    step.note = (f"{s['tokens']} tokens in {s['sample_seconds']:.1f} s ({s['prefills']} prefills, "
                                 f"{s['steps']} steps), decode {s['decode_seconds']:.1f} s")
        for step in steps:
            if step.rc != 0 and not step.note:
                step.note = failure(step)

        print(f"\nload average at end {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
        print_markdown([[s.name, f"{s.seconds:.1f}", gib(s.peak_rss), s.note] for s in steps],
                       ["step", "wall s", "peak RSS GiB", "note"])
        print()
        sizes = [("original last.ckpt", original / "last.ckpt"), ("imported checkpoint", checkpoint), ("bundle", bundle)]
        print_markdown([[name, gib(disk_bytes(path))] for name, path in sizes if path.exists()], ["on disk", "GiB"])
        if bundle.is_dir():
            print()
            files = sorted((p for p in bundle.rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size)
            print_markdown([[p.relative_to(bundle).as_posix(), f"{p.stat().st_size / 2**20:.1f}"] for p in files],
                           ["bundle file", "MiB"])
        failed = failed or any(s.rc != 0 for s in steps if not s.name.startswith("export (default"))
    finally:
        if args.keep:
            print(f"\nkept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
