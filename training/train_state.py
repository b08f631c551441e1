"""A resumable training checkpoint, without pickle.

A directory (written atomically) holding the project checkpoint (config.json + model.safetensors,
directly usable by `export`), plus ``optimizers.safetensors`` (every optimizer state tensor) and
``trainer.json`` (step, optimizer hyper-parameters and scalars, RNG states).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from taming_deploy.documents import first_line, read_json, read_safetensors_header
from taming_deploy.errors import UserError
from taming_deploy.fileutil import atomic_directory
from taming_deploy.training.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from taming_deploy.training.config import ModelConfig

OPTIMIZERS_FILE = "optimizers.safetensors"
TRAINER_FILE = "trainer.json"


def flatten_optimizer(name: str, state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() -> (tensors keyed '{name}.{param}.{key}', JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for param_id, param_state in state["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}.{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(name: str, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    prefix = f"{name}."
    for key, value in tensors.items():
        if key.startswith(prefix):
            param_id, field = key[len(prefix) :].split(".", 1)
            state.setdefault(int(param_id), {})[field] = value
    for param_id, values in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_train_state(
    path: Path,
    config: ModelConfig,
    model_state: dict[str, torch.Tensor],
    optimizers: dict[str, torch.optim.Optimizer],
    step: int,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """``extra_tensors``: training-only weights (e.g. the discriminator), kept beside the optimizers."""
    tensors: dict[str, torch.Tensor] = {f"extra.{k}": v.detach().cpu().contiguous() for k, v in (extra_tensors or {}).items()}
    meta: dict[str, dict] = {}
    for name, optimizer in optimizers.items():
        flat, meta[name] = flatten_optimizer(name, optimizer.state_dict())
        tensors.update(flat)
    tensors["rng.torch"] = torch.get_rng_state()
    trainer = {"step": step, "optimizers": meta}
    with atomic_directory(Path(path)) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps({**config.to_dict(), "step": step}, indent=2))
        save_file(tensors, str(tmp / OPTIMIZERS_FILE))
        (tmp / TRAINER_FILE).write_text(json.dumps(trainer, indent=2))


def load_train_state(path: Path, optimizers: dict[str, torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """Restore optimizers and torch's RNG; return (model weights, extra tensors, step)."""
    path = Path(path)
    if not (path / TRAINER_FILE).is_file():
        raise UserError(f"{path}: no training state to resume from ({TRAINER_FILE} missing)")
    trainer = read_json(path / TRAINER_FILE, "training state")
    step = trainer.int("step", 0, 1 << 40)
    metas = {name: trainer.doc("optimizers").doc(name) for name in optimizers}
    for file in (OPTIMIZERS_FILE, WEIGHTS_FILE):
        read_safetensors_header(path / file)
    tensors = load_file(str(path / OPTIMIZERS_FILE))
    if "rng.torch" not in tensors:
        raise UserError(f"{path / OPTIMIZERS_FILE}: rng.torch: missing")
    for name, optimizer in optimizers.items():
        try:
            optimizer.load_state_dict(unflatten_optimizer(name, tensors, metas[name].data))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserError(f"{path / TRAINER_FILE}: optimizers.{name}: does not fit the model ({first_line(exc, 120)})") from None
    try:
        torch.set_rng_state(tensors["rng.torch"])
    except (TypeError, RuntimeError) as exc:
        raise UserError(f"{path / OPTIMIZERS_FILE}: rng.torch: not a torch RNG state ({first_line(exc, 120)})") from None
    extra = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
    return load_file(str(path / WEIGHTS_FILE)), extra, step
