"""An HTTP generation request (query parameters + a PNG body) -> a GenerationRequest, with the service's limits.

Kept apart from the Ray Serve deployment so that parsing and limits are plain functions, tested without
a server. Every problem is a UserError whose one-line message the service returns as JSON, the same
message the CLI prints for the same mistake.
"""
from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from taming_deploy.errors import UserError
from taming_deploy.pipeline import GenerationRequest
from taming_deploy.validation import check_request, check_sampling_options, parse_size

BOOLEAN_WORDS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
OUTPUT_FORMATS = ("png", "json")
KNOWN_PARAMETERS = frozenset(
    {"size", "seed", "mode", "window_stride", "greedy", "top_k", "top_p", "temperature", "n", "class_id", "format"}
)


@dataclass(frozen=True)
class ServiceLimits:
    max_pixels: int = 1024 * 1024  # output pixels per request, all n images together
    max_n: int = 8
    max_body_bytes: int = 16 << 20  # a condition PNG
    timeout_s: float = 600.0  # from arrival at a replica to the reply, queueing for a batch included


class RequestTooLarge(UserError):
    """A request over the service's limits (HTTP 413 rather than 400)."""


def integer(params: Mapping[str, str], name: str) -> int | None:
    text = params.get(name)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{name} must be an integer, got {text[:40]!r}") from None


def real(params: Mapping[str, str], name: str) -> float | None:
    text = params.get(name)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{name} must be a number, got {text[:40]!r}") from None
    if not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {text[:40]!r}")
    return value


def boolean(params: Mapping[str, str], name: str) -> bool:
    text = params.get(name, "false").lower()
    if text not in BOOLEAN_WORDS:
        raise UserError(f"{name} must be true or false, got {text[:40]!r}")
    return BOOLEAN_WORDS[text]


def condition_image(body: bytes, content_type: str | None, limits: ServiceLimits) -> Image.Image | None:
    """The request body: empty (no condition) or a PNG label/depth map, decoded now."""
    if not body:
        return None
    if len(body) > limits.max_body_bytes:
        raise RequestTooLarge(f"the condition is {len(body)} bytes; this service takes at most {limits.max_body_bytes}")
    if content_type is not None and content_type.split(";")[0].strip() not in ("image/png", "application/octet-stream"):
        raise UserError(f"the condition must be sent as Content-Type: image/png, got {content_type[:60]!r}")
    try:
        image = Image.open(io.BytesIO(body))
        if image.width * image.height > limits.max_pixels:
            raise RequestTooLarge(f"the condition is {image.width}x{image.height} pixels; this service takes at most "
                                  f"{limits.max_pixels} pixels per request")
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"the request body is not a readable PNG ({str(exc)[:80]})") from None
    return image


def generation_request(params: Mapping[str, str], body: bytes, content_type: str | None,
                       limits: ServiceLimits) -> tuple[GenerationRequest, str]:
    """-> (the request, the response format: png or json)."""
    unknown = sorted(set(params) - KNOWN_PARAMETERS)
    if unknown:
        raise UserError(f"unknown query parameter {unknown[0][:40]!r}; known: {', '.join(sorted(KNOWN_PARAMETERS))}")
    output = params.get("format", "png")
    if output not in OUTPUT_FORMATS:
        raise UserError(f"format must be png or json, got {output[:40]!r}")
    image = condition_image(body, content_type, limits)
    class_id = integer(params, "class_id")
    if image is not None and class_id is not None:
        raise UserError("send either a condition image or class_id, not both")
    n = integer(params, "n") or 1
    if not 1 <= n <= limits.max_n:
        raise RequestTooLarge(f"n must be between 1 and {limits.max_n} on this service, got {n}")
    size = parse_size(params.get("size"))
    pixels = n * (size[0] * size[1] if size else image.width * image.height if image else 0)
    if pixels > limits.max_pixels:
        raise RequestTooLarge(f"the request asks for {pixels} pixels (n x width x height); this service takes at most "
                              f"{limits.max_pixels}")
    top_k, temperature = integer(params, "top_k"), real(params, "temperature")
    request = GenerationRequest(
        cond=image if image is not None else class_id,
        n=n,
        size=size,
        seed=integer(params, "seed"),
        mode=params.get("mode", "exact")[:40],  # type: ignore[arg-type]
        window_stride=integer(params, "window_stride") or 8,
        greedy=boolean(params, "greedy"),
        top_k=100 if top_k is None else top_k or None,
        top_p=real(params, "top_p"),
        temperature=1.0 if temperature is None else temperature,
    )
    # the pipeline's own checks, now, so that a bad request never joins (and splits) a batch
    check_request(request.n, request.size, request.seed, request.mode, request.window_stride)
    check_sampling_options(request.greedy, request.temperature, request.top_k, request.top_p)
    return request, output
