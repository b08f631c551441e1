"""Training configs (YAML): which stage, its model sizes, its loss and the loop's settings.

    stage: vqgan | cond | transformer
    model: {...}        AutoencoderConfig fields (vqgan, cond) or GPTConfig fields (transformer)
    loss: {...}         VQLossConfig fields (vqgan) or {codebook_weight} (cond)
    first_stage: DIR    transformer only: trained VQGAN checkpoint
    cond_stage: DIR     transformer only: trained condition checkpoint
    finetune_decoder: DIR  vqgan only, instead of model: train this VQGAN's decoder alone (its encoder
                        and codebook stay frozen, so its token maps, and a GPT trained on them, stay valid)
    train: {...}        LoopConfig fields
Checkpoint paths are relative to the working directory; the CLI can override them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path


from taming_deploy.documents import Doc, read_yaml
from taming_deploy.errors import UserError

STAGES = ("vqgan", "cond", "transformer")
TOP_LEVEL_KEYS = {
    "vqgan": {"stage", "model", "loss", "train", "finetune_decoder"},
    "cond": {"stage", "model", "loss", "train"},
    "transformer": {"stage", "model", "train", "first_stage", "cond_stage", "pkeep", "window"},
}


@dataclass
class LoopConfig:
    steps: int = 10_000
    batch_size: int = 8  # per process, per micro-step
    grad_accum: int = 1
    lr: float = 4.5e-6
    image_size: int = 128  # training crop, pixels
    checkpoint_every: int = 500
    log_every: int = 10
    image_every: int = 1000
    seed: int = 0
    workers: int = 1  # data-loading processes
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    weight_decay: float = 0.01  # transformer: on Linear weights only
    warmup_steps: int = 0
    codebook_restart_every: int = 0  # vqgan/cond: move unused codes onto encoder outputs every N steps (0: off)
    token_cache_images: int = 2000  # transformer: images encoded once into token maps
    token_cache_size: int = 256  # transformer: pixel size of those images


@dataclass
class TrainConfig:
    stage: str
    model: dict
    loss: dict = field(default_factory=dict)
    train: LoopConfig = field(default_factory=LoopConfig)
    first_stage: Path | None = None
    cond_stage: Path | None = None
    finetune_decoder: Path | None = None
    pkeep: float = 1.0
    window: tuple[int, int] = (16, 16)


def known(cls, values: dict, where: str) -> dict:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"{where}: unknown settings {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    return values


def check_loop(doc: Doc) -> None:
    """Types and ranges of the loop settings (after --steps/--batch-size overrides), before any output."""
    for key in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every", "image_every", "workers",
                "image_size", "token_cache_images", "token_cache_size"):
        doc.int(key, 1 if key != "workers" else 0, 1 << 40)
    for key in ("seed", "warmup_steps", "codebook_restart_every"):
        doc.int(key, 0, 1 << 63)
    doc.float("lr", 0.0, 1.0)
    doc.float("weight_decay", 0.0, 1.0)
    doc.str("precision")


def load_train_config(path: Path, stage: str, overrides: dict | None = None) -> TrainConfig:
    path = Path(path)
    doc = read_yaml(path, "training config").data
    if doc.get("stage", stage) != stage:
        raise UserError(f"{path} is a config for stage {doc.get('stage')!r}, not {stage!r}")
    if unknown := sorted(set(doc) - TOP_LEVEL_KEYS[stage]):
        raise UserError(f"{path}: {', '.join(unknown)} not used by a {stage} config (it reads {', '.join(sorted(TOP_LEVEL_KEYS[stage]))})")
    decoder_finetune = stage == "vqgan" and bool(doc.get("finetune_decoder"))
    if decoder_finetune and "model" in doc:
        raise UserError(f"{path}: a decoder fine-tune takes its model from finetune_decoder; remove the model section")
    if "model" not in doc and not decoder_finetune:
        raise UserError(f"{path}: no model section")
    loop = {**doc.get("train", {}), **{k: v for k, v in (overrides or {}).items() if v is not None}}
    config = TrainConfig(
        stage=stage,
        model=doc.get("model", {}),
        loss=doc.get("loss", {}),
        train=LoopConfig(**known(LoopConfig, loop, f"{path}: train")),
        first_stage=Path(doc["first_stage"]) if doc.get("first_stage") else None,
        cond_stage=Path(doc["cond_stage"]) if doc.get("cond_stage") else None,
        finetune_decoder=Path(doc["finetune_decoder"]) if doc.get("finetune_decoder") else None,
        pkeep=float(doc.get("pkeep", 1.0)),
        window=tuple(doc.get("window", (16, 16))),
    )
    check_loop(Doc(config.train.__dict__, str(path), "train"))
    if stage == "transformer" and (config.first_stage is None or config.cond_stage is None):
        raise UserError(f"{path}: a transformer config names its trained first_stage and cond_stage checkpoints")
    return config
