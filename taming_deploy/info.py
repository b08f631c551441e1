"""`taming-deploy info`: what a bundle or a checkpoint holds, read without torch."""
from __future__ import annotations

from pathlib import Path

from taming_deploy.bundle import Bundle
from taming_deploy.conditions import EXPECTED_CONDITION
from taming_deploy.engines.engine_manifest import ENGINES_MANIFEST, engines_dir
from taming_deploy.documents import first_line, read_json, read_safetensors_header
from taming_deploy.errors import UserError
from taming_deploy.labels import label_lines
from taming_deploy.model_paths import CHECKPOINT_CONFIG, CHECKPOINT_WEIGHTS, DEFAULT_MODEL, model_kind
from taming_deploy.spec import ConditionSpec, ModelSpec


def parameter_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, entry in read_safetensors_header(path).items():
        if name.endswith((".attn.mask", ".colorize")):
            continue  # buffers, not parameters
        size = 1
        for dim in entry["shape"]:
            size *= dim
        stage = name.split(".")[0]
        counts[stage] = counts.get(stage, 0) + size
    return counts


def describe_spec(spec: ModelSpec) -> list[str]:
    c = spec.condition
    cond = c.kind + (f", {c.n_labels} labels" if c.n_labels else "") + (f", {c.n_classes} classes" if c.n_classes else "")
    if c.codebook_size:
        cond += f", codebook {c.codebook_size}"
    return [
        f"condition:    {cond}" + (f" ({', '.join(c.label_names)})" if c.label_names else ""),
        f"expects:      {EXPECTED_CONDITION[c.kind]}",
        f"first stage:  downsampling x{spec.downsample_factor}, codebook {spec.image_codebook_size}",
        f"transformer:  {spec.n_layer} layers, {spec.n_head} heads, width {spec.n_embd}, block {spec.block_size}, vocab {spec.vocab_size}",
        f"window:       {spec.window[0]}x{spec.window[1]} latent cells",
    ] + label_lines(c)


def describe_bundle(path: Path) -> list[str]:
    bundle = Bundle(path)
    m = bundle.manifest
    lines = [f"bundle {path} (format {m.format_version}, by {m.producer.get('name')} {m.producer.get('version')}, opset {m.producer.get('opset')})"]
    lines += describe_spec(m.model)
    for name, by_precision in m.graphs.items():
        for precision, entry in by_precision.items():
            size = f"{(path / entry.file).stat().st_size / 1e6:8.1f} MB" if (path / entry.file).exists() else " missing   "
            io = ", ".join(f"{t.name}:{t.dtype}{list(t.shape)}" for t in entry.inputs) + " -> " + ", ".join(
                f"{t.name}:{t.dtype}{list(t.shape)}" for t in entry.outputs
            )
            storage = " (int8 weights)" if entry.weight_storage == "int8" else ""
            lines.append(f"graph {name:<12} {precision}  {entry.file:<24} {size}{storage}  {io}")
    checks = m.validation.get("checks", [])
    if checks:
        failed = [c for c in checks if not c.get("passed")]
        lines.append(f"validation:   {len(checks) - len(failed)}/{len(checks)} checks passed at export")
    engines = engines_dir(path) / ENGINES_MANIFEST
    if engines.is_file():
        info = read_json(engines, "engines manifest").data
        lines.append(f"engines:      TensorRT {info.get('tensorrt_version')} for {info.get('gpu', {}).get('name')} in {engines.parent}")
    return lines


def describe_checkpoint(path: Path) -> list[str]:
    try:
        return checkpoint_lines(path, read_json(path / CHECKPOINT_CONFIG, "checkpoint config").data)
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as exc:  # read without the training schema (torch)
        raise UserError(f"{path / CHECKPOINT_CONFIG}: malformed checkpoint config ({type(exc).__name__}: {first_line(exc, 120)})") from None


def checkpoint_lines(path: Path, config: dict) -> list[str]:
    lines = [f"checkpoint {path} (format {config.get('format_version')})"]
    stages = [s for s in ("first_stage", "condition", "transformer") if s in config]
    lines.append(f"stages:       {', '.join(stages)}")
    for stage, count in parameter_counts(path / CHECKPOINT_WEIGHTS).items():
        lines.append(f"parameters:   {stage:<20} {count / 1e6:8.2f} M")
    for key in ("step", "epoch"):
        if key in config:
            lines.append(f"{key + ':':<14}{config[key]}")
    if all(s in config for s in ("first_stage", "condition", "transformer")):
        fs, tr = config["first_stage"], config["transformer"]
        lines.append(f"first stage:  downsampling x{2 ** (len(fs['ch_mult']) - 1)}, codebook {fs['n_embed']}")
        lines.append(f"transformer:  {tr['n_layer']} layers, {tr['n_head']} heads, width {tr['n_embd']}, block {tr['block_size']}")
        lines.append(f"condition:    {config['condition']['kind']}")
        lines.append(f"expects:      {EXPECTED_CONDITION[config['condition']['kind']]}")
    if "condition" in config:
        lines += label_lines(ConditionSpec.from_dict(config["condition"]))
    return lines


def model_condition(path: Path | None) -> ConditionSpec:
    """The condition a bundle or checkpoint takes (None: the embedded model), read without torch."""
    path = DEFAULT_MODEL if path is None else Path(path)
    if model_kind(path) == "bundle":
        return Bundle(path).spec.condition
    config = read_json(path / CHECKPOINT_CONFIG, "checkpoint config").data
    if "condition" not in config:
        raise UserError(f"{path}: the checkpoint holds no condition stage")
    return ConditionSpec.from_dict(config["condition"])


def describe(path: Path | None) -> list[str]:
    """What ``path`` holds; None: the embedded default model (and where it is installed)."""
    if path is None:
        return [f"the embedded default model (used when --model is omitted), installed at {DEFAULT_MODEL}"] + describe_bundle(DEFAULT_MODEL)
    path = Path(path)
    return describe_bundle(path) if model_kind(path) == "bundle" else describe_checkpoint(path)
