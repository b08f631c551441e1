"""Token-loop speed: the original loop (full recompute in PyTorch) against the cached sampler.

    python benchmarks/sampler_speed.py [--model default|fixture] [--checkpoint DIR] [--bundle DIR]
        [--sizes 16x16,24x32,32x32,64x40] [--backends torch,ort[,torch-shared,ort-shared,ort-bound,ort-prefill]]
        [--modes original,original-cached,exact,fast,exact-raster,fast-raster]
        [--window-stride 8] [--original-full-max 256] [--original-tokens 24] [--threads N] [--clock wall|cpu]

Sizes are latent rows x columns. Decoding is greedy, batch 1, on random condition tokens (the cost does
not depend on their values). Modes:
- original: training.reference_sampler.reference_greedy, a 511-token forward pass per token. Images
  of more than --original-full-max tokens are not run in full: --original-tokens cells spread over
  the image are computed exactly as the original computes them (teacher-forced on the exact-mode
  image, which gives the original's own logits there, since attention is causal) and the time per
  token is multiplied by the token count; such rows are marked "extrapolated". Every token costs the
  original the same pass, so the extrapolation is linear.
- original-cached (only where the window covers the image, e.g. 16x16): the original's own cached
  sampler, sample_with_past (reference_sampler.reference_greedy_with_past), which concatenates all
  past keys and values before every step; column "vs with_past" is the speedup against it.
- exact, fast: taming_deploy.sampler.sample_tokens in that mode (fast: --window-stride), the
  wavefront order (independent cells' calls batched), which continues a placement's cache across the
  rows of a band; exact-raster, fast-raster: the same calls one cell at a time in raster order.
Backends: torch and ort (the runtime's); not in the default set, the prototypes of prototypes.py:
torch-shared and ort-shared (the cost of the shared-position graph form that bundles exported before
had: calls batched only at equal positions, prefills over the whole empty cache), ort-bound (per-step bindings preallocated) and ort-prefill (calls at position 0 run a graph without
past inputs; needs a checkpoint).
Columns: seconds per image of the token loop alone (wall time, or CPU time with --clock cpu);
tokens/s; speedup against the original's seconds per image at that size; per-cell calls
(prefills/steps) in how many batched transformer calls; transformer MFLOP per token, counted from the call pattern (benchlib; the formula is
printed below the table) and the share of them spent on masked (query, key) pairs; achieved GFLOP/s
and its fraction of the GEMM throughput of the backend's library (torch for torch and the original,
ONNX Runtime for ort), measured in the same run (matmul_peak.py); whether exact-mode tokens equal the
original loop's.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import matmul_peak
import prototypes
from benchlib import (Clock, attention_flops, fastest, ModelPaths, add_model_arguments, apply_common_arguments, cached_call_flops, call_flops,
                      cached_call_masked_flops, full_recompute_flops, full_recompute_masked_flops, note, now,
                      parse_latent, prepare_model, print_table, random_condition_tokens, timed)
from taming_deploy.backends.base import Backend
from taming_deploy.backends.ort_backend import OrtBackend
from taming_deploy.cache_writes import entry_positions
from taming_deploy.sampler import SampleStats, sample_tokens
from taming_deploy.sampling import SamplingOptions, TokenStream
from taming_deploy.spec import ModelSpec
from taming_deploy.windows import clamp, window_shape

DEFAULT_SIZES = "16x16,24x32,32x32,64x40"
MODES = ("original", "original-cached", "exact", "fast", "exact-raster", "fast-raster")
BACKENDS = ("torch", "ort", "torch-shared", "ort-shared", "ort-bound", "ort-prefill")
GREEDY = SamplingOptions(greedy=True)
FLOORS = {((16, 16), "exact"): 20.0, ((24, 32), "exact"): 2.0, ((24, 32), "fast"): 8.0}  # ORT vs original


@dataclass
class Row:
    latent: tuple[int, int]
    backend: str
    mode: str
    seconds: float  # per image, token loop only
    calls: str
    flops: float  # transformer FLOPs per image
    masked_flops: float  # of which on masked (query, key) pairs
    same_as_original: str = "-"
    note: str = ""


# --- the original loop ------------------------------------------------------------------------------

def original_sequence_length(spec: ModelSpec, latent: tuple[int, int]) -> int:
    wh, ww = window_shape(latent, spec.window)
    return (wh * ww if spec.condition.spatial else 1) + wh * ww - 1


def original_token(gpt, cond: np.ndarray, image: np.ndarray, cell: tuple[int, int], spec: ModelSpec) -> np.ndarray:
    """The original loop's computation for one cell (reference_greedy's loop body), on ``image``'s tokens."""
    import torch

    (i, j), (h, w) = cell, image.shape[1:]
    wh, ww = window_shape((h, w), spec.window)
    i0, j0 = clamp(i - wh // 2, 0, h - wh), clamp(j - ww // 2, 0, w - ww)
    n = image.shape[0]
    patch = torch.from_numpy(image[:, i0 : i0 + wh, j0 : j0 + ww].reshape(n, -1))
    cpatch = torch.from_numpy(cond[:, i0 : i0 + wh, j0 : j0 + ww].reshape(n, -1) if cond.ndim == 3 else cond)
    with torch.no_grad():
        logits, _ = gpt(torch.cat((cpatch, patch), dim=1)[:, :-1])
    logits = logits[:, -wh * ww :].reshape(n, wh, ww, -1)[:, i - i0, j - j0, : spec.image_codebook_size]
    return logits.argmax(dim=-1).numpy()


def run_original_full(gpt, cond: np.ndarray, latent: tuple[int, int], spec: ModelSpec) -> tuple[np.ndarray, float]:
    from taming_deploy.training.reference_sampler import reference_greedy

    return timed(lambda: reference_greedy(gpt, cond, latent, spec.window, spec.image_codebook_size))


def run_original_subset(gpt, cond: np.ndarray, image: np.ndarray, spec: ModelSpec, count: int) -> tuple[float, bool | None]:
    """Seconds per token of the original loop over ``count`` cells spread over the image, and whether its
    greedy token equals ``image``'s at every one of them."""
    h, w = image.shape[1:]
    cells = [divmod(int(k), w) for k in np.linspace(0, h * w - 1, count)]
    original_token(gpt, cond, image, cells[0], spec)  # warm-up
    same = True
    started = now()
    for cell in cells:
        same &= bool(np.array_equal(original_token(gpt, cond, image, cell, spec), image[:, cell[0], cell[1]]))
    return (now() - started) / len(cells), same


# --- the cached sampler -----------------------------------------------------------------------------

NEEDS_CHECKPOINT = ("torch", "torch-shared", "ort-prefill")  # backends built from the torch model


def load_backends(names: list[str], model: ModelPaths, threads: int | None, cache_dir: Path) -> dict[str, Backend]:
    backends: dict[str, Backend] = {}
    for name in names:
        if name in NEEDS_CHECKPOINT and model.checkpoint is None:
            note(f"no checkpoint: the {name} backend is left out")
        elif name == "torch":
            from taming_deploy.backends.torch_backend import TorchBackend

            backends[name] = TorchBackend.load(model.checkpoint)
        elif name == "torch-shared":
            backends[name] = prototypes.shared_position_torch_backend(model.checkpoint)
        elif name == "ort":
            backends[name] = OrtBackend(model.bundle, threads=threads)
        elif name == "ort-shared":
            backends[name] = prototypes.SharedPositionOrtBackend(model.bundle, threads=threads)
        elif name == "ort-bound":
            backends[name] = prototypes.BoundOrtBackend(model.bundle, threads=threads)
        else:
            graph = prototypes.cached_prefill_graph(model.checkpoint, cache_dir)
            backends[name] = prototypes.PrefillGraphOrtBackend(model.bundle, graph, threads=threads)
    return backends


def warm_up(backend: Backend) -> None:
    """Session creation and first-call allocations happen here, not in the timed loops."""
    spec = backend.spec
    cache = backend.new_cache(1)
    tokens = np.zeros((1, spec.block_size // 2), dtype=np.int64)
    backend.transformer_step(tokens, 0, cache)
    backend.transformer_step(tokens[:, :1], tokens.shape[1], cache)


def run_sampler(backend: Backend, cond: np.ndarray, latent: tuple[int, int], mode: str, stride: int) -> tuple[np.ndarray, SampleStats]:
    """``exact``/``fast``: the wavefront sampler; ``exact-raster``/``fast-raster``: the same calls one
    cell at a time in raster order (the sampler before the wavefront)."""
    name, _, order = mode.partition("-")
    return sample_tokens(backend, cond, latent, GREEDY, TokenStream.for_batch(0, len(cond)), name, stride,  # type: ignore[arg-type]
                         order="sequential" if order == "raster" else "wavefront")


def run_original_cached(gpt, cond: np.ndarray, latent: tuple[int, int], spec: ModelSpec, repeat: int) -> tuple[np.ndarray, float]:
    """The original's sample_with_past (reference_sampler.reference_greedy_with_past), timed."""
    from taming_deploy.training.reference_sampler import reference_greedy_with_past

    tokens, seconds = fastest(lambda: reference_greedy_with_past(gpt, cond, latent[0] * latent[1], spec.image_codebook_size), repeat)
    return tokens.reshape(-1, *latent), seconds


class CountingBackend:
    """A backend wrapper adding up the FLOPs of every transformer call as the runtime's transformer
    computes them (benchlib.cached_call_flops: the exported graph and the torch backend run the same
    attention over the past slots and the fed tokens), and the part of them on masked pairs. The
    ort-prefill prototype's prefills attend over the fed tokens only (K = T). The continuing calls
    (cached steps) are also counted apart, with their wall time."""

    def __init__(self, backend: Backend):
        self.backend, self.name, self.spec = backend, backend.name, backend.spec
        self.positions_per_entry = getattr(backend, "positions_per_entry", False)
        self.flops = 0
        self.masked_flops = 0
        self.step_flops = 0
        self.step_seconds = 0.0

    def new_cache(self, batch: int):
        return self.backend.new_cache(batch)

    def cache_view(self, cache, start: int, stop: int):
        return self.backend.cache_view(cache, start, stop)

    def transformer_step(self, tokens: np.ndarray, position: int, cache) -> np.ndarray:
        t = tokens.shape[1]
        batch, positions = tokens.shape[0], entry_positions(position, tokens.shape[0])
        if self.name == "ort-prefill" and not positions.any() and t > 1:  # the prototype's graph without past slots
            self.flops += call_flops(self.spec, t, t, 1)
            self.masked_flops += full_recompute_masked_flops(self.spec, t)
        elif self.positions_per_entry and not positions.any():  # a prefill over a one-slot past
            self.flops += call_flops(self.spec, t, 1 + t, 1) * batch
            self.masked_flops += (full_recompute_masked_flops(self.spec, t) + attention_flops(self.spec, t)) * batch
        else:
            self.flops += sum(cached_call_flops(self.spec, t) for _ in range(batch))
            self.masked_flops += sum(cached_call_masked_flops(self.spec, t, int(p)) for p in positions)
        if not positions.any():
            return self.backend.transformer_step(tokens, position, cache)
        started = time.perf_counter()
        logits = self.backend.transformer_step(tokens, position, cache)
        self.step_seconds += time.perf_counter() - started
        self.step_flops += cached_call_flops(self.spec, t) * batch
        return logits


# --- one latent size --------------------------------------------------------------------------------

def measure_size(latent: tuple[int, int], spec: ModelSpec, backends: dict[str, Backend], gpt, modes: list[str],
                 stride: int, full_max: int, subset: int, repeat: int = 1) -> list[Row]:
    """``repeat``: runs of each runtime row and of sample_with_past, the fastest kept (the original's
    full loop, tens of seconds a run, runs once)."""
    h, w = latent
    cond = random_condition_tokens(spec, latent, np.random.default_rng(h * 1000 + w))
    rows: list[Row] = []
    exact_images: list[tuple[Row, np.ndarray]] = []
    if "original-cached" in modes and gpt is not None and window_shape(latent, spec.window) == latent:
        tokens, seconds = run_original_cached(gpt, cond, latent, spec, repeat)
        rows.append(Row(latent, "torch", "original-cached", seconds, f"{h * w} calls", 0, 0))
        progress(rows[-1])
        exact_images.append((rows[-1], tokens))
    for mode in (m for m in modes if not m.startswith("original")):
        for name, backend in backends.items():
            def counted_run(backend: Backend = backend, mode: str = mode) -> tuple[CountingBackend, tuple[np.ndarray, SampleStats]]:
                counted = CountingBackend(backend)
                return counted, run_sampler(counted, cond, latent, mode, stride)

            (counted, (tokens, stats)), seconds = fastest(counted_run, repeat)
            row = Row(latent, name, mode, seconds, f"{stats.prefills}/{stats.steps} in {stats.transformer_calls}", counted.flops,
                      counted.masked_flops)
            rows.append(row)
            if mode.startswith("exact"):
                exact_images.append((row, tokens))
            progress(row)
    if "original" not in modes or gpt is None:
        return rows
    sequence = original_sequence_length(spec, latent)
    per_image_flops = h * w * full_recompute_flops(spec, sequence)
    per_image_masked = h * w * full_recompute_masked_flops(spec, sequence)
    if h * w <= full_max:
        original, seconds = run_original_full(gpt, cond, latent, spec)
        rows.insert(0, Row(latent, "torch", "original", seconds, f"{h * w} full", per_image_flops, per_image_masked))
        for row, tokens in exact_images:
            row.same_as_original = "yes" if np.array_equal(tokens, original) else "NO"
    else:
        checked = exact_images[0][1] if exact_images else np.zeros((1, h, w), dtype=np.int64)
        per_token, same = run_original_subset(gpt, cond, checked, spec, subset)
        rows.insert(0, Row(latent, "torch", "original", per_token * h * w, f"{h * w} full", per_image_flops,
                           per_image_masked, note=f"extrapolated from {subset} timed tokens"))
        if exact_images:
            # the original's tokens at the checked cells, given the first exact image's tokens before them
            exact_images[0][0].same_as_original = f"{'yes' if same else 'NO'} ({subset} cells)"
            for row, tokens in exact_images[1:]:
                row.same_as_original = "yes (= first exact)" if np.array_equal(tokens, checked) else "NO"
    progress(rows[0])
    return rows


def progress(row: Row) -> None:
    print(f"   ... {row.latent[0]}x{row.latent[1]} {row.backend} {row.mode}: {row.seconds:.2f} s/image {row.note}", flush=True)


# --- the megapixel image ----------------------------------------------------------------------------

MEGAPIXEL = (104, 160)  # latent rows x columns: 1280x832 pixels at f = 8, the paper's landscapes


def megapixel_image(bundle: str, threads: int | None, order: str, stride: int) -> dict[str, float]:
    """One fast-mode image of MEGAPIXEL latents on ONNX Runtime, decoded; run in a fresh process so
    that its peak RSS is this image's alone (sampler, caches, both graphs, the decoder's activations)."""
    import resource

    backend = OrtBackend(Path(bundle), threads=threads)
    counted = CountingBackend(backend)
    cond = random_condition_tokens(backend.spec, MEGAPIXEL, np.random.default_rng(0))
    cpu, wall = time.process_time(), time.perf_counter()
    tokens, stats = sample_tokens(counted, cond, MEGAPIXEL, GREEDY, TokenStream.for_batch(0, 1), "fast", stride,
                                  order=order)  # type: ignore[arg-type]
    sample_cpu, sample_wall = time.process_time() - cpu, time.perf_counter() - wall
    image = backend.decode(tokens)
    return {"sample_cpu": sample_cpu, "sample_wall": sample_wall, "total_cpu": time.process_time() - cpu,
            "total_wall": time.perf_counter() - wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "calls": stats.transformer_calls, "pixels": image.shape[2] * image.shape[3],
            "step_gflops": counted.step_flops / counted.step_seconds / 1e9}


def print_megapixel(bundle: Path, threads: int | None, stride: int) -> None:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    peak = matmul_peak.measured_gflops("onnxruntime", threads=threads)
    rows = []
    for order in ("wavefront", "sequential"):
        with context.Pool(1) as pool:
            r = pool.apply(megapixel_image, (str(bundle), threads, order, stride))
        rows.append(r | {"order": order})
        print(f"   ... {MEGAPIXEL[0]}x{MEGAPIXEL[1]} ort fast {order}: {r['total_cpu']:.1f} s CPU", flush=True)
    base = rows[1]["sample_cpu"]
    print(f"\n{MEGAPIXEL[0]}x{MEGAPIXEL[1]} latents (1280x832 px), ONNX Runtime, fast mode stride {stride}, greedy, decoder "
          f"included; fp32 GEMM peak {peak:.1f} GFLOP/s (wall clock, same threads)")
    print_table([[r["order"], str(r["calls"]), f"{r['sample_cpu']:.1f}", f"{r['sample_wall']:.1f}", f"{r['total_cpu']:.1f}",
                  f"{r['total_wall']:.1f}", f"{base / r['sample_cpu']:.2f}x", f"{r['step_gflops']:.1f}",
                  f"{r['step_gflops'] / peak:.0%}", f"{r['peak_rss_mb']:,.0f}"] for r in rows],
                ["order", "transformer calls", "sample CPU s", "sample wall s", "+decode CPU s", "+decode wall s",
                 "sampling speedup", "steps GFLOP/s", "steps of peak", "peak RSS MiB"])


# --- output -----------------------------------------------------------------------------------------

def table_rows(rows: list[Row], peaks: dict[str, float]) -> list[list[str]]:
    """``peaks``: measured GEMM GFLOP/s of the library each backend runs on (torch, ort)."""
    original = {r.latent: r.seconds for r in rows if r.mode == "original"}
    cached = {r.latent: r.seconds for r in rows if r.mode == "original-cached"}
    out = []
    for r in rows:
        tokens = r.latent[0] * r.latent[1]
        gflops = r.flops / r.seconds / 1e9
        speedup = f"{original[r.latent] / r.seconds:.1f}x" if r.latent in original else "-"
        over_cached = f"{cached[r.latent] / r.seconds:.1f}x" if r.latent in cached else "-"
        counted = r.flops > 0  # the original's cached sampler's FLOPs are not counted
        out.append([f"{r.latent[0]}x{r.latent[1]}", r.backend, r.mode, f"{r.seconds:.2f}" + ("*" if r.note else ""),
                    f"{tokens / r.seconds:.1f}", speedup, over_cached, r.calls,
                    f"{r.flops / tokens / 1e6:,.1f}" if counted else "-", f"{r.masked_flops / r.flops:.0%}" if counted else "-",
                    f"{gflops:.1f}" if counted else "-",
                    f"{gflops / peaks[r.backend.split('-')[0]]:.0%}" if counted else "-", r.same_as_original])
    return out


def print_floors(rows: list[Row]) -> None:
    original = {r.latent: r.seconds for r in rows if r.mode == "original"}
    for (latent, mode), floor in FLOORS.items():
        for r in rows:
            if r.latent == latent and r.mode == mode and r.backend == "ort" and latent in original:
                speedup = original[latent] / r.seconds
                print(f"floor ORT {mode} at {latent[0]}x{latent[1]}: {speedup:.1f}x against >= {floor:g}x "
                      f"({'met' if speedup >= floor else 'NOT met'}; aim {2 * floor:g}x)")


def print_formula(spec: ModelSpec) -> None:
    d, L, S, V = spec.n_embd, spec.n_layer, spec.block_size, spec.vocab_size
    print(f"""
Transformer FLOPs (multiply-add = 2 FLOPs; d={d}, layers L={L}, cache slots S={S}, vocab V={V}):
  per call feeding T tokens = T * 24*L*d^2      (per layer Q, K, V, output projection: 4 d^2 MACs; MLP: 8 d^2)
                            + 4*L*T*K*d         (q.k^T and att.v of T queries over K keys)
                            + 2*R*d*V           (the head on R positions)
  cached steps (torch, ort): K = S + T = {S} + T (the S past slots, masked from each entry's position on,
    then the T fed tokens, causally), R = 1 (last position); prefills: K = 1 + T (one masked past slot)
  torch-shared, ort-shared (the shared-position form): prefills too K = S + T
  ort-prefill (prototype): prefills K = T (no past slots), steps as above
  original loop, per token: one call with T = K = R = the window sequence (cond + window - 1 tokens)
  "masked": the share of these FLOPs on (query, key) pairs the mask discards (what a graph attending
    only over the filled slots would not compute)
  not counted: layer norms, softmax, GELU, embeddings (O(d) per token), and memory traffic: the cached
    graph no longer copies the cache; the host writes the T fed tokens' keys and values into it
    (L*2*T*d floats per call).""")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="latent sizes, rows x columns (default: %(default)s)")
    parser.add_argument("--backends", default="torch,ort", help=f"of {', '.join(BACKENDS)} (default: %(default)s)")
    parser.add_argument("--modes", default="original,exact,fast", help=f"of {', '.join(MODES)} (default: %(default)s)")
    parser.add_argument("--window-stride", type=int, default=8, help="fast mode's stride (default: %(default)s)")
    parser.add_argument("--original-full-max", type=int, default=256,
                        help="run the original loop in full up to this many tokens per image (default: %(default)s)")
    parser.add_argument("--original-tokens", type=int, default=24,
                        help="tokens timed for the extrapolated original above that (default: %(default)s)")
    parser.add_argument("--peak-repeat", type=int, default=10, help="GEMM runs for the matmul peak")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each runtime row and of sample_with_past, the fastest reported (default: %(default)s; "
                             "the original's full loop runs once)")
    parser.add_argument("--megapixel", action="store_true",
                        help=f"only the {MEGAPIXEL[0]}x{MEGAPIXEL[1]}-latent fast-mode image with its decoder and peak RSS, "
                             "wavefront and raster order, each in a fresh process")
    args = parser.parse_args(argv)
    sizes = [parse_latent(s) for s in args.sizes.split(",")]
    names, modes = args.backends.split(","), args.modes.split(",")
    for value, allowed in [(n, BACKENDS) for n in names] + [(m, MODES) for m in modes]:
        if value not in allowed:
            parser.error(f"{value!r} is not one of {', '.join(allowed)}")

    threads = apply_common_arguments(args)
    model = prepare_model(args.model, args.checkpoint, args.bundle, args.cache_dir)
    if args.megapixel:
        print(f"model: {model.name}; {threads} threads; load average {os.getloadavg()[0]:.1f}")
        print_megapixel(model.bundle, args.threads, args.window_stride)
        return 0
    backends = load_backends(names, model, args.threads, args.cache_dir)
    for backend in backends.values():
        warm_up(backend)
    spec = OrtBackend(model.bundle).spec
    gpt = None
    if "original" in modes and model.checkpoint is not None:
        from taming_deploy.training.checkpoint import load_model

        gpt = load_model(model.checkpoint).transformer
    peaks = {"torch": matmul_peak.measured_gflops("torch", repeat=args.peak_repeat, threads=args.threads),
             "ort": matmul_peak.measured_gflops("onnxruntime", repeat=args.peak_repeat, threads=args.threads)}
    print(f"model: {model.name}; {threads} threads; {Clock.name} clock; load average {os.getloadavg()[0]:.1f}; measured fp32 GEMM "
          f"1024^3 peak: torch {peaks['torch']:.1f} GFLOP/s, ONNX Runtime {peaks['ort']:.1f} GFLOP/s")
    rows: list[Row] = []
    for latent in sizes:
        rows += measure_size(latent, spec, backends, gpt, modes, args.window_stride, args.original_full_max, args.original_tokens,
                             args.repeat)
    print(f"\nToken loop, batch 1, greedy; load average at the end {os.getloadavg()[0]:.1f}")
    print_table(table_rows(rows, peaks), ["latent", "backend", "mode", "s/image", "tokens/s", "speedup", "vs with_past", "prefills/steps",
                                         "MFLOP/token", "masked", "GFLOP/s", "of peak", "same as original"])
    if any(r.note for r in rows):
        print("* the original loop extrapolated from a timed subset of tokens (see --original-full-max)")
    print_floors(rows)
    print_formula(spec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
