"""Where the time of one cached ONNX Runtime step goes, and what the alternatives left would buy.

    python benchmarks/step_profile.py [--model default|fixture] [--checkpoint DIR | --bundle DIR]
        [--steps 100] [--repeat 7] [--loop-sizes 16x16,24x32] [--threads N] [--clock wall|cpu]

Prints
1. the parts of one step at position 300 of a 511-token window (batch 1): the sampler's own work per
   token (sample_tokens over a backend that returns stored logits), then each line of
   OrtBackend.transformer_step timed separately (an instrumented copy of it);
2. the kernel time inside the ONNX Runtime run by operator type (ORT's profiler), for a step and for
   a prefill;
3. per-step and prefill time of the alternatives in prototypes.py (persistent bindings, session
   options, a prefill graph without past inputs), timed interleaved (best of --repeat blocks of
   --steps steps), against the runtime's backend;
4. placement reuse across rows by cache budget (prefill counts, no model needed), then whole token
   loops (greedy) at --loop-sizes in exact and fast mode: the runtime, the runtime's sampler with a
   cache budget of one placement (about the sampler before placement reuse), the persistent
   bindings and the prefill graph, with a check that every variant samples the runtime's tokens.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import statistics
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

import prototypes
from benchlib import (Clock, ModelPaths, add_model_arguments, apply_common_arguments, best_seconds, note, now,
                      parse_latent, prepare_model, print_table, random_condition_tokens, timed)
from taming_deploy import sampler as sampler_module
from taming_deploy.backends.base import Backend
from taming_deploy.backends.ort_backend import OrtBackend
from taming_deploy.cache_writes import check_fits, entry_positions, write_new_kv
from taming_deploy.sampler import sample_tokens
from taming_deploy.sampling import SamplingOptions, TokenStream, choose_tokens
from taming_deploy.spec import ModelSpec
from taming_deploy.windows import Mode, schedule

GREEDY = SamplingOptions(greedy=True)
RUNTIME = "runtime OrtBackend"
BOUND = "persistent bindings"
PREFILL = "prefill graph at position 0"
SHARED = "shared-position form (prefills over the whole empty cache)"


@dataclass(frozen=True)
class Probe:
    """The tokens the timed calls feed: steps from ``position`` on, prefills of ``prefill`` tokens."""

    sequence: np.ndarray  # (1, one window's sequence) random image tokens
    position: int  # 300 for the 16x16 window: cond (256) + 44 window tokens
    prefill: int  # 390 for the 16x16 window: a typical exact-mode prefill (DESIGN.md)
    slots: int  # the cache's slots (block size), all attended to by every call

    @classmethod
    def for_spec(cls, spec: ModelSpec) -> "Probe":
        length = spec.window[0] * spec.window[1] * (2 if spec.condition.spatial else 1) - 1
        sequence = np.random.default_rng(0).integers(0, spec.image_codebook_size, (1, length))
        return cls(sequence, max(1, min(300, length - 64)), min(390, length), spec.block_size)

    def step(self, backend: Backend, cache, k: int) -> None:
        """The k-th timed step (positions wrap round before the sequence's end)."""
        p = self.position + k % (self.sequence.shape[1] - self.position)
        backend.transformer_step(self.sequence[:, p : p + 1], p, cache)


@dataclass
class Variant:
    name: str
    make: Callable[[], Backend]


# --- 1. the parts of one step -----------------------------------------------------------------------

class StoredLogitsBackend:
    """A backend whose transformer costs nothing: what is left of a sampler run is the sampler itself."""

    name = "none"

    def __init__(self, spec: ModelSpec, logits: np.ndarray):
        self.spec, self.logits = spec, logits

    def new_cache(self, batch: int) -> None:
        return None

    def cache_view(self, cache: None, start: int, stop: int) -> None:
        return None

    def transformer_step(self, tokens: np.ndarray, position: int, cache: None) -> np.ndarray:
        return np.repeat(self.logits, tokens.shape[0], axis=0)


def sampler_seconds_per_token(spec: ModelSpec, options: SamplingOptions) -> float:
    """sample_tokens at one window (one prefill, then single steps) over stored logits."""
    rng = np.random.default_rng(0)
    backend = StoredLogitsBackend(spec, rng.normal(size=(1, spec.vocab_size)).astype(np.float32))
    wh, ww = spec.window
    cond = random_condition_tokens(spec, (wh, ww), rng)
    seconds = best_seconds(lambda: sample_tokens(backend, cond, (wh, ww), options, TokenStream.for_batch(0, 1)), repeat=5)
    return seconds / (wh * ww)


def instrumented_step(backend: OrtBackend, tokens: np.ndarray, position: int, cache, parts: dict[str, list[float]]) -> np.ndarray:
    """OrtBackend.transformer_step, line for line, with a clock between the lines."""
    clock = [now()]

    def mark(part: str) -> None:
        clock.append(now())
        parts[part].append(clock[-1] - clock[-2])

    positions = entry_positions(position, tokens.shape[0])
    check_fits(positions, tokens.shape[1], backend.spec.block_size)
    binding = cache.binding
    if backend.positions_per_entry and not positions.any():
        if cache.prefill is None:
            cache.prefill = backend._binding(np.zeros((*cache.kv.shape[:4], 1, cache.kv.shape[5]), cache.kv.dtype), cache.logits)
        binding = cache.prefill
    mark("choose the binding (prefill: one zero past slot)")
    binding.bind_cpu_input("position", positions if backend.positions_per_entry else np.array(positions[0]))
    binding.bind_cpu_input("tokens", np.ascontiguousarray(tokens, dtype=np.int64))
    mark("bind tokens + position (copied in)")
    binding.bind_output("new_kv", "cpu")
    mark("bind new_kv output (allocated by ORT per call)")
    session = backend.session("transformer")
    mark("session lookup")
    session.run_with_iobinding(binding)
    mark("run_with_iobinding (the graph)")
    new_kv = binding.get_outputs()[1].numpy()
    mark("fetch new_kv (get_outputs, numpy)")
    write_new_kv(cache.kv, new_kv, positions)
    mark("write new_kv into its cache slots")
    logits = cache.logits.copy()
    mark("copy logits out")
    return logits


def step_parts(bundle: Path, threads: int | None, probe: Probe, steps: int) -> tuple[dict[str, float], float]:
    """Median seconds per part over ``steps`` instrumented steps, and the uninstrumented median."""
    backend = OrtBackend(bundle, threads=threads)
    cache = backend.new_cache(1)
    backend.transformer_step(probe.sequence[:, : probe.position], 0, cache)
    parts: dict[str, list[float]] = collections.defaultdict(list)
    plain = []
    for k in range(steps):
        p = probe.position + k % (probe.sequence.shape[1] - probe.position)
        instrumented_step(backend, probe.sequence[:, p : p + 1], p, cache, parts)
        started = now()
        probe.step(backend, cache, k)
        plain.append(now() - started)
    return {part: statistics.median(times) for part, times in parts.items()}, statistics.median(plain)


def print_step_parts(spec: ModelSpec, bundle: Path, threads: int | None, probe: Probe, steps: int) -> None:
    parts, plain = step_parts(bundle, threads, probe, steps)
    argmax = sampler_seconds_per_token(spec, GREEDY)
    topk = sampler_seconds_per_token(spec, SamplingOptions(top_k=100))
    logits = np.random.default_rng(0).normal(size=(1, spec.vocab_size)).astype(np.float32)
    uniforms = TokenStream.for_batch(0, 1).uniforms(np.zeros(1, np.int64), np.zeros(1), np.zeros(1))
    choose_greedy = best_seconds(lambda: choose_tokens(logits, GREEDY, uniforms), repeat=200)
    choose_topk = best_seconds(lambda: choose_tokens(logits, SamplingOptions(top_k=100), uniforms), repeat=200)
    total = sum(parts.values()) + argmax
    rows = [["sampler per token: window slice, feed, bookkeeping, argmax", f"{argmax * 1e6:.1f}", f"{argmax / total:.1%}"]]
    rows += [[f"OrtBackend: {part}", f"{seconds * 1e6:.1f}", f"{seconds / total:.1%}"] for part, seconds in parts.items()]
    rows += [
        ["sum of the parts", f"{total * 1e6:.1f}", "100%"],
        ["one uninstrumented transformer_step (median)", f"{plain * 1e6:.1f}", ""],
        ["  of the sampler: choose_tokens greedy alone", f"{choose_greedy * 1e6:.1f}", ""],
        ["  with top-k 100 sampling, choose_tokens alone", f"{choose_topk * 1e6:.1f}", ""],
        ["  with top-k 100 sampling, the sampler per token", f"{topk * 1e6:.1f}", ""],
    ]
    print(f"\n1. one cached step at position {probe.position}, batch 1 (medians of {steps} steps)")
    print_table(rows, ["part", "us", "share"])


# --- 2. inside the run ------------------------------------------------------------------------------

def kernel_profile(backend_options: Callable[[ort.SessionOptions], OrtBackend], call: Callable[[Backend, object, int], None],
                   probe: Probe, threads: int | None, calls: int) -> tuple[list[tuple[str, float, int]], float]:
    """Per operator type: microseconds per call and nodes per call, from ORT's profiler, over ``calls``
    calls ``call(backend, cache, k)`` after a prefill of probe.position tokens and one warm-up call; and the
    profiled runs' median duration (the profiler adds its own overhead)."""
    with tempfile.TemporaryDirectory() as tmp:
        options = prototypes.tuned_session_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        backend = backend_options(options)
        cache = backend.new_cache(1)
        backend.transformer_step(probe.sequence[:, : probe.position], 0, cache)
        for k in range(calls + 1):
            call(backend, cache, k)
        events = json.loads(Path(backend.session("transformer").end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][-calls - 1 :]
    after_first = runs[0]["ts"] + runs[0]["dur"]  # the first call is a warm-up
    time_by_op: collections.Counter = collections.Counter()
    nodes_by_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] > after_first:
            time_by_op[e["args"]["op_name"]] += e["dur"]
            nodes_by_op[e["args"]["op_name"]] += 1
    rows = [(op, us / calls, nodes_by_op[op] // calls) for op, us in time_by_op.most_common()]
    return rows, statistics.median(r["dur"] for r in runs[1:])


MATRIX_PRODUCTS = ("MatMul", "FusedMatMul", "Gemm")
DATA_MOVEMENT = ("Concat", "Slice", "Split", "Gather", "Where", "Expand", "Transpose", "Reshape", "Squeeze", "Unsqueeze")


def print_kernel_profile(title: str, rows: list[tuple[str, float, int]], run_us: float) -> None:
    total = sum(us for _, us, _ in rows)
    shown = [r for r in rows if r[1] >= 0.01 * total]
    table = [[op, f"{us:.1f}", f"{us / total:.1%}", str(nodes)] for op, us, nodes in shown]
    rest = sum(us for _, us, _ in rows[len(shown):])
    table.append([f"other ({len(rows) - len(shown)} op types)", f"{rest:.1f}", f"{rest / total:.1%}", ""])
    print(f"\n{title}: kernel time per call by operator type (ORT profiler; profiled run median {run_us:.0f} us, "
          f"kernels {total:.0f} us)")
    print_table(table, ["op type", "us", "share", "nodes"])
    matmul = sum(us for op, us, _ in rows if op in MATRIX_PRODUCTS)
    moves = sum(us for op, us, _ in rows if op in DATA_MOVEMENT)
    print(f"   matrix products ({', '.join(MATRIX_PRODUCTS)}): {matmul / total:.0%}; data movement "
          f"({', '.join(DATA_MOVEMENT)}): {moves / total:.0%}")


def print_kernel_profiles(model: ModelPaths, threads: int | None, probe: Probe, steps: int) -> None:
    def runtime(options: ort.SessionOptions) -> OrtBackend:
        backend = OrtBackend(model.bundle, threads=threads)
        backend.options = options
        return backend

    def prefill(backend: Backend, cache, k: int) -> None:
        backend.transformer_step(probe.sequence[:, : probe.prefill], 0, cache)

    print_kernel_profile(f"2. inside the runtime's run_with_iobinding, a step at position {probe.position}+",
                         *kernel_profile(runtime, probe.step, probe, threads, steps))
    print_kernel_profile(f"   a prefill of {probe.prefill} tokens (attending over the {probe.slots} masked past slots "
                         "and the fed tokens)", *kernel_profile(runtime, prefill, probe, threads, max(3, steps // 20)))


# --- 3. variants of the step ------------------------------------------------------------------------

def variants(model: ModelPaths, threads: int | None, cache_dir: Path) -> list[Variant]:
    """The runtime, then the alternatives. The thread-pool knobs are left out with one thread: ONNX
    Runtime then runs without a pool, so spinning and thread counts change nothing. The prefill graph
    is exported from the checkpoint (left out with a bundle alone)."""
    bundle = model.bundle

    def runtime(count: int | None = threads, **knobs) -> Callable[[], Backend]:
        def make() -> Backend:
            backend = OrtBackend(bundle, threads=count)
            if knobs:
                backend.options = prototypes.tuned_session_options(count, **knobs)
            return backend
        return make

    found = [
        Variant(RUNTIME, runtime()),
        Variant(BOUND, lambda: prototypes.BoundOrtBackend(bundle, threads=threads)),
        Variant("runtime, no memory pattern, no arena", runtime(memory_pattern=False, arena=False)),
        Variant(SHARED, lambda: prototypes.SharedPositionOrtBackend(bundle, threads=threads)),
    ]
    if threads != 1:
        found += [Variant("runtime, spinning off", runtime(spinning=False)), Variant("runtime, 1 thread", runtime(1))]
    if model.checkpoint is None:
        note("no checkpoint: the prefill graph cannot be exported, its rows are left out")
    else:
        graph = prototypes.cached_prefill_graph(model.checkpoint, cache_dir)
        found.append(Variant(PREFILL, lambda: prototypes.PrefillGraphOrtBackend(bundle, graph, threads=threads)))
    return found


def step_block(backend: Backend, cache, probe: Probe, steps: int) -> None:
    for k in range(steps):
        probe.step(backend, cache, k)


def print_variant_steps(found: list[Variant], probe: Probe, steps: int, repeat: int) -> None:
    """Blocks of every variant interleaved, so that load changes hit all of them alike; best block kept."""
    backends = [v.make() for v in found]
    caches = [b.new_cache(1) for b in backends]
    for backend, cache in zip(backends, caches):
        backend.transformer_step(probe.sequence[:, : probe.position], 0, cache)
        step_block(backend, cache, probe, 3)
    step_best = [float("inf")] * len(found)
    prefill_best = [float("inf")] * len(found)
    for _ in range(repeat):
        for k, (backend, cache) in enumerate(zip(backends, caches)):
            started = now()
            step_block(backend, cache, probe, steps)
            step_best[k] = min(step_best[k], (now() - started) / steps)
            started = now()
            backend.transformer_step(probe.sequence[:, : probe.prefill], 0, cache)
            prefill_best[k] = min(prefill_best[k], now() - started)
    rows = [[v.name, f"{s * 1e3:.3f}", f"{step_best[0] / s:.2f}x", f"{p * 1e3:.1f}", f"{prefill_best[0] / p:.2f}x"]
            for v, s, p in zip(found, step_best, prefill_best)]
    print(f"\n3. variants, interleaved, best of {repeat} blocks of {steps} steps at positions {probe.position}+ "
          f"and of {repeat} prefills of {probe.prefill} tokens")
    print_table(rows, ["variant", "ms/step", "vs runtime", f"ms/prefill-{probe.prefill}", "vs runtime"])


# --- 4. placement reuse and whole loops ---------------------------------------------------------------

@contextlib.contextmanager
def cache_budget(placements: int | None) -> Iterator[None]:
    """Run the runtime's sampler keeping at most ``placements`` caches (None: its own memory budget)."""
    original = sampler_module.cache_capacity
    if placements is not None:
        sampler_module.cache_capacity = lambda backend, batch: placements
    try:
        yield
    finally:
        sampler_module.cache_capacity = original


def band_columns(latent: tuple[int, int], window: tuple[int, int], mode: Mode, stride: int) -> int:
    """The most window columns (left offsets) a band of rows with one window top uses."""
    lefts: dict[int, set[int]] = collections.defaultdict(set)
    for placement in schedule(latent, window, mode, stride):
        lefts[placement.top].add(placement.left)
    return max(len(v) for v in lefts.values())


def largest_full_reuse_batch(spec: ModelSpec, columns: int, limit: int = 4096) -> int:
    """The largest batch for which the runtime's memory budget keeps a cache for every column of a band."""
    backend = StoredLogitsBackend(spec, np.zeros((1, spec.vocab_size), np.float32))
    batch = 0
    while batch < limit and sampler_module.cache_capacity(backend, batch + 1) >= columns:
        batch += 1
    return batch


def reuse_rows(spec: ModelSpec, sizes: list[tuple[int, int]], stride: int) -> list[list[str]]:
    """Prefills/steps and fed tokens by cache budget: the runtime's (batch 1), one placement short of a
    band's columns (LRU then evicts every cache before its next use), one placement."""
    logits = np.zeros((1, spec.vocab_size), np.float32)
    backend = StoredLogitsBackend(spec, logits)
    rows = []
    for latent in sizes:
        cond = random_condition_tokens(spec, latent, np.random.default_rng(0))
        for mode in ("exact", "fast"):
            columns = band_columns(latent, spec.window, mode, stride)  # type: ignore[arg-type]
            cells = []
            for budget in (None, columns - 1, 1):
                if budget == 0:
                    cells.append("-")
                    continue
                with cache_budget(budget):
                    _, stats = sample_tokens(backend, cond, latent, GREEDY, TokenStream.for_batch(0, len(cond)), mode, stride)  # type: ignore[arg-type]
                cells.append(f"{stats.prefills}/{stats.steps} ({stats.fed_tokens})")
            rows.append([f"{latent[0]}x{latent[1]}", mode, str(columns), *cells, str(largest_full_reuse_batch(spec, columns))])
    return rows


def print_reuse(spec: ModelSpec, sizes: list[tuple[int, int]], stride: int) -> None:
    capacity = sampler_module.cache_capacity(StoredLogitsBackend(spec, np.zeros((1, 1))), 1)
    print(f"\n4. placement reuse across rows by cache budget: prefills/steps (fed tokens); the runtime keeps "
          f"{capacity} caches at batch 1 ({sampler_module.CACHE_MEMORY_BUDGET >> 20} MiB)")
    print_table(reuse_rows(spec, sizes, stride), ["latent", "mode", "columns/band", "runtime budget",
                                                 "columns - 1", "1 placement", "full reuse up to batch"])


def print_loops(found: list[Variant], spec: ModelSpec, probe: Probe, sizes: list[tuple[int, int]], stride: int) -> None:
    made = {v.name: v.make() for v in found if v.name in (RUNTIME, BOUND, PREFILL)}
    setups: list[tuple[str, Backend, int | None]] = [
        (RUNTIME, made[RUNTIME], None),
        ("runtime, cache budget 1 placement", made[RUNTIME], 1),
    ] + [(name, backend, None) for name, backend in made.items() if name != RUNTIME]
    for _, backend, _ in setups:  # session creation and first-call allocations outside the timed loops
        cache = backend.new_cache(1)
        backend.transformer_step(probe.sequence[:, : probe.prefill], 0, cache)
        probe.step(backend, cache, 0)
    rows = []
    for h, w in sizes:
        cond = random_condition_tokens(spec, (h, w), np.random.default_rng(0))
        for mode in ("exact", "fast"):
            reference = None
            for name, backend, budget in setups:
                with cache_budget(budget):
                    (tokens, stats), seconds = timed(
                        lambda: sample_tokens(backend, cond, (h, w), GREEDY, TokenStream.for_batch(0, len(cond)), mode=mode, stride=stride))
                if reference is None:
                    reference, baseline = tokens, seconds
                rows.append([f"{h}x{w}", mode, name, f"{stats.prefills}/{stats.steps}", str(stats.fed_tokens),
                             f"{seconds:.2f}", f"{h * w / seconds:.0f}", f"{baseline / seconds:.2f}x",
                             "yes" if np.array_equal(tokens, reference) else "NO"])
                print_progress(rows[-1])
    print("\n   whole token loops, batch 1, greedy (speedup and tokens against the runtime's row)")
    print_table(rows, ["latent", "mode", "variant", "prefills/steps", "fed tokens", "s/image", "tokens/s", "speedup",
                       "same tokens"])


def print_progress(row: list[str]) -> None:
    print("   ... " + " ".join(row), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--steps", type=int, default=100, help="steps per timed block")
    parser.add_argument("--repeat", type=int, default=7, help="timed blocks per variant")
    parser.add_argument("--loop-sizes", type=lambda s: [parse_latent(v) for v in s.split(",")] if s else [],
                        default="16x16,24x32", help="latent sizes of the whole-loop comparison ('' for none)")
    parser.add_argument("--window-stride", type=int, default=8)
    args = parser.parse_args(argv)
    apply_common_arguments(args)
    model = prepare_model(args.model, args.checkpoint, args.bundle, args.cache_dir)
    spec = OrtBackend(model.bundle).spec
    probe = Probe.for_spec(spec)
    print(f"model: {model.name}; ONNX Runtime {ort.__version__}, threads {args.threads or 'all'}, {Clock.name} clock")
    print_step_parts(spec, model.bundle, args.threads, probe, args.steps)
    print_kernel_profiles(model, args.threads, probe, args.steps)
    found = variants(model, args.threads, args.cache_dir)
    print_variant_steps(found, probe, args.steps, args.repeat)
    if args.loop_sizes:
        print_reuse(spec, args.loop_sizes, args.window_stride)
        print_loops(found, spec, probe, args.loop_sizes, args.window_stride)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
