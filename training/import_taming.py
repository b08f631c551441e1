"""Import a checkpoint of the original Taming Transformers (Lightning .ckpt + OmegaConf project.yaml).

The YAML is read as plain YAML; only ``model.target`` and ``model.params`` matter. The checkpoint is
opened with ``torch.load(weights_only=True)``; one that needs arbitrary unpickling is refused unless the
user passes ``trust_pickle`` (unpickling can run code from the file).
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from taming_deploy.documents import Doc, check_regular_file, first_line, read_yaml
from taming_deploy.errors import UserError
from taming_deploy.fileutil import check_replaceable
from taming_deploy.spec import ConditionSpec
from taming_deploy.training.checkpoint import model_holding, save_checkpoint
from taming_deploy.training.config import ModelConfig
from taming_deploy.training.models.gpt import GPTConfig
from taming_deploy.training.models.vqgan import AutoencoderConfig

NET2NET = "taming.models.cond_transformer.Net2NetTransformer"
VQMODEL = "taming.models.vqgan.VQModel"
VQSEG = "taming.models.vqgan.VQSegmentationModel"
GUMBEL = "taming.models.vqgan.GumbelVQ"
FIRST_STAGE_TARGETS = (VQMODEL, GUMBEL)
SUPPORTED_CONDITIONS = "segmentation, depth, image (__is_first_stage__ or a 3-channel VQModel), class, unconditional"
SOS = "taming.modules.util.SOSProvider"
LABELATOR = "taming.modules.util.Labelator"
GPT_TARGET = "taming.modules.transformer.mingpt.GPT"
DDCONFIG_FIELDS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "in_channels", "out_ch",
                   "resolution", "z_channels", "dropout", "double_z")


def read_project_yaml(path: Path) -> dict:
    model = read_yaml(path, "project config").raw("model", None)
    if not isinstance(model, dict) or not isinstance(model.get("target"), str):
        raise UserError(f"{path} has no model.target: is it a Taming Transformers project.yaml?")
    return model


def read_remap(params: dict, where: str, config_path: Path) -> np.ndarray | None:
    """The ``remap`` file (a .npy of the used codes), resolved relative to the config's folder."""
    if params.get("remap") is None:
        return None
    path = Path(params["remap"])
    path = path if path.is_absolute() else Path(config_path).parent / path
    if not path.is_file():
        raise UserError(f"{where}: its remap file {params['remap']} (looked for at {path}) does not exist; put the .npy of used codes there")
    try:
        used = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"{where}: cannot read remap file {path} ({exc})") from None
    n_embed = int(params.get("n_embed", 0))
    if used.ndim != 1 or not np.issubdtype(used.dtype, np.integer) or used.size == 0 or used.min() < 0 or used.max() >= n_embed:
        raise UserError(f"{where}: remap file {path} must be a 1-D array of code indices in 0..{n_embed - 1}")
    return used.astype(np.int64)


def unknown_index(params: dict, where: str) -> str | int:
    value = params.get("unknown_index", "random")
    if value in ("random", "extra") or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise UserError(f"{where}: unknown_index {value!r} is not supported (random, extra or a code index)")


def autoencoder_config(params: dict, where: str, config_path: Path, target: str = VQMODEL) -> AutoencoderConfig:
    """The original VQModel / GumbelVQ params -> AutoencoderConfig; refuses options this project does not implement."""
    used = read_remap(params, where, config_path)
    dd = params.get("ddconfig", {})
    for flag in ("give_pre_end", "tanh_out"):
        if dd.get(flag):
            raise UserError(f"{where}: ddconfig.{flag} is not supported")
    missing = [k for k in DDCONFIG_FIELDS if k not in dd and k not in ("dropout", "double_z")]
    if missing or "embed_dim" not in params or "n_embed" not in params:
        raise UserError(f"{where}: missing {', '.join(missing + [k for k in ('embed_dim', 'n_embed') if k not in params])}")
    if target == GUMBEL and int(params["embed_dim"]) != int(dd["z_channels"]):
        raise UserError(f"{where}: a GumbelVQ needs embed_dim == z_channels, got {params['embed_dim']} and {dd['z_channels']}")
    return AutoencoderConfig(
        ch=int(dd["ch"]),
        ch_mult=tuple(int(m) for m in dd["ch_mult"]),
        num_res_blocks=int(dd["num_res_blocks"]),
        attn_resolutions=tuple(int(r) for r in dd["attn_resolutions"]),
        in_channels=int(dd["in_channels"]),
        out_ch=int(dd["out_ch"]),
        resolution=int(dd["resolution"]),
        z_channels=int(dd["z_channels"]),
        dropout=float(dd.get("dropout", 0.0)),
        double_z=bool(dd.get("double_z", False)),
        embed_dim=int(params["embed_dim"]),
        n_embed=int(params["n_embed"]),
        quantizer="gumbel" if target == GUMBEL else "vq",
        remap_codes=0 if used is None else len(used),
        unknown_index=unknown_index(params, where),
    )


def first_stage_config(stage: dict, config_path: Path) -> AutoencoderConfig:
    target = stage.get("target")
    if target not in FIRST_STAGE_TARGETS:
        raise UserError(f"first_stage_config: target {target} is not supported (supported: {', '.join(FIRST_STAGE_TARGETS)})")
    return autoencoder_config(stage.get("params", {}), "first_stage_config", config_path, target)


def remap_buffers(model: dict, config_path: Path) -> dict[str, torch.Tensor]:
    """The ``quantize.used`` buffers of the stages with a ``remap`` file, under their state-dict names
    (a checkpoint of the original holds them too; its own copy is the one loaded)."""
    params = model.get("params", {})
    if model["target"] != NET2NET:
        stages = {"first_stage_model." if model["target"] != VQSEG else "cond_stage_model.": params}
    else:
        stages = {"first_stage_model.": params["first_stage_config"].get("params", {})}
        if isinstance(params.get("cond_stage_config"), dict):
            stages["cond_stage_model."] = params["cond_stage_config"].get("params", {})
    buffers = {}
    for prefix, stage in stages.items():
        used = read_remap(stage, prefix.rstrip("."), config_path)
        if used is not None:
            buffers[prefix + "quantize.used"] = torch.from_numpy(used)
    return buffers


def condition_config(model: dict, config_path: Path, first_stage: AutoencoderConfig) -> tuple[ConditionSpec, AutoencoderConfig | None]:
    params = model.get("params", {})
    cond = params.get("cond_stage_config")
    key = params.get("cond_stage_key", "depth")
    if params.get("unconditional") or cond == "__is_unconditional__":
        return ConditionSpec(kind="unconditional", sos_token=int(params.get("sos_token", 0))), None
    if cond == "__is_first_stage__":  # the condition is an image, encoded by the first stage itself
        return ConditionSpec(kind="image", codebook_size=first_stage.codebook_tokens), first_stage
    if not isinstance(cond, dict):
        raise UserError(f"condition stage {cond!r} is not supported (supported: {SUPPORTED_CONDITIONS})")
    target, cparams = cond.get("target"), cond.get("params", {})
    if target == SOS:
        return ConditionSpec(kind="unconditional", sos_token=int(cparams.get("sos_token", 0))), None
    if target == LABELATOR:
        return ConditionSpec(kind="class", n_classes=int(cparams["n_classes"])), None
    if target in (VQMODEL, VQSEG, GUMBEL):
        ae = autoencoder_config(cparams, "cond_stage_config", config_path, target)
        is_segmentation = target == VQSEG or key == "segmentation" or cparams.get("colorize_nlabels") is not None
        if is_segmentation:
            n_labels = int(cparams.get("n_labels", ae.in_channels))
            return ConditionSpec(kind="segmentation", n_labels=n_labels, codebook_size=ae.codebook_tokens), ae
        if ae.in_channels == 1:
            return ConditionSpec(kind="depth", codebook_size=ae.codebook_tokens), ae
        if ae.in_channels == 3:
            return ConditionSpec(kind="image", codebook_size=ae.codebook_tokens), ae
        raise UserError(f"a {ae.in_channels}-channel VQ condition ({key}) is not supported (supported: label maps, 1-channel depth, 3-channel images)")
    raise UserError(f"condition stage {target} is not supported (supported: {SUPPORTED_CONDITIONS})")


def largest_window(block_size: int, spatial: bool, limit: int = 16) -> tuple[int, int]:
    """The original's 16x16 window, or the largest square one the block holds (condition tokens of a
    spatial condition take a window's worth of positions, other conditions one)."""
    side = int(((block_size + 1) / 2) ** 0.5) if spatial else int(block_size**0.5)
    side = min(side, limit)
    return side, side


def model_config(model: dict, config_path: Path = Path("project.yaml")) -> tuple[ModelConfig, str]:
    """project.yaml's model section -> (ModelConfig, prefix that state-dict keys need); files the
    config names (``remap``) are resolved relative to ``config_path``'s folder."""
    target, params = model["target"], model.get("params", {})
    if target == NET2NET:
        permuter = params.get("permuter_config")
        if permuter and permuter.get("target", "").split(".")[-1] != "Identity":
            raise UserError(f"token permuter {permuter.get('target')} is not supported (only the identity, row-major order)")
        if int(params.get("downsample_cond_size", -1)) != -1:
            raise UserError("downsample_cond_size is not supported")
        tcfg = params["transformer_config"]
        if tcfg.get("target") != GPT_TARGET:
            raise UserError(f"transformer {tcfg.get('target')} is not supported (only {GPT_TARGET})")
        tparams = dict(tcfg["params"])
        if int(tparams.pop("n_unmasked", 0)) != 0:
            raise UserError("n_unmasked != 0 is not supported")
        first_stage = first_stage_config(params["first_stage_config"], config_path)
        condition, cond_ae = condition_config(model, config_path, first_stage)
        unknown = sorted(set(tparams) - set(GPTConfig.__dataclass_fields__))
        if unknown:
            raise UserError(f"transformer_config: unsupported parameters {', '.join(unknown)}")
        gpt = GPTConfig(**tparams)
        config = ModelConfig(
            first_stage=first_stage,
            condition=condition,
            condition_autoencoder=cond_ae,
            transformer=gpt,
            window=largest_window(gpt.block_size, condition.spatial),
            pkeep=float(params.get("pkeep", 1.0)),
        )
        return config, ""
    if target in FIRST_STAGE_TARGETS:
        return ModelConfig(first_stage=autoencoder_config(params, "model", config_path, target)), "first_stage_model."
    if target == VQSEG:
        ae = autoencoder_config(params, "model", config_path)
        spec = ConditionSpec(kind="segmentation", n_labels=int(params["n_labels"]), codebook_size=ae.codebook_tokens)
        return ModelConfig(condition=spec, condition_autoencoder=ae), "cond_stage_model."
    raise UserError(f"model target {target} is not supported (supported: {NET2NET}, {VQMODEL}, {GUMBEL}, {VQSEG})")


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
PICKLE_PROTOCOL = 0x80  # the first byte of a legacy torch.save pickle (protocol 2 and later)


def check_checkpoint_file(ckpt: Path) -> None:
    """Refuse what is not a PyTorch checkpoint, and a zip checkpoint whose contents fail their CRC
    (torch.load reads a damaged tensor without noticing)."""
    check_regular_file(Path(ckpt), "checkpoint (.ckpt)")
    with open(ckpt, "rb") as f:
        head = f.read(4)
    if head == ZIP_MAGIC:
        try:
            with zipfile.ZipFile(ckpt) as archive:
                damaged = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise UserError(f"{ckpt}: damaged checkpoint archive ({first_line(exc, 120)})") from None
        if damaged is not None:
            raise UserError(f"{ckpt}: damaged checkpoint: {damaged} fails its CRC check (truncated or corrupted file)")
    elif not head or head[0] != PICKLE_PROTOCOL:
        raise UserError(f"{ckpt}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)")


def load_lightning_state_dict(ckpt: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    check_checkpoint_file(ckpt)
    try:
        obj: Any = torch.load(ckpt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # weights-only unpickling met bytes, not a Python object
            raise UserError(f"{ckpt}: damaged or not a PyTorch checkpoint (its pickle does not parse)") from None
        if not trust_pickle:
            reason = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line), "it stores Python objects")
            raise UserError(
                f"{ckpt} holds more than tensors and can only be opened by arbitrary unpickling, which can run "
                f"code from the file ({first_line(reason, 160)}); re-run with --trust-pickle if you trust where it came from"
            ) from None
        try:
            obj = torch.load(ckpt, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 -- arbitrary unpickling can fail with any exception
            raise UserError(f"{ckpt}: cannot unpickle the checkpoint ({type(exc).__name__}: {first_line(exc, 120)})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"cannot read checkpoint {ckpt}: {first_line(exc, 160)}") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{ckpt} has no state_dict of tensors")
    return state


def is_training_only(key: str) -> bool:
    """LPIPS and discriminator weights of the training loss (``loss.*`` inside any stage)."""
    return key.startswith("loss.") or ".loss." in key


def import_taming(ckpt: Path, project_yaml: Path, out: Path, trust_pickle: bool = False, force: bool = False) -> ModelConfig:
    """``force``: write into an ``out`` that holds other files (only the checkpoint's own are replaced)."""
    check_replaceable(Path(out), (ckpt, project_yaml), force)  # before reading a checkpoint of gigabytes
    raw = read_project_yaml(project_yaml)
    try:
        config, prefix = model_config(raw, Path(project_yaml))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # the original's loose schema: a field of the wrong kind
        raise UserError(f"{project_yaml}: not a project config this importer reads ({type(exc).__name__}: {first_line(exc, 120)})") from None
    config = ModelConfig.from_dict(Doc(config.to_dict(), str(project_yaml)))  # the project's own ranges and agreement
    state = {prefix + k: v for k, v in load_lightning_state_dict(ckpt, trust_pickle).items() if not is_training_only(k)}
    state = {**remap_buffers(raw, Path(project_yaml)), **state}
    if raw.get("params", {}).get("cond_stage_config") == "__is_first_stage__" and not any(k.startswith("cond_stage_model.") for k in state):
        # the original registers its first stage again as the condition stage; a stripped checkpoint may lack the copy
        state.update({"cond_stage_model." + k[len("first_stage_model."):]: v for k, v in state.items() if k.startswith("first_stage_model.")})
    model = model_holding(config, state, str(ckpt))
    save_checkpoint(out, config, model.state_dict(), inputs=(ckpt, project_yaml), force=force)
    return config
