"""One validation of what a caller asks the sampler for, shared by the CLI, the Python API and any server:
sampling options, the generation request (n, size, seed, mode) and its memory, and the condition.

Everything here raises UserError with one line; nothing here allocates. The memory limit is a pixel
budget (``max_pixels``, ``--max-pixels``): images decoded in one batch and condition images read, with
the estimated memory shown when a request is refused.
"""
from __future__ import annotations

import math
import re
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from taming_deploy.errors import RequestTooLarge, UserError
from taming_deploy.spec import ModelSpec

MODES = ("exact", "fast")
BACKENDS = ("auto", "torch", "ort", "trt")
DEFAULT_WINDOW_STRIDE = 8
INTEGER = re.compile(r"[+-]?[0-9]{1,40}")  # ASCII digits only: int() would take '١٢', '1_000' and ' 5 '
REAL = re.compile(r"[+-]?([0-9]{1,40}(\.[0-9]{0,40})?|\.[0-9]{1,40})([eE][+-]?[0-9]{1,4})?")  # no nan, inf, '1_0'
MAX_SEED = 2**63 - 1
DEFAULT_MAX_PIXELS = 2048 * 2048  # per batch: 16 images of 512x512; the embedded model's 512x256 x4 uses 1/8 of it
DECODER_BYTES_PER_PIXEL = 1024  # about two float32 activations of 128 channels at full resolution


def is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_backend(backend: Any) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise UserError(f"--backend must be {', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}, got {backend!r}"[:300])


def check_model_path(path: Any) -> None:
    """What ``Pipeline.load`` and the backends take as a model: a path, or None (the embedded model)."""
    if path is not None and not isinstance(path, (str, Path)):
        raise UserError(f"a model is a bundle or checkpoint path (or None: the embedded model), not {type(path).__name__}")


def check_sampling_options(greedy: Any, temperature: Any, top_k: Any, top_p: Any) -> None:
    """Temperature finite and > 0, top-k a positive integer or None, top-p in (0, 1] or None."""
    if not isinstance(greedy, (bool, np.bool_)):
        raise UserError(f"greedy must be true or false, got {greedy!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, Real) or not math.isfinite(temperature) or temperature <= 0:
        raise UserError(f"temperature must be a finite number > 0, got {temperature!r}")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise UserError(f"top-k must be an integer >= 1 (or none / 0 on the command line: all tokens), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, Real) or not (math.isfinite(top_p) and 0 < top_p <= 1)):
        raise UserError(f"top-p must be in (0, 1], got {top_p!r}")


def check_request(n: Any, size: Any, seed: Any, mode: Any, window_stride: Any) -> None:
    """The shape of a generation request, before any work."""
    if not is_int(n) or n < 1:
        raise UserError(f"n must be an integer >= 1, got {n!r}")
    if size is not None:
        if not isinstance(size, (tuple, list)) or len(size) != 2 or not all(is_int(v) and v >= 1 for v in size):
            raise UserError(f"size must be (width, height) in pixels, both >= 1, got {size!r}")
    if seed is not None and (not is_int(seed) or not 0 <= seed <= MAX_SEED):
        raise UserError(f"seed must be an integer in 0..{MAX_SEED}, got {seed!r}")
    if mode not in MODES:
        raise UserError(f"mode must be {' or '.join(MODES)}, got {mode!r}")
    if not is_int(window_stride) or window_stride < 1:
        raise UserError(f"window stride must be an integer >= 1, got {window_stride!r}")


def parse_integer(text: str, name: str) -> int:
    """A decimal integer typed by a user (an HTTP query parameter)."""
    if not INTEGER.fullmatch(text):
        raise UserError(f"{name} must be an integer of at most 40 digits, got {text[:40]!r}")
    return int(text)


def parse_real(text: str, name: str) -> float:
    """A finite decimal number typed by a user (an HTTP query parameter)."""
    value = float(text) if REAL.fullmatch(text) else None
    if value is None or not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {text[:40]!r}")
    return value


def parse_size(text: str | None, name: str = "--size") -> tuple[int, int] | None:
    """'WxH' (the CLI's --size, --max-size and --sizes, the HTTP size parameter) -> (W, H)."""
    if text is None:
        return None
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(INTEGER.fullmatch(part) for part in parts):
        raise UserError(f"{name} must look like 512x256 (width x height), got {text[:40]!r}")
    width, height = (int(part) for part in parts)
    if width < 1 or height < 1:
        raise UserError(f"{name} must be positive, got {text[:40]!r}")
    return width, height


def check_stride_mode(window_stride: int | None, mode: str) -> None:
    """A window stride given (not defaulted) is for fast mode only."""
    if window_stride is not None and mode != "fast":
        raise UserError("--window-stride applies to --mode fast only (exact mode places the window for every token)")


def check_max_pixels(max_pixels: Any) -> int:
    if not is_int(max_pixels) or max_pixels < 1:
        raise UserError(f"max-pixels must be an integer >= 1, got {max_pixels!r}")
    return int(max_pixels)


def generation_bytes(spec: ModelSpec, n: int, latent_hw: tuple[int, int]) -> int:
    """About the memory one batch needs: the transformer cache of every image plus the decoder's activations."""
    cache = 4 * math.prod(spec.cache_shape(n))
    pixels = n * latent_hw[0] * latent_hw[1] * spec.downsample_factor**2
    return cache + pixels * DECODER_BYTES_PER_PIXEL


def check_generation_size(spec: ModelSpec, n: int, latent_hw: tuple[int, int], max_pixels: int) -> None:
    """Refuse a batch whose output pixels exceed ``max_pixels``, saying what it would need."""
    height, width = (side * spec.downsample_factor for side in latent_hw)
    pixels = n * width * height
    if pixels > max_pixels:
        gib = generation_bytes(spec, n, latent_hw) / 2**30
        raise RequestTooLarge(
            f"{n} image(s) of {width}x{height} are {pixels:,} pixels, about {gib:,.1f} GiB of memory; the limit is "
            f"{max_pixels:,} pixels (--max-pixels / max_pixels): generate fewer or smaller images, or raise it"
        )


def check_image_size(width: int, height: int, source: str, max_pixels: int) -> None:
    """An image to read: non-empty and within the pixel budget (checked before it is decoded)."""
    if width < 1 or height < 1:
        raise UserError(f"{source}: the image is empty ({width}x{height})")
    if width * height > max_pixels:
        raise RequestTooLarge(
            f"{source}: {width}x{height} is {width * height:,} pixels, more than the limit of {max_pixels:,} "
            "(--max-pixels / max_pixels); pass a smaller image or raise the limit"
        )


def check_condition_array(array: np.ndarray) -> None:
    """A condition handed to the API as an array: 2-D, non-empty, integers within int32 (label ids, so that
    a cast cannot wrap 2**32 + 3 to 3) or finite floats (depth)."""
    if array.ndim != 2:
        raise UserError(f"condition array: expected a 2-D (H, W) array, got shape {array.shape}")
    if array.size == 0:
        raise UserError(f"condition array: the array is empty (shape {array.shape})")
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > np.iinfo(np.int32).max:
            raise UserError(f"condition array: label ids {low}..{high} are out of range (negative or beyond int32)")
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise UserError("condition array: holds NaN or infinite values")
    else:
        raise UserError(f"condition array: expected integers (labels) or floats (depth), got dtype {array.dtype}")


def normalize_condition(cond: Any) -> Any:
    """A class id (Python or numpy integer, never bool), a path, a PIL image, a 2-D array, or None."""
    if isinstance(cond, str) and not cond.strip():
        raise UserError("the condition path is empty; name an image file")  # Path('') would be '.', a directory
    if cond is None or isinstance(cond, (str, Path)):
        return cond
    if isinstance(cond, Image.Image):
        check_image_size(cond.width, cond.height, "condition image", max_pixels=2**62)
        return cond
    if isinstance(cond, np.ndarray):
        check_condition_array(cond)
        return cond
    if is_int(cond):
        return int(cond)
    raise UserError(f"a condition is a class id, an image path, a PIL image or a 2-D array, not {type(cond).__name__}")
