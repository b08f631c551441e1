"""Numerical checks every export must pass: ONNX Runtime against PyTorch (fp32), and each lower-precision
variant (fp16 graphs, int8-stored weights) against the fp32 graphs.

Each check yields a row (graph, precision, check, value, threshold, passed); the exporter prints
them as a table, stores them in the manifest and fails when any row fails.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from pathlib import Path

import numpy as np
import onnx
import torch

from taming_deploy.export.calibration import CalibrationSet, token_sequences
from taming_deploy.export.fp16 import fp16_storage_emulation
from taming_deploy.export.index_agreement import Float64Reference, IndexLimits
from taming_deploy.export.graph_files import graph_entry, save_graph, write_manifest
from taming_deploy.backends.ort_backend import OrtBackend
from taming_deploy.bundle import Bundle, Manifest
from taming_deploy.training.models.net2net import TamingModel

FP32_MAX_RELATIVE_ERROR = 1e-4
# ONNX Runtime fp32 against the float64 run: a correct graph differs from it only at ties
FP32_INDEX_LIMITS = IndexLimits(tie_tolerance=1e-5, mismatch_rate=1e-3, min_mismatches=1)


def one_at_a_time(run: Callable[[np.ndarray], np.ndarray], batch: np.ndarray) -> np.ndarray:
    """``run`` on each item of ``batch`` alone, concatenated. Validation holds one image's activations at a
    time: at released sizes (256x256 calibration windows through ch-128 stages, 182-channel one-hot
    conditions) a batch of 8 takes gigabytes in torch and again in each ONNX Runtime session's arena."""
    return np.concatenate([run(batch[k : k + 1]) for k in range(len(batch))])


@torch.no_grad()
def torch_image_tokens(model: TamingModel, images: np.ndarray) -> np.ndarray:
    return one_at_a_time(lambda x: model.first_stage_model.encode(torch.from_numpy(x)).indices.numpy(), images)


@torch.no_grad()
def torch_condition_tokens(model: TamingModel, conditions: np.ndarray) -> np.ndarray:
    return one_at_a_time(lambda c: model.cond_stage_model.condition_tokens(torch.from_numpy(c)).numpy(), conditions)


@torch.no_grad()
def torch_decode(model: TamingModel, tokens: np.ndarray) -> np.ndarray:
    return one_at_a_time(lambda t: model.first_stage_model.decode_indices(torch.from_numpy(t)).numpy(), tokens)


@dataclass(frozen=True)
class VariantLimits:
    """How far a variant of the fp32 graphs may move their outputs on the calibration inputs."""

    index: IndexLimits  # encoder / condition encoder codes against fp32's
    decoder_psnr: float  # dB against the fp32 decoder's image
    top1_agreement: float  # transformer: greedy next token equal to fp32's (near-ties forgiven, see top1_agreement)
    top1_tie_tolerance: float  # logit units: fp32's logit for the variant's token this close to its top one is a tie
    mean_kl: float  # transformer: mean KL(fp32 || variant) of the next-token distribution, nats


# fp16 on the embedded default: index agreement 0.998, decoder 81 dB, top-1 0.995, mean KL 3.1e-5 nats.
FP16_LIMITS = VariantLimits(index=IndexLimits(tie_tolerance=1e-3, mismatch_rate=5e-3, min_mismatches=1), decoder_psnr=40.0, top1_agreement=0.99,
                            top1_tie_tolerance=1e-2, mean_kl=1e-3)
# Measured on the embedded default (calibration set): index agreement 0.996 (encoder) / 0.979 (condition
# encoder), decoder 67 dB, greedy top-1 0.975, mean KL 7e-4 nats. Top-1 is the loose one: at
# high-entropy positions near-tied logits swap order while the distribution barely moves (KL).
INT8_WEIGHT_LIMITS = VariantLimits(index=IndexLimits(tie_tolerance=1e-2, mismatch_rate=0.05, min_mismatches=2), decoder_psnr=40.0, top1_agreement=0.9,
                                  top1_tie_tolerance=5e-2, mean_kl=0.01)


@dataclass(frozen=True)
class Check:
    graph: str
    precision: str
    check: str
    value: float
    threshold: float
    higher_is_better: bool
    raw: float | None = None  # index checks: the raw agreement, beside the tie-adjusted value

    @property
    def passed(self) -> bool:
        return self.value >= self.threshold if self.higher_is_better else self.value <= self.threshold

    def to_dict(self) -> dict:
        return {**asdict(self), "value": float(self.value), "passed": bool(self.passed)}

    def shown_value(self) -> str:
        return f"{self.value:.4g}" + ("" if self.raw is None else f" (raw {self.raw:.4g})")


@dataclass
class TorchReference:
    """What the checks compare the graphs with, computed from the PyTorch model before any ONNX Runtime
    session opens, so that the model can be freed first: at the 1.4 B size its transformer alone is
    5.6 GB, which the sessions would otherwise sit beside. The quantizing stages are also run in
    float64 on the inputs the index checks use."""

    calib: CalibrationSet
    random_images: np.ndarray
    encoder64: Float64Reference  # on the calibration images
    encoder_random64: Float64Reference
    cond_encoder64: Float64Reference | None
    decoded: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (image tokens, torch's decoded images)
    sequences: dict[str, np.ndarray]  # name -> token sequences, condition tokens first
    logits: dict[str, np.ndarray]  # name -> torch's logits at positions prefill-1 .. L-1 of those sequences
    steps: int  # single cached steps checked after each prefill

    def prefill(self, name: str) -> int:
        return prefill_length(self.sequences[name], self.steps)


def prefill_length(sequences: np.ndarray, steps: int) -> int:
    """Tokens fed by the prefill that ``steps`` single steps follow to the end of ``sequences``."""
    return max(1, sequences.shape[1] - steps)


def torch_reference(model: TamingModel, calib: CalibrationSet, random_sequences: np.ndarray, steps: int) -> TorchReference:
    rng = np.random.default_rng(1)
    spec = model.config.spec()
    random_images = np.random.default_rng(0).uniform(-1, 1, size=(2, 3, *calib.images.shape[2:])).astype(np.float32)
    cond64 = None if calib.conditions is None else Float64Reference(model.cond_stage_model, calib.conditions)
    calib_tokens = torch_image_tokens(model, calib.images)
    random_tokens = rng.integers(0, spec.image_codebook_size, size=calib_tokens.shape)
    decoded = {name: (tokens, torch_decode(model, tokens)) for name, tokens in (("calibration", calib_tokens), ("random", random_tokens))}
    sequences = {"calibration": calibration_sequences(model, calib), "random": random_sequences}
    logits = {name: torch_logits(model, seq, prefill_length(seq, steps)) for name, seq in sequences.items()}
    return TorchReference(calib, random_images, Float64Reference(model.first_stage_model, calib.images),
                          Float64Reference(model.first_stage_model, random_images), cond64, decoded, sequences, logits, steps)


def index_check(graph: str, precision: str, against: str, reference: Float64Reference, got: np.ndarray, expected: np.ndarray,
                limits: IndexLimits) -> Check:
    """Tie-adjusted agreement of ``got`` with ``expected`` (raw agreement beside it), threshold sized for the count."""
    result = reference.agreement(got, expected, limits.tie_tolerance)
    check = f"index agreement vs {against}, {result.count} indices, ties within {limits.tie_tolerance:g} forgiven"
    return Check(graph, precision, check, result.adjusted, limits.threshold(result.count), True, raw=result.raw)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))


def psnr(actual: np.ndarray, expected: np.ndarray) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), after clamping as the saver does."""
    mse = float(np.mean((np.clip(actual, -1, 1) - np.clip(expected, -1, 1)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(4.0 / mse))


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


def top1_agreement(logits: np.ndarray, logits32: np.ndarray, tie_tolerance: float) -> tuple[float, float]:
    """(tie-adjusted, raw) agreement of the variant's greedy tokens with fp32's. A different token counts
    as a mismatch only where fp32's own logit for it is more than ``tie_tolerance`` below fp32's top
    logit: at near-flat positions (random weights, high entropy) the order of near-equal logits flips
    under any rounding while the distribution does not move (the KL check watches that)."""
    chosen, top = logits.argmax(-1), logits32.argmax(-1)
    gap = np.take_along_axis(logits32, top[..., None], -1)[..., 0] - np.take_along_axis(logits32, chosen[..., None], -1)[..., 0]
    return float(np.mean((chosen == top) | (gap <= tie_tolerance))), agreement(chosen, top)


def stepped_logits(backend: OrtBackend, sequences: np.ndarray, prefill: int) -> np.ndarray:
    """Logits at positions prefill-1 .. L-1: one prefill of ``prefill`` tokens, then single steps."""
    cache = backend.new_cache(sequences.shape[0])
    out = [backend.transformer_step(sequences[:, :prefill], 0, cache)]
    for p in range(prefill, sequences.shape[1]):
        out.append(backend.transformer_step(sequences[:, p : p + 1], p, cache))
    return np.stack(out, axis=1)


@torch.no_grad()
def torch_logits(model: TamingModel, sequences: np.ndarray, prefill: int) -> np.ndarray:
    logits, _ = model.transformer(torch.from_numpy(sequences))
    return logits[:, prefill - 1 :].numpy()


def check_fp32(ref: TorchReference, ort32: OrtBackend) -> Iterator[Check]:
    """ORT fp32 against PyTorch on calibration and random inputs (the quantizing graphs against float64)."""
    for name, images, reference in (("calibration", ref.calib.images, ref.encoder64), ("random", ref.random_images, ref.encoder_random64)):
        yield index_check("encoder", "fp32", f"torch float64 ({name})", reference, one_at_a_time(ort32.encode, images),
                          reference.tokens, FP32_INDEX_LIMITS)
    for name, (tokens, expected) in ref.decoded.items():
        yield Check("decoder", "fp32", f"max relative error vs torch ({name})", relative_error(one_at_a_time(ort32.decode, tokens), expected),
                    FP32_MAX_RELATIVE_ERROR, False)
    if ref.cond_encoder64 is not None:
        reference = ref.cond_encoder64
        yield index_check("cond_encoder", "fp32", "torch float64 (calibration)", reference, one_at_a_time(ort32.condition_tokens, ref.calib.conditions),
                          reference.tokens, FP32_INDEX_LIMITS)
    for name, sequences in ref.sequences.items():
        prefill = ref.prefill(name)
        error = relative_error(stepped_logits(ort32, sequences, prefill), ref.logits[name])
        yield Check("transformer", "fp32", f"max relative error vs torch, prefill + {sequences.shape[1] - prefill} steps ({name})", error, FP32_MAX_RELATIVE_ERROR, False)


@torch.no_grad()
def calibration_sequences(model: TamingModel, calib: CalibrationSet) -> np.ndarray:
    spec = model.config.spec()
    image_tokens = torch_image_tokens(model, calib.images)
    if calib.conditions is not None:
        cond_tokens = torch_condition_tokens(model, calib.conditions)
    elif spec.condition.kind == "class":
        cond_tokens = np.arange(len(calib), dtype=np.int64)[:, None] % (spec.condition.n_classes or 1)
    else:
        cond_tokens = np.full((len(calib), 1), spec.condition.sos_token, dtype=np.int64)
    return token_sequences(spec, image_tokens, cond_tokens)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def mean_kl(reference_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean KL(reference || other) in nats over all positions: what sampling from ``logits`` loses."""
    p, q = log_softmax(reference_logits.astype(np.float64)), log_softmax(logits.astype(np.float64))
    return float((np.exp(p) * (p - q)).sum(axis=-1).mean())


def check_variant(ref: TorchReference, ort32: OrtBackend, variant: OrtBackend, label: str, limits: VariantLimits) -> Iterator[Check]:
    """A variant of the fp32 graphs (fp16: their emulation; int8 weights) against them on calibration inputs."""
    images, conditions = ref.calib.images, ref.calib.conditions
    tokens = one_at_a_time(ort32.encode, images)
    yield index_check("encoder", label, "fp32", ref.encoder64, one_at_a_time(variant.encode, images), tokens, limits.index)
    yield Check("decoder", label, "PSNR vs fp32 (dB)", psnr(one_at_a_time(variant.decode, tokens), one_at_a_time(ort32.decode, tokens)),
                limits.decoder_psnr, True)
    if ref.cond_encoder64 is not None:
        got, expected = one_at_a_time(variant.condition_tokens, conditions), one_at_a_time(ort32.condition_tokens, conditions)
        yield index_check("cond_encoder", label, "fp32", ref.cond_encoder64, got, expected, limits.index)
    sequences, prefill = ref.sequences["calibration"], ref.prefill("calibration")
    logits, logits32 = stepped_logits(variant, sequences, prefill), stepped_logits(ort32, sequences, prefill)
    positions = logits32.shape[0] * logits32.shape[1]
    adjusted, raw = top1_agreement(logits, logits32, limits.top1_tie_tolerance)
    yield Check("transformer", label, f"greedy top-1 agreement vs fp32 ({positions} positions, logit gaps within "
                f"{limits.top1_tie_tolerance:g} forgiven)", adjusted, limits.top1_agreement, True, raw=raw)
    yield Check("transformer", label, f"mean KL of next-token distribution vs fp32 ({positions} positions, nats)", mean_kl(logits32, logits), limits.mean_kl, False)


def validation_backend(bundle_dir: Path, precision: str, weight_storage: str = "float") -> OrtBackend:
    """The ONNX Runtime backend the checks run. Graphs with float weights run without MatMul weight
    prepacking, which would add a packed copy of every weight (5.6 GB at the 1.4 B size) beside the
    file-backed pages of the graph's data file: for them packing only reorders the weights for the same
    kernels (the results are bitwise equal; tests/test_validation_memory.py). int8-stored weights run
    packed, as the runtime runs them: their fused kernel (MatMulNBits) computes differently once packed."""
    return OrtBackend(bundle_dir, precision, prepack_weights=weight_storage != "float")


Transform = Callable[[onnx.ModelProto, Path], onnx.ModelProto]  # (graph, the directory of its external data) -> graph


def transformed_bundle(bundle_dir: Path, precision: str, transform: Transform, workdir: Path,
                       weight_storage: str = "float") -> OrtBackend:
    """The bundle's ``precision`` graphs passed through ``transform``, as a bundle in ``workdir``. Each
    graph is loaded without its external data, which the transform and the writer read a tensor at a time."""
    manifest = Bundle(bundle_dir).manifest
    graphs = {}
    for name, by_precision in manifest.graphs.items():
        source = Path(bundle_dir) / by_precision[precision].file
        target = Path(workdir) / source.name
        save_graph(transform(onnx.load(str(source), load_external_data=False), source.parent), target, base_dir=source.parent)
        graphs[name] = {precision: graph_entry(target, precision, weight_storage)}
    write_manifest(workdir, Manifest(model=manifest.model, graphs=graphs, producer=manifest.producer))
    return validation_backend(workdir, precision, weight_storage)


def emulated_fp16_backend(bundle_dir: Path, workdir: Path) -> OrtBackend:
    """The bundle's fp16 graphs with fp16 storage rounding made explicit, as a bundle in ``workdir``.

    ONNX Runtime's CPU kernels run most fp16 ops in fp32 without rounding between them, which would
    hide fp16 overflow and error; the emulation (export/fp16.py) is what fp16 is judged by here.
    """
    return transformed_bundle(bundle_dir, "fp16", lambda model, _: fp16_storage_emulation(model), workdir)
