"""The project's checkpoint format: a directory with ``config.json`` and ``model.safetensors``.

No pickle anywhere. Parameter names are the original Taming Transformers names
(``first_stage_model.*``, ``cond_stage_model.*``, ``transformer.*``). Directories are written
to a temporary sibling and renamed into place, so a crash never leaves half a checkpoint.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from taming_deploy.documents import first_line, read_json, read_safetensors_header
from taming_deploy.errors import UserError
from taming_deploy.fileutil import atomic_directory
from taming_deploy.model_paths import CHECKPOINT_CONFIG as CONFIG_FILE
from taming_deploy.model_paths import CHECKPOINT_WEIGHTS as WEIGHTS_FILE
from taming_deploy.model_paths import is_checkpoint
from taming_deploy.training.config import ModelConfig
from taming_deploy.training.models.net2net import TamingModel


def save_checkpoint(path: Path, config: ModelConfig, state_dict: dict[str, torch.Tensor], extra: dict | None = None,
                    inputs: Iterable[Path] = (), force: bool = False) -> None:
    """Write config + weights atomically; ``extra`` (e.g. training step) goes into config.json. ``inputs``:
    files the checkpoint was made from, which ``path`` must not hold; ``force``: ``path`` may hold other files,
    which are kept (see fileutil.atomic_directory)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_directory(Path(path), inputs, force) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps({**config.to_dict(), **(extra or {})}, indent=2))


def read_config(path: Path) -> ModelConfig:
    path = Path(path)
    if not is_checkpoint(path):
        raise UserError(f"{path} is not a taming-deploy checkpoint (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    return ModelConfig.from_dict(read_json(path / CONFIG_FILE, "checkpoint config"))


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise a UserError naming every missing, unexpected and mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if state[k].shape != expected[k].shape
    )
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise UserError(f"{source} does not match its config; " + "; ".join(problems))


def check_weights_file(path: Path, config: ModelConfig) -> None:
    """The safetensors header agrees with the config, checked on a model without memory (the meta device),
    so that a config of absurd sizes is refused before anything is allocated."""
    header = read_safetensors_header(path)
    with torch.device("meta"):
        skeleton = TamingModel(config)
        shapes = {name: torch.empty(entry["shape"]) for name, entry in header.items()}
    check_state_dict(skeleton, shapes, str(path.parent))


def model_holding(config: ModelConfig, state: dict[str, torch.Tensor], source: str) -> TamingModel:
    """The model of ``config`` whose parameters and buffers are ``state``'s tensors themselves (converted
    where their dtype differs from the model's): built on the meta device and assigned, so the weights
    exist once and nothing is randomly initialised first (a model built and then loaded held them twice:
    11.4 GiB to import the 1.4 B checkpoint). A tensor sharing storage with an earlier one is copied, so
    that every parameter owns its memory, as a loaded model's do."""
    with torch.device("meta"):
        model = TamingModel(config)
    check_state_dict(model, state, source)
    expected = model.state_dict()
    owned: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in state.items():
        tensor = tensor.to(expected[name].dtype)
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages and tensor.numel():
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        owned[name] = tensor
    model.load_state_dict(owned, strict=True, assign=True)
    return model


def load_model(path: Path, device: str = "cpu") -> TamingModel:
    """Build the model a checkpoint's config describes, holding its weights (checked strictly)."""
    path = Path(path)
    config = read_config(path)
    check_weights_file(path / WEIGHTS_FILE, config)
    try:
        state = load_file(str(path / WEIGHTS_FILE), device=device)
    except (SafetensorError, OSError) as exc:
        raise UserError(f"cannot read {path / WEIGHTS_FILE}: {first_line(exc)}") from None
    return model_holding(config, state, str(path)).to(device).eval()


DECODER_PARTS = ("post_quant_conv.", "decoder.")


def replace_decoder(model: TamingModel, donor: TamingModel, donor_path: Path) -> None:
    """Give ``model`` the decoder of ``donor``, a decoder fine-tune of the same first stage.

    Everything else in the two first stages (encoder, quant_conv, codebook) must be identical: the
    model's GPT was trained on those tokens and the donor's decoder on that codebook.
    """
    if model.config.first_stage is None or donor.config.first_stage != model.config.first_stage:
        raise UserError(f"{donor_path}: its first stage is not configured like this model's, so it cannot supply the decoder")
    ours, theirs = model.first_stage_model.state_dict(), donor.first_stage_model.state_dict()
    differing = [k for k in ours if not k.startswith(DECODER_PARTS) and not torch.equal(ours[k], theirs[k])]
    if differing:
        raise UserError(
            f"{donor_path} is not a decoder fine-tune of this model's first stage: {len(differing)} encoder or "
            f"codebook tensors differ (first: {differing[0]}), so its decoder expects other tokens"
        )
    model.first_stage_model.load_state_dict({k: theirs[k] if k.startswith(DECODER_PARTS) else v for k, v in ours.items()})
