"""Shared pieces of the CPU benchmarks: the models they run, argument parsing, tables, FLOP counts.

Models (``prepare_model``):
- ``default`` (no --checkpoint/--bundle): a model of the embedded default's size with random weights
  (training/configs/default_*.yaml: 8-label segmentation VQ, f=8 VQGAN, GPT 6 layers x 8 heads x 256,
  vocab 512, block 512), written once as a checkpoint and an fp32 bundle under the cache directory;
- ``fixture``: tests/data/segcond_small (the original implementation's checkpoint, random weights)
  imported with training.import_taming and exported the same way;
- ``--checkpoint DIR`` (exported into the cache on first use) or ``--bundle DIR`` (ORT only, plus the
  torch modes when a checkpoint is given too).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import yaml

from taming_deploy.spec import ModelSpec

REPO = Path(__file__).resolve().parent.parent
FIXTURE_DIR = REPO / "tests" / "data" / "segcond_small"
CONFIG_DIR = REPO / "training" / "configs"
DEFAULT_CACHE = Path(__file__).resolve().parent / ".cache"
DEFAULT_WINDOW = (16, 16)


@dataclass(frozen=True)
class ModelPaths:
    name: str
    checkpoint: Path | None  # needed by the torch backend and the original loop
    bundle: Path | None  # needed by the ORT backend


def default_size_config():
    """The embedded default model's config (training/configs/default_*.yaml), stages as trained."""
    from taming_deploy.spec import ConditionSpec
    from taming_deploy.training.config import ModelConfig
    from taming_deploy.training.models.gpt import GPTConfig
    from taming_deploy.training.models.vqgan import AutoencoderConfig

    def model_section(name: str) -> dict:
        return yaml.safe_load((CONFIG_DIR / f"default_{name}.yaml").read_text())["model"]

    first = AutoencoderConfig.from_dict(model_section("vqgan"))
    cond_ae = AutoencoderConfig.from_dict(model_section("cond"))
    condition = ConditionSpec(kind="segmentation", n_labels=cond_ae.in_channels, codebook_size=cond_ae.n_embed)
    return ModelConfig(first_stage=first, condition=condition, condition_autoencoder=cond_ae,
                       transformer=GPTConfig(**model_section("transformer")), window=DEFAULT_WINDOW)


def make_default_checkpoint(out: Path, seed: int = 0) -> None:
    import torch

    from taming_deploy.training.checkpoint import save_checkpoint
    from taming_deploy.training.models.net2net import TamingModel

    torch.manual_seed(seed)
    config = default_size_config()
    save_checkpoint(out, config, TamingModel(config).state_dict())


def import_fixture(out: Path) -> None:
    from taming_deploy.training.import_taming import import_taming

    import_taming(FIXTURE_DIR / "last.ckpt", FIXTURE_DIR / "project.yaml", out)


def export_fp32(checkpoint: Path, out: Path) -> None:
    from taming_deploy.export.exporter import export_bundle

    export_bundle(checkpoint, out, fp16=False, echo=lambda line: None)


EXPORT_SOURCES = ("export", "training/models", "taming_deploy/bundle.py")  # what decides an exported bundle


def export_code_key() -> str:
    """A hash of the exporter's, the models' and the bundle format's source: a bundle exported by other
    code is stale (the transformer graph's inputs and the bundle format version changed once already)."""
    digest = hashlib.sha256()
    for source in EXPORT_SOURCES:
        root = REPO / source
        for path in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def checkpoint_key(checkpoint: Path) -> str:
    """Names what is derived from a checkpoint in the cache: its path, its weights' mtime and the export code."""
    weights = checkpoint / "model.safetensors"
    text = f"{checkpoint.resolve()}:{weights.stat().st_mtime_ns}:{export_code_key()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_bundle(checkpoint: Path, cache: Path) -> Path:
    """The fp32 bundle of a checkpoint, exported once into the cache."""
    bundle = cache / f"bundle-{checkpoint_key(checkpoint)}"
    if not loadable(bundle):
        note(f"exporting {checkpoint} to {bundle} (once) ...")
        shutil.rmtree(bundle, ignore_errors=True)
        export_fp32(checkpoint, bundle)
    return bundle


def loadable(bundle: Path) -> bool:
    """The runtime reads this bundle (exists, a format version it accepts)."""
    from taming_deploy.bundle import Bundle
    from taming_deploy.errors import UserError

    if not (bundle / "manifest.json").is_file():
        return False
    try:
        Bundle(bundle)
    except UserError:
        return False
    return True


def prepare_model(kind: str, checkpoint: Path | None, bundle: Path | None, cache: Path) -> ModelPaths:
    """``kind`` is "default" or "fixture"; an explicit checkpoint/bundle overrides it."""
    cache.mkdir(parents=True, exist_ok=True)
    if checkpoint is not None or bundle is not None:
        name = str(checkpoint or bundle)
        if bundle is None:
            bundle = cached_bundle(checkpoint, cache)
        return ModelPaths(name, checkpoint, bundle)
    made = cache / f"{kind}-checkpoint"
    if not (made / "model.safetensors").is_file():
        note(f"building the {kind} checkpoint in {made} (once) ...")
        (make_default_checkpoint if kind == "default" else import_fixture)(made)
    label = "default-size model, random weights" if kind == "default" else "shared fixture segcond_small"
    return ModelPaths(label, made, cached_bundle(made, cache))


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=("default", "fixture"), default="default",
                        help="built-in model when no --checkpoint/--bundle is given (default: %(default)s)")
    parser.add_argument("--checkpoint", type=Path, help="a taming-deploy checkpoint directory")
    parser.add_argument("--bundle", type=Path, help="an exported bundle directory (ORT)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where built models/bundles are kept")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads for torch and ORT (default: all cores)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall: elapsed time (default); cpu: this process's CPU time, steadier on a loaded "
                             "machine with --threads 1 (with more threads it adds up the threads' time)")


def apply_common_arguments(args: argparse.Namespace) -> int:
    """Set the thread count and the clock; returns the thread count."""
    Clock.use(args.clock)
    return set_threads(args.threads)


def parse_latent(text: str) -> tuple[int, int]:
    """'24x32' -> (24, 32): latent rows x columns."""
    rows, cols = (int(v) for v in text.lower().split("x"))
    return rows, cols


def random_condition_tokens(spec: ModelSpec, latent_hw: tuple[int, int], rng: np.random.Generator, batch: int = 1) -> np.ndarray:
    """Condition tokens for timing (the cost does not depend on their values): a random token grid for
    spatial conditions, else the class/SOS token."""
    cond = spec.condition
    if cond.spatial:
        return rng.integers(0, cond.codebook_size or spec.vocab_size, (batch, *latent_hw))
    return np.full((batch, 1), cond.sos_token if cond.kind == "unconditional" else 0, dtype=np.int64)


def set_threads(threads: int | None) -> int:
    import torch

    count = threads or os.cpu_count() or 1
    torch.set_num_threads(count)
    return count


def note(text: str) -> None:
    print(text, flush=True)


T = TypeVar("T")

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


class Clock:
    """The clock every benchmark reads (``now()``): wall time unless --clock cpu."""

    name = "wall"
    now: Callable[[], float] = staticmethod(time.perf_counter)

    @classmethod
    def use(cls, name: str) -> None:
        cls.name, cls.now = name, staticmethod(CLOCKS[name])


def now() -> float:
    return Clock.now()


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    started = now()
    result = fn()
    return result, now() - started


def fastest(run: Callable[[], T], repeat: int) -> tuple[T, float]:
    """The result and the time of the fastest of ``repeat`` runs."""
    runs = [timed(run) for _ in range(max(1, repeat))]
    return min(runs, key=lambda r: r[1])


def best_seconds(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    return fastest(fn, repeat)[1]


def print_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> None:
    table = [list(header)] + [list(r) for r in rows]
    widths = [max(len(r[k]) for r in table) for k in range(len(header))]
    for k, row in enumerate(table):
        print("  ".join(cell.rjust(width) if k and cell[:1].isdigit() else cell.ljust(width)
                        for cell, width in zip(row, widths)).rstrip())
        if k == 0:
            print("  ".join("-" * width for width in widths))


# --- transformer FLOPs, counted from the call pattern ------------------------------------------------

def linear_flops_per_token(spec: ModelSpec) -> int:
    """Per fed token: per layer Q, K, V and the output projection (4 d^2 MACs) and the MLP (8 d^2)."""
    d = spec.n_embd
    return 2 * spec.n_layer * 12 * d * d


def call_flops(spec: ModelSpec, fed: int, keys: int, head_rows: int) -> int:
    """One transformer call: ``fed`` tokens through the linear layers, attention of every fed query over
    ``keys`` key/value slots (q.k^T and att.v: 2 * keys * d MACs per query per layer), and the head
    (d x vocab) for ``head_rows`` positions. Layer norms, softmax, GELU and embeddings are O(d) per
    token and left out."""
    d = spec.n_embd
    return fed * linear_flops_per_token(spec) + attention_flops(spec, fed * keys) + 2 * head_rows * d * spec.vocab_size


def attention_flops(spec: ModelSpec, pairs: int) -> int:
    """q.k^T and att.v over ``pairs`` (query, key) pairs in every layer."""
    return 2 * spec.n_layer * 2 * pairs * spec.n_embd


def cached_call_flops(spec: ModelSpec, fed: int) -> int:
    """A call of the runtime's transformer (exported graph and torch backend alike): the fed queries
    attend over the S = block size past slots (masked from ``position`` on) and, causally, over the
    fed tokens themselves: K = S + T keys; the head on the last position only."""
    return call_flops(spec, fed, spec.block_size + fed, 1)


def visible_pairs(fed: int, position: int) -> int:
    """(query, key) pairs a call really needs: query k (0-based) of the fed tokens sees the ``position``
    earlier tokens and fed tokens 0..k."""
    return fed * position + fed * (fed + 1) // 2


def cached_call_masked_flops(spec: ModelSpec, fed: int, position: int) -> int:
    """The part of cached_call_flops spent on masked (query, key) pairs: past slots from ``position``
    on (all of them in a prefill) and the fed tokens' future."""
    return attention_flops(spec, fed * (spec.block_size + fed) - visible_pairs(fed, position))


def full_recompute_flops(spec: ModelSpec, sequence: int) -> int:
    """The original loop: a plain causal pass over ``sequence`` tokens (the T x T score matrix is
    computed in full, then masked) and the head for every position."""
    return call_flops(spec, sequence, sequence, sequence)


def full_recompute_masked_flops(spec: ModelSpec, sequence: int) -> int:
    return attention_flops(spec, sequence * sequence - visible_pairs(sequence, 0))
