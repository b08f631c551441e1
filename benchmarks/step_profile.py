"""Where the time of one cached ONNX Runtime step goes, and what the prototyped reductions buy.

    python benchmarks/step_profile.py [--model default|fixture] [--checkpoint DIR | --bundle DIR]
        [--steps 100] [--repeat 7] [--loop-sizes 16x16,24x32] [--threads N] [--clock wall|cpu]

Prints
1. the parts of one step at position 300 of a 511-token window (batch 1): the sampler's own work per
   token (sample_tokens over a backend that returns stored logits), then each line of
   OrtBackend.transformer_step timed separately (an instrumented copy of it);
2. the kernel time inside the ONNX Runtime run by operator type (ORT's profiler), for the bundle's
   graph and for the split-cache step graph of prototypes.py;
3. per-step and prefill time of the prototypes in prototypes.py and of session-option variants,
   timed interleaved (best of --repeat blocks of --steps steps), against the runtime's backend;
4. whole token loops (greedy) at --loop-sizes in exact and fast mode: the runtime's backend and
   sampler against the split-cache backend and the placement-reusing sampler, with a check that
   every variant samples the runtime's tokens.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

import prototypes
from benchlib import (Clock, ModelPaths, add_model_arguments, apply_common_arguments, best_seconds, note, now,
                      parse_latent, prepare_model, print_table, random_condition_tokens, timed)
from taming_deploy.backends.base import Backend
from taming_deploy.backends.ort_backend import OrtBackend
from taming_deploy.sampler import sample_tokens
from taming_deploy.sampling import SamplingOptions, choose_tokens
from taming_deploy.spec import ModelSpec

GREEDY = SamplingOptions(greedy=True)
RUNTIME = "runtime OrtBackend"
SPLIT = "split-cache graphs"


@dataclass(frozen=True)
class Probe:
    """The tokens the timed calls feed: steps from ``position`` on, prefills of ``prefill`` tokens."""

    sequence: np.ndarray  # (1, one window's sequence) random image tokens
    position: int  # 300 for the 16x16 window: cond (256) + 44 window tokens
    prefill: int  # 390 for the 16x16 window: a typical exact-mode prefill (DESIGN.md)

    @classmethod
    def for_spec(cls, spec: ModelSpec) -> "Probe":
        length = spec.window[0] * spec.window[1] * (2 if spec.condition.spatial else 1) - 1
        sequence = np.random.default_rng(0).integers(0, spec.image_codebook_size, (1, length))
        return cls(sequence, max(1, min(300, length - 64)), min(390, length))

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

    def transformer_step(self, tokens: np.ndarray, position: int, cache: None) -> np.ndarray:
        return self.logits


def sampler_seconds_per_token(spec: ModelSpec, options: SamplingOptions) -> float:
    """sample_tokens at one window (one prefill, then single steps) over stored logits."""
    rng = np.random.default_rng(0)
    backend = StoredLogitsBackend(spec, rng.normal(size=(1, spec.vocab_size)).astype(np.float32))
    wh, ww = spec.window
    cond = random_condition_tokens(spec, (wh, ww), rng)
    seconds = best_seconds(lambda: sample_tokens(backend, cond, (wh, ww), options, rng), repeat=5)
    return seconds / (wh * ww)


def instrumented_step(backend: OrtBackend, tokens: np.ndarray, position: int, cache, parts: dict[str, list[float]]) -> None:
    """OrtBackend.transformer_step, line for line, with a clock between the lines."""
    clock = [now()]

    def mark(part: str) -> None:
        clock.append(now())
        parts[part].append(clock[-1] - clock[-2])

    session = backend.session("transformer")
    binding = session.io_binding()
    mark("session lookup + new IOBinding")
    binding.bind_cpu_input("tokens", np.ascontiguousarray(tokens, dtype=np.int64))
    binding.bind_cpu_input("position", np.array(position, dtype=np.int64))
    mark("bind tokens + position (copied in)")
    binding.bind_ortvalue_input("cache", cache.current)
    binding.bind_ortvalue_output("logits", cache.logits)
    binding.bind_ortvalue_output("new_cache", cache.spare)
    mark("bind cache + outputs")
    session.run_with_iobinding(binding)
    mark("run_with_iobinding (the graph)")
    cache.current, cache.spare = cache.spare, cache.current
    cache.logits.numpy().copy()
    mark("swap buffers + copy logits out")


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
    rng = np.random.default_rng(0)
    choose_greedy = best_seconds(lambda: choose_tokens(logits, GREEDY, rng), repeat=200)
    choose_topk = best_seconds(lambda: choose_tokens(logits, SamplingOptions(top_k=100), rng), repeat=200)
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

def kernel_profile(make: Callable[[ort.SessionOptions], tuple[Backend, Callable[[], ort.InferenceSession]]],
                   threads: int | None, probe: Probe, steps: int) -> tuple[list[tuple[str, float, int]], float]:
    """Per operator type: microseconds per step and nodes per step, from ORT's profiler; and the profiled
    run's median duration (the profiler adds its own overhead). ``make(options)`` builds the backend
    and says which session runs its steps."""
    with tempfile.TemporaryDirectory() as tmp:
        options = prototypes.tuned_session_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        backend, session = make(options)
        cache = backend.new_cache(1)
        backend.transformer_step(probe.sequence[:, : probe.position], 0, cache)
        for k in range(steps + 1):
            probe.step(backend, cache, k)
        events = json.loads(Path(session().end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][-steps - 1 :]
    after_first = runs[0]["ts"] + runs[0]["dur"]  # the first step is a warm-up (or the prefill)
    time_by_op: collections.Counter = collections.Counter()
    nodes_by_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] > after_first:
            time_by_op[e["args"]["op_name"]] += e["dur"]
            nodes_by_op[e["args"]["op_name"]] += 1
    rows = [(op, us / steps, nodes_by_op[op] // steps) for op, us in time_by_op.most_common()]
    return rows, statistics.median(r["dur"] for r in runs[1:])


def print_kernel_profile(title: str, rows: list[tuple[str, float, int]], run_us: float) -> None:
    total = sum(us for _, us, _ in rows)
    shown = [r for r in rows if r[1] >= 0.01 * total]
    table = [[op, f"{us:.1f}", f"{us / total:.1%}", str(nodes)] for op, us, nodes in shown]
    rest = sum(us for _, us, _ in rows[len(shown):])
    table.append([f"other ({len(rows) - len(shown)} op types)", f"{rest:.1f}", f"{rest / total:.1%}", ""])
    print(f"\n{title}: kernel time per step by operator type (ORT profiler; profiled run median {run_us:.0f} us, "
          f"kernels {total:.0f} us)")
    print_table(table, ["op type", "us", "share", "nodes"])
    copies = sum(us for op, us, _ in rows if op in ("Where", "Concat", "Split", "Gather", "Squeeze", "Unsqueeze"))
    matmul = sum(us for op, us, _ in rows if op in ("MatMul", "FusedMatMul", "Gemm"))
    print(f"   matrix products (MatMul, FusedMatMul, Gemm): {matmul / total:.0%}; cache writes, stacks and "
          f"slices (Where, Concat, Split, Gather, Squeeze, Unsqueeze): {copies / total:.0%}")


def print_kernel_profiles(model: ModelPaths, threads: int | None, probe: Probe, steps: int, cache_dir: Path) -> None:
    def runtime(options: ort.SessionOptions):
        backend = OrtBackend(model.bundle, threads=threads)
        backend.options = options
        return backend, lambda: backend.session("transformer")

    print_kernel_profile("2. inside the runtime's run_with_iobinding", *kernel_profile(runtime, threads, probe, steps))
    if model.checkpoint is None:
        return
    graphs = prototypes.cached_split_cache_graphs(model.checkpoint, cache_dir)

    def split(options: ort.SessionOptions):
        backend = prototypes.SplitCacheOrtBackend(OrtBackend(model.bundle, threads=threads), graphs, options)
        return backend, lambda: backend.step_session

    print_kernel_profile("   the split-cache step graph instead", *kernel_profile(split, threads, probe, steps))


# --- 3. variants of the step ------------------------------------------------------------------------

def variants(model: ModelPaths, threads: int | None, cache_dir: Path) -> list[Variant]:
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
        Variant("persistent IOBinding", lambda: prototypes.BoundOrtBackend(bundle, threads=threads)),
        Variant("runtime, spinning off", runtime(spinning=False)),
        Variant("runtime, 1 thread", runtime(1)),
        Variant("runtime, no memory pattern, no arena", runtime(memory_pattern=False, arena=False)),
    ]
    if model.checkpoint is None:
        note("no checkpoint: the split-cache graphs cannot be exported, their rows are left out")
        return found
    graphs = prototypes.cached_split_cache_graphs(model.checkpoint, cache_dir)

    def split(count: int | None = threads, **knobs) -> Callable[[], Backend]:
        return lambda: prototypes.SplitCacheOrtBackend(
            OrtBackend(bundle, threads=count), graphs, prototypes.tuned_session_options(count, **knobs))

    return found + [
        Variant(SPLIT, split()),
        Variant(f"{SPLIT}, spinning off", split(spinning=False)),
        Variant(f"{SPLIT}, 1 thread", split(1)),
    ]


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


# --- 4. whole loops ---------------------------------------------------------------------------------

def print_loops(found: list[Variant], spec: ModelSpec, sizes: list[tuple[int, int]], stride: int) -> None:
    chosen = [v for v in found if v.name in (RUNTIME, SPLIT)]
    backends = [(v.name, v.make()) for v in chosen]
    samplers = (("sample_tokens", sample_tokens), ("reusing placements", prototypes.sample_tokens_reusing))
    rows = []
    for h, w in sizes:
        cond = random_condition_tokens(spec, (h, w), np.random.default_rng(0))
        for mode in ("exact", "fast"):
            reference = None
            for backend_name, backend in backends:
                for sampler_name, sampler in samplers:
                    (tokens, stats), seconds = timed(
                        lambda: sampler(backend, cond, (h, w), GREEDY, np.random.default_rng(0), mode=mode, stride=stride))
                    if reference is None:
                        reference, baseline = tokens, seconds
                    rows.append([f"{h}x{w}", mode, backend_name, sampler_name, f"{stats.prefills}/{stats.steps}",
                                 f"{seconds:.2f}", f"{h * w / seconds:.0f}", f"{baseline / seconds:.2f}x",
                                 "yes" if np.array_equal(tokens, reference) else "NO"])
                    print_progress(rows[-1])
    print("\n4. whole token loops, batch 1, greedy (speedup and tokens against the runtime's row above)")
    print_table(rows, ["latent", "mode", "backend", "sampler", "prefills/steps", "s/image", "tokens/s", "speedup", "same tokens"])


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
    print_kernel_profiles(model, args.threads, probe, args.steps, args.cache_dir)
    found = variants(model, args.threads, args.cache_dir)
    print_variant_steps(found, probe, args.steps, args.repeat)
    if args.loop_sizes:
        print_loops(found, spec, args.loop_sizes, args.window_stride)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
