"""The Python API: load a model once, generate images from conditions, from any number of threads."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from taming_deploy.backends import BackendName, load_backend
from taming_deploy.backends.base import Backend
from taming_deploy.conditions import (
    ImageSource,
    check_class_id,
    read_depth_map,
    read_label_map,
    resize_depth,
    resize_labels,
    snap_size,
)
from taming_deploy.errors import UserError
from taming_deploy.images import to_pil
from taming_deploy.sampler import sample_tokens
from taming_deploy.sampling import SamplingOptions
from taming_deploy.validation import (
    DEFAULT_MAX_PIXELS,
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

    Thread safety: ``generate`` holds one lock per pipeline, so concurrent calls from several threads
    are safe and run one after another (each call's result is the same as if it ran alone). For
    parallel generation, load one pipeline per thread or batch the requests with ``n``.
    """

    def __init__(self, backend: Backend):
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
            else:
                depth = read_depth_map(cond, max_pixels)
                width, height = snap_size(*(size or depth.shape[::-1]), factor)
                array = resize_depth(depth, (width, height))[None, None]
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
        window_stride: int = 8,
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
        check_request(n, size, seed, mode, window_stride)
        max_pixels = check_max_pixels(max_pixels)
        options = SamplingOptions(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)
        factor = self.spec.downsample_factor
        if size is not None:
            width, height = snap_size(*size, factor)
            check_generation_size(self.spec, n, (height // factor, width // factor), max_pixels)
        with self._lock:
            cond_tokens, latent = self.condition_tokens(cond, size, max_pixels)
            check_generation_size(self.spec, n, latent, max_pixels)
            cond_tokens = np.repeat(cond_tokens, n, axis=0)
            rng = np.random.default_rng(seed)
            tokens, stats = sample_tokens(self.backend, cond_tokens, latent, options, rng, mode, window_stride, on_token)
            started = time.perf_counter()
            images = self.backend.decode(tokens)
            decode_seconds = time.perf_counter() - started
        return Generation(
            images=to_pil(images),
            tokens=tokens,
            stats={
                "backend": self.backend.name,
                "mode": mode,
                "window_stride": window_stride if mode == "fast" else None,
                "n": n,
                "latent_hw": list(latent),
                "tokens": stats.tokens * n,
                "prefills": stats.prefills,
                "steps": stats.steps,
                "fed_tokens": stats.fed_tokens,
                "sample_seconds": stats.sample_seconds,
                "decode_seconds": decode_seconds,
            },
        )
