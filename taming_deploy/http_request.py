"""An HTTP generation request (query parameters + a PNG body) -> a GenerationRequest, with the service's limits.

Kept apart from the Ray Serve deployment so that parsing and limits are plain functions, tested without
a server. Every problem is a UserError whose one-line message the service returns as JSON, the same
message the CLI prints for the same mistake.
"""
from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from PIL import Image

from taming_deploy.conditions import decode_image
from taming_deploy.errors import RequestTooLarge, UserError
from taming_deploy.pipeline import GenerationRequest
from taming_deploy.validation import (
    DEFAULT_WINDOW_STRIDE,
    check_request,
    check_sampling_options,
    check_stride_mode,
    parse_integer,
    parse_real,
    parse_size,
)

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


def query_parameters(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The query's (name, value) pairs as a mapping, refusing a name given twice (which one would win?)."""
    params: dict[str, str] = {}
    for name, value in pairs:
        if name in params:
            raise UserError(f"query parameter {name[:40]!r} is given more than once; give it once")
        params[name] = value
    return params


def integer(params: Mapping[str, str], name: str) -> int | None:
    text = params.get(name)
    return None if text is None else parse_integer(text, name)


def real(params: Mapping[str, str], name: str) -> float | None:
    text = params.get(name)
    return None if text is None else parse_real(text, name)


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
        raise RequestTooLarge(f"the condition is over this service's limit of {limits.max_body_bytes} bytes")
    if content_type is not None and content_type.split(";")[0].strip().lower() not in ("image/png", "application/octet-stream"):
        raise UserError(f"the condition must be sent as Content-Type: image/png, got {content_type[:60]!r}")
    return decode_image(io.BytesIO(body), "the request body", limits.max_pixels, formats=("PNG",))


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
    n = integer(params, "n")
    n = 1 if n is None else n
    if n > limits.max_n:
        raise RequestTooLarge(f"n must be between 1 and {limits.max_n} on this service, got {n}")
    check_request(n, None, None, "exact", DEFAULT_WINDOW_STRIDE)  # n >= 1 (a 400), before n x pixels is computed
    size = parse_size(params.get("size"))
    pixels = n * (size[0] * size[1] if size else image.width * image.height if image else 0)
    if pixels > limits.max_pixels:
        raise RequestTooLarge(f"the request asks for {pixels} pixels (n x width x height); this service takes at most "
                              f"{limits.max_pixels}")
    top_k, temperature, stride = integer(params, "top_k"), real(params, "temperature"), integer(params, "window_stride")
    mode = params.get("mode", "exact")
    check_stride_mode(stride, mode)
    request = GenerationRequest(
        cond=image if image is not None else class_id,
        n=n,
        size=size,
        seed=integer(params, "seed"),
        mode=mode[:40],  # type: ignore[arg-type]
        window_stride=DEFAULT_WINDOW_STRIDE if stride is None else stride,
        greedy=boolean(params, "greedy"),
        top_k=100 if top_k is None else top_k or None,
        top_p=real(params, "top_p"),
        temperature=1.0 if temperature is None else temperature,
    )
    # the pipeline's own checks, now, so that a bad request never joins (and splits) a batch
    check_request(request.n, request.size, request.seed, request.mode, request.window_stride)
    check_sampling_options(request.greedy, request.temperature, request.top_k, request.top_p)
    return request, output
