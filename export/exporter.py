"""`taming-deploy export`: checkpoint -> validated bundle, written atomically.

Steps: export the fp32 graphs, make the fp16 variants from calibration data, write the manifest,
then validate (onnx.checker, TensorRT op support, ORT vs torch, fp16 vs fp32); with ``int8_weights``
the fp32 graphs are then replaced by copies storing their weights as int8, validated against them.
The bundle is built in a temporary directory and renamed into place only when every check passed,
so an interrupted or failed export never leaves half a bundle and never damages an existing one.
"""
from __future__ import annotations

import gc
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch

import taming_deploy
from taming_deploy.engines.onnx_support import unsupported_ops
from taming_deploy.export.fp16 import Fp16IoRangeError, to_mixed_precision
from taming_deploy.export.calibration import SYNTHETIC, CalibrationSet, calibration_set, token_sequences
from taming_deploy.export.graphs import CONDITION_INPUTS, GraphDef, graph_defs, past_names
from taming_deploy.export.onnx_export import OPSET, export_graph
from taming_deploy.export.int8_weights import int8_weight_storage
from taming_deploy.export.validate import (
    FP16_LIMITS,
    INT8_WEIGHT_LIMITS,
    Check,
    TorchReference,
    check_fp32,
    check_variant,
    emulated_fp16_backend,
    torch_condition_tokens,
    torch_image_tokens,
    torch_reference,
    transformed_bundle,
    validation_backend,
)
from taming_deploy.backends.ort_backend import OrtBackend
from taming_deploy.export.graph_files import graph_entry, save_graph, write_manifest
from taming_deploy.bundle import BUNDLE_VERSION, GraphFile, Manifest
from taming_deploy.errors import UserError
from taming_deploy.fileutil import atomic_directory, check_replaceable
from taming_deploy.model_paths import BUNDLE_MANIFEST
from taming_deploy.training.checkpoint import load_model, replace_decoder
from taming_deploy.training.models.net2net import TamingModel

VALIDATION_STEPS = 48  # single cached steps checked per sequence after the prefill


def structural_checks(path: Path, graph: str, precision: str) -> list[Check]:
    """onnx.checker and TensorRT parser op support, as rows (value = number of problems)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        problems = 0
    except onnx.checker.ValidationError:
        problems = 1
    unsupported = unsupported_ops(onnx.load(str(path), load_external_data=False))  # ops only: the weights stay on disk
    return [
        Check(graph, precision, "onnx.checker errors", problems, 0, False),
        Check(graph, precision, "ops TensorRT's ONNX parser lacks" + (f" ({', '.join(unsupported)})" if unsupported else ""), len(unsupported), 0, False),
    ]


def past_feeds(cache: np.ndarray) -> dict[str, np.ndarray]:
    """A cache (n_layer, 2, B, heads, slots, head_dim) as the transformer graph's past_* inputs."""
    names = past_names(cache.shape[0])
    return dict(zip(names, [cache[i, 0] for i in range(cache.shape[0])] + [cache[i, 1] for i in range(cache.shape[0])]))


@torch.no_grad()
def fp16_calibration_feeds(model: TamingModel, spec, calib: CalibrationSet) -> dict[str, list[dict[str, np.ndarray]]]:
    """Inputs per graph on which the fp16 pass measures activation ranges."""
    image_tokens = torch_image_tokens(model, calib.images)
    feeds: dict[str, list[dict[str, np.ndarray]]] = {
        "encoder": [{"image": calib.images[k : k + 1]} for k in range(len(calib))],
        "decoder": [{"indices": image_tokens[k : k + 1]} for k in range(len(calib))],
    }
    if calib.conditions is not None:
        name = CONDITION_INPUTS[spec.condition.kind]
        feeds["cond_encoder"] = [{name: calib.conditions[k : k + 1]} for k in range(len(calib))]
        cond_tokens = torch_condition_tokens(model, calib.conditions)
    else:
        cond_tokens = np.full((len(calib), 1), spec.condition.sos_token, dtype=np.int64)
    sequences = token_sequences(spec, image_tokens, cond_tokens)
    # a prefill of the first half, then one step on the cache it filled: both call shapes the sampler makes
    half = sequences.shape[1] // 2
    transformer_feeds = []
    for seq in sequences[:4]:
        cache = model.transformer.new_cache(1)
        one_slot = past_feeds(cache.numpy()[:, :, :, :, :1])  # what the runtimes feed a prefill
        model.transformer.step(torch.from_numpy(seq[None, :half]), cache, 0)
        transformer_feeds.append({"tokens": seq[None, :half], "position": np.array([0]), **one_slot})
        transformer_feeds.append({"tokens": seq[None, half : half + 1], "position": np.array([half]), **past_feeds(cache.numpy())})
    feeds["transformer"] = transformer_feeds
    return feeds


def mixed_precision_graph(name: str, exported: onnx.ModelProto, base_dir: Path, feeds: list[dict[str, np.ndarray]],
                          echo: Callable[[str], None]):
    """The fp16 variant of ``exported`` (its external data in ``base_dir``); the transformer's cache is
    fp16 too unless its values leave fp16's safe range."""
    if name != "transformer":
        return to_mixed_precision(exported, feeds, base_dir=base_dir)
    layers = sum(1 for i in exported.graph.input if i.name.startswith("past_key_"))
    try:
        return to_mixed_precision(exported, feeds, fp16_io=(*past_names(layers), "new_kv"), base_dir=base_dir)
    except Fp16IoRangeError as exc:
        echo(f"transformer: keeping the KV cache in fp32 ({exc})")
        return to_mixed_precision(exported, feeds, base_dir=base_dir)


def print_table(checks: list[Check], echo: Callable[[str], None]) -> None:
    rows = [("graph", "precision", "check", "value", "threshold", "ok")]
    for c in checks:
        rows.append((c.graph, c.precision, c.check, c.shown_value(), ("<= " if not c.higher_is_better else ">= ") + f"{c.threshold:g}", "yes" if c.passed else "NO"))
    widths = [max(len(r[k]) for r in rows) for k in range(6)]
    for k, row in enumerate(rows):
        echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if k == 0:
            echo("  ".join("-" * width for width in widths))


def store_int8_weights(ort32: OrtBackend, graphs: dict[str, dict[str, GraphFile]], reference: TorchReference) -> list[Check]:
    """Replace the fp32 graphs of ``ort32``'s bundle (and their ``graphs`` entries) by int8-weight
    copies; the checks compare the copies with the fp32 graphs they replace."""
    bundle_dir = ort32.bundle.path
    staging = bundle_dir / "int8_weights"
    staging.mkdir()
    stored = transformed_bundle(bundle_dir, "fp32", int8_weight_storage, staging, weight_storage="int8")
    entries = {name: by_precision["fp32"] for name, by_precision in stored.bundle.manifest.graphs.items()}
    checks = [row for name, entry in entries.items() for row in structural_checks(staging / entry.file, name, "int8 weights")]
    checks += list(check_variant(reference, ort32, stored, "int8 weights", INT8_WEIGHT_LIMITS))
    for name, entry in entries.items():
        for stale in {d.file for d in graphs[name]["fp32"].data} - {d.file for d in entry.data}:
            (bundle_dir / stale).unlink()  # the fp32 weights' data file, which the int8 copy no longer needs
        for moved in [entry.file, *(d.file for d in entry.data)]:
            (staging / moved).replace(bundle_dir / moved)
        graphs[name]["fp32"] = entry
    (staging / BUNDLE_MANIFEST).unlink()
    staging.rmdir()
    return checks


def export_graph_files(g: GraphDef, directory: Path, fp16_feeds: list[dict[str, np.ndarray]] | None,
                       echo: Callable[[str], None]) -> tuple[dict[str, GraphFile], list[Check], dict | None]:
    """One graph's fp32 file (and, given calibration feeds, its fp16 file), their structural checks and
    the fp16 report. The weights stay in the exported data file, read from there a tensor at a time by the
    fp16 pass; only the fp16 weights it makes are held in memory, until they are written."""
    path = directory / f"{g.name}.onnx"
    exported = export_graph(g, path)
    files, checks, report = {}, [], None
    if fp16_feeds is not None:
        mixed, report = mixed_precision_graph(g.name, exported, directory, fp16_feeds, echo)
        path16 = directory / f"{g.name}.fp16.onnx"
        save_graph(mixed, path16, base_dir=directory)
        files["fp16"] = graph_entry(path16, "fp16")
        checks = structural_checks(path16, g.name, "fp16")
    save_graph(exported, path, base_dir=directory)  # the fp32 graph's own layout, now that the fp16 pass has read its weights
    files = {"fp32": graph_entry(path, "fp32"), **files}
    return files, structural_checks(path, g.name, "fp32") + checks, None if report is None else report.to_dict()


def export_graphs(model: TamingModel, directory: Path, calib: CalibrationSet, fp16: bool,
                  echo: Callable[[str], None]) -> tuple[dict[str, dict[str, GraphFile]], list[Check], dict[str, dict]]:
    """Every graph's files in ``directory``: their manifest entries, structural checks and fp16 reports."""
    graphs: dict[str, dict[str, GraphFile]] = {}
    checks: list[Check] = []
    feeds = fp16_calibration_feeds(model, model.config.spec(), calib) if fp16 else {}
    fp16_report: dict[str, dict] = {}
    for g in graph_defs(model):
        echo(f"exporting {g.name} ...")
        graphs[g.name], graph_checks, report = export_graph_files(g, directory, feeds.get(g.name) if fp16 else None, echo)
        checks += graph_checks
        if report is not None:
            fp16_report[g.name] = report
    return graphs, checks, fp16_report


def export_bundle(
    checkpoint_dir: Path,
    out_dir: Path,
    calibration: str = SYNTHETIC,
    calibration_count: int = 8,
    fp16: bool = True,
    echo: Callable[[str], None] = print,
    decoder: Path | None = None,
    int8_weights: bool = False,
    force: bool = False,
) -> Manifest:
    """``decoder``: a decoder fine-tune of the checkpoint's first stage whose decoder replaces the checkpoint's.
    ``int8_weights``: store the fp32 graphs' large weights as int8 (about 4x smaller files; see
    export/int8_weights.py); the fp16 graphs, which TensorRT builds from, keep theirs. ``force``: ``out_dir``
    may hold files of the user's, which are kept beside the bundle's (see fileutil.atomic_directory)."""
    started = time.perf_counter()
    inputs = [Path(checkpoint_dir)] + ([Path(decoder)] if decoder else []) + ([] if calibration == SYNTHETIC else [Path(calibration)])
    check_replaceable(Path(out_dir), inputs, force)  # before the minutes of export, not only at the end
    model = load_model(Path(checkpoint_dir))
    if decoder is not None:
        replace_decoder(model, load_model(Path(decoder)), Path(decoder))
    spec = model.config.spec()
    calib = calibration_set(calibration, spec, count=calibration_count)
    with atomic_directory(Path(out_dir), inputs, force) as tmp:
        graphs, checks, fp16_report = export_graphs(model, tmp, calib, fp16, echo)
        producer = {
            "name": "taming-deploy",
            "version": taming_deploy.__version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "opset": OPSET,
            "python": platform.python_version(),
        }
        write_manifest(tmp, Manifest(model=spec, graphs=graphs, producer=producer, format_version=BUNDLE_VERSION))
        echo("validating ...")
        random_sequences = np.random.default_rng(1).integers(0, spec.vocab_size, size=(2, min(spec.block_size, 2 * VALIDATION_STEPS)))
        reference = torch_reference(model, calib, random_sequences, VALIDATION_STEPS)
        del model  # the checks below need only ``reference``; the ONNX Runtime sessions get the model's memory
        gc.collect()
        ort32 = validation_backend(tmp, "fp32")
        checks += list(check_fp32(reference, ort32))
        if fp16:
            with tempfile.TemporaryDirectory() as workdir:
                # a temporary: its sessions are freed before the int8 copies are loaded
                checks += list(check_variant(reference, ort32, emulated_fp16_backend(tmp, Path(workdir)), "fp16", FP16_LIMITS))
        if int8_weights:
            echo("storing weights as int8 ...")
            checks += store_int8_weights(ort32, graphs, reference)
        print_table(checks, echo)
        validation = {
            "calibration": {"source": calibration, "images": len(calib), "size": list(calib.images.shape[2:])},
            "checks": [c.to_dict() for c in checks],
            "fp16": fp16_report,
            "seconds": round(time.perf_counter() - started, 1),
        }
        manifest = Manifest(model=spec, graphs=graphs, producer=producer, validation=validation, format_version=BUNDLE_VERSION)
        write_manifest(tmp, manifest)
        failed = [c for c in checks if not c.passed]
        if failed:
            raise UserError(
                "export failed validation (nothing was written): "
                + "; ".join(f"{c.graph} {c.precision} {c.check} = {c.value:.4g}, needs {'>=' if c.higher_is_better else '<='} {c.threshold:g}" for c in failed)
            )
    return manifest
