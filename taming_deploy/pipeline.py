"""The Python API: load a model once, generate images from conditions, from any number of threads."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from taming_deploy.backends import BackendName, load_backend
from taming_deploy.backends.base import Backend
from taming_deploy.conditions import (
    ImageSource,
    check_class_id,
    read_condition_image,
    read_depth_map,
    read_label_map,
    resize_condition_image,
    resize_depth,
    resize_labels,
    snap_size,
)
from taming_deploy.errors import UserError
from taming_deploy.images import to_pil
from taming_deploy.sampler import sample_tokens
from taming_deploy.sampling import SamplingOptions, TokenStream
from taming_deploy.spec import ModelSpec
from taming_deploy.validation import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_WINDOW_STRIDE,
    check_generation_size,
    check_max_pixels,
    check_request,
    normalize_condition,
)
from taming_deploy.windows import Mode

Condition = ImageSource | int | None


@dataclass
class Generation:
    images: list[Image.Image]
    tokens: np.ndarray  # (N, h, w) int64
    stats: dict = field(default_factory=dict)


class Pipeline:
    """A model on one backend.

    Thread safety: ``generate`` and ``generate_batch`` hold one lock per pipeline, so concurrent calls
    from several threads are safe and run one after another (each call's result is the same as if it
    ran alone). For throughput, batch requests: ``n`` images of one condition, or ``generate_batch``
    for requests with different conditions and seeds.
    """

    def __init__(self, backend: Backend):
        if not isinstance(getattr(backend, "spec", None), ModelSpec):
            raise UserError(f"Pipeline takes a loaded backend, not {type(backend).__name__}; "
                            "Pipeline.load(path, backend) loads a model")
        self.backend = backend
        self.spec = backend.spec
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path | str | None = None, backend: BackendName = "auto", **backend_options) -> "Pipeline":
        """``path``: an exported bundle or a project checkpoint; None: the embedded default model.
        ``backend_options`` (e.g. ``note``) go to ``taming_deploy.backends.load_backend``."""
        return cls(load_backend(path, backend, **backend_options))

    def condition_tokens(self, cond: Condition, size: tuple[int, int] | None,
                         max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
        """A user's condition -> (condition tokens (1, h, w) or (1, 1), latent grid (h, w)).

        ``size`` = (width, height) in pixels; spatial conditions default to their own size. Sizes are
        rounded to the downsampling factor. Condition images beyond ``max_pixels`` are not read.
        """
        cond = normalize_condition(cond)
        cspec, factor = self.spec.condition, self.spec.downsample_factor
        if cspec.spatial:
            if cond is None or isinstance(cond, int):
                raise UserError(f"this model is conditioned on a {cspec.kind} map: pass one (--cond FILE)")
            if cspec.kind == "segmentation":
                labels = read_label_map(cond, cspec, max_pixels)
                width, height = snap_size(*(size or labels.shape[::-1]), factor)
                array = resize_labels(labels, (width, height))[None]
            elif cspec.kind == "depth":
                depth = read_depth_map(cond, max_pixels)
                width, height = snap_size(*(size or depth.shape[::-1]), factor)
                array = resize_depth(depth, (width, height))[None, None]
            else:
                image = read_condition_image(cond, max_pixels)
                width, height = snap_size(*(size or image.shape[:0:-1]), factor)
                array = resize_condition_image(image, (width, height))[None]
            return self.backend.condition_tokens(array), (height // factor, width // factor)
        width, height = snap_size(*(size or (self.spec.window[1] * factor, self.spec.window[0] * factor)), factor)
        latent = (height // factor, width // factor)
        if cspec.kind == "class":
            if not isinstance(cond, int):
                raise UserError("this model is class-conditional: pass a class id (--class-id N), not a condition map")
            check_class_id(cond, cspec)
            return np.array([[cond]], dtype=np.int64), latent
        if cond is not None:
            raise UserError("this model is unconditional and has no condition encoder: do not pass a condition (--cond)")
        return np.array([[cspec.sos_token]], dtype=np.int64), latent

    def generate(
        self,
        cond: Condition = None,
        *,
        n: int = 1,
        size: tuple[int, int] | None = None,
        seed: int | None = None,
        mode: Mode = "exact",
        window_stride: int = DEFAULT_WINDOW_STRIDE,
        greedy: bool = False,
        top_k: int | None = 100,
        top_p: float | None = None,
        temperature: float = 1.0,
        on_token: Callable[[int, int], None] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> Generation:
        """Sample ``n`` images for one condition in one batch; the same seed gives the same images.

        ``max_pixels`` bounds the batch's output pixels (n x width x height) and any condition image read;
        a larger request is refused with its memory estimate before anything is allocated."""
        request = GenerationRequest(cond, n, size, seed, mode, window_stride, greedy, top_k, top_p, temperature)
        return self.generate_batch([request], on_token=on_token, max_pixels=max_pixels)[0]

    def generate_batch(self, requests: Iterable[GenerationRequest], on_token: Callable[[int, int], None] | None = None,
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Generation]:
        """Several requests, each with its own condition, seed and options, in as few sampler runs as
        possible: requests of the same latent size and sampling options share one run (one transformer
        call per step for all their images) while the run's output pixels stay within ``max_pixels``.
        Each request's images equal what it gives alone, because every image draws from its own random
        stream, keyed by (seed, image index, latent cell). A bad request fails the call with its message."""
        max_pixels = check_max_pixels(max_pixels)
        requests = check_requests(requests, on_token)
        options = [self.check(request, max_pixels) for request in requests]  # before any condition is read
        with self._lock:
            prepared = [self.prepare(request, o, max_pixels) for request, o in zip(requests, options)]
            results: list[Generation | None] = [None] * len(requests)
            for indices in sampler_runs(prepared, max_pixels // self.spec.downsample_factor**2):
                for index, generation in zip(indices, self.sample_group([prepared[k] for k in indices], on_token)):
                    results[index] = generation
        return results  # type: ignore[return-value]

    def check(self, request: GenerationRequest, max_pixels: int) -> SamplingOptions:
        """What can be checked without reading the condition: the request's fields, and its size if given."""
        check_request(request.n, request.size, request.seed, request.mode, request.window_stride)
        options = SamplingOptions(greedy=request.greedy, temperature=request.temperature, top_k=request.top_k,
                                  top_p=request.top_p)
        if request.size is not None:
            factor = self.spec.downsample_factor
            width, height = snap_size(*request.size, factor)
            check_generation_size(self.spec, request.n, (height // factor, width // factor), max_pixels)
        return options

    def prepare(self, request: GenerationRequest, options: SamplingOptions, max_pixels: int) -> "PreparedRequest":
        started = time.perf_counter()
        cond_tokens, latent = self.condition_tokens(request.cond, request.size, max_pixels)
        check_generation_size(self.spec, request.n, latent, max_pixels)
        seed = request.seed if request.seed is not None else int(np.random.SeedSequence().entropy % (1 << 63))
        return PreparedRequest(request, options, np.repeat(cond_tokens, request.n, axis=0), latent, seed,
                               time.perf_counter() - started)

    def sample_group(self, group: list["PreparedRequest"], on_token: Callable[[int, int], None] | None) -> list[Generation]:
        """One sampler run and one decode for requests that share a batch key."""
        first = group[0]
        stream = TokenStream.for_requests([p.seed for p in group for _ in range(p.request.n)],
                                          [k for p in group for k in range(p.request.n)])
        cond_tokens = np.concatenate([p.cond_tokens for p in group])
        tokens, stats = sample_tokens(self.backend, cond_tokens, first.latent, first.options, stream,
                                      first.request.mode, first.request.window_stride, on_token)
        started = time.perf_counter()
        images = to_pil(self.backend.decode(tokens))
        decode_seconds = time.perf_counter() - started
        generations, start = [], 0
        for p in group:
            n, request = p.request.n, p.request
            generations.append(Generation(
                images=images[start : start + n],
                tokens=tokens[start : start + n],
                stats={
                    "backend": self.backend.name,
                    "mode": request.mode,
                    "window_stride": request.window_stride if request.mode == "fast" else None,
                    "n": n,
                    "batch": len(tokens),  # images sampled together with this request's
                    "seed": p.seed,
                    "latent_hw": list(p.latent),
                    "tokens": stats.tokens * n,
                    "prefills": stats.prefills,
                    "steps": stats.steps,
                    "transformer_calls": stats.transformer_calls,
                    "fed_tokens": stats.fed_tokens,
                    "condition_seconds": p.condition_seconds,  # this request's condition, read and encoded
                    "sample_seconds": stats.sample_seconds,  # the run's, shared by its batch
                    "decode_seconds": decode_seconds,  # the run's
                },
            ))
            start += n
        return generations


@dataclass(frozen=True)
class GenerationRequest:
    """One caller's request: what ``Pipeline.generate`` takes, as a value (for ``generate_batch``)."""

    cond: Condition = None
    n: int = 1
    size: tuple[int, int] | None = None  # (width, height) pixels
    seed: int | None = None
    mode: Mode = "exact"
    window_stride: int = DEFAULT_WINDOW_STRIDE
    greedy: bool = False
    top_k: int | None = 100
    top_p: float | None = None
    temperature: float = 1.0


@dataclass(frozen=True)
class PreparedRequest:
    request: GenerationRequest
    options: SamplingOptions
    cond_tokens: np.ndarray  # (n, ...) the condition's tokens, one row per image
    latent: tuple[int, int]
    seed: int  # the request's seed, drawn when it had none
    condition_seconds: float  # reading and encoding its condition

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys run in one sampler call."""
        r = self.request
        return self.latent, self.options, r.mode, r.window_stride if r.mode == "fast" else None

    @property
    def cells(self) -> int:
        """Latent cells of all the request's images."""
        return self.request.n * self.latent[0] * self.latent[1]


def check_requests(requests: Any, on_token: Any) -> list[GenerationRequest]:
    """``generate_batch``'s arguments as a list of requests, or one line saying what they are instead."""
    if on_token is not None and not callable(on_token):
        raise UserError(f"on_token must be a function (done, total) or None, not {type(on_token).__name__}")
    if isinstance(requests, (str, bytes, GenerationRequest)) or not isinstance(requests, Iterable):
        raise UserError(f"generate_batch takes a list of GenerationRequest, not {type(requests).__name__}")
    requests = list(requests)
    for k, request in enumerate(requests):
        if not isinstance(request, GenerationRequest):
            raise UserError(f"generate_batch: request {k} is a {type(request).__name__}, not a GenerationRequest")
    return requests


def sampler_runs(prepared: Sequence[PreparedRequest], max_cells: int) -> list[list[int]]:
    """Indices of the requests sampled together: equal batch keys, at most ``max_cells`` latent cells a
    run (a request over it alone was refused before)."""
    runs: dict[tuple, list[list[int]]] = {}
    for index, item in enumerate(prepared):
        chunks = runs.setdefault(item.batch_key, [[]])
        if chunks[-1] and sum(prepared[k].cells for k in chunks[-1]) + item.cells > max_cells:
            chunks.append([])
        chunks[-1].append(index)
    return [chunk for chunks in runs.values() for chunk in chunks]
