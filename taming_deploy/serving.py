"""`taming-deploy serve`: a pipeline behind an HTTP API on Ray Serve.

Each replica is a Ray actor holding one ``Pipeline``. Ray Serve's proxy spreads requests over the
replicas (on one machine, or a Ray cluster joined with ``address``) and restarts a replica that dies;
``serve.batch`` collects concurrent requests on a replica into one ``Pipeline.generate_batch`` call,
which samples requests of the same latent size and options together. Results do not depend on the
batch a request lands in: every image draws from its own random stream, keyed by its seed.

Routes: ``POST /generate`` (query parameters and a PNG body, see http_request.py), ``GET /health``,
``GET /info``. Every user mistake is a 4xx JSON ``{"error": "<the CLI's one-line message>"}``.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import ray
from ray import serve
from ray.serve.config import HTTPOptions
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from taming_deploy.errors import RequestTooLarge, UserError
from taming_deploy.http_request import ServiceLimits, generation_request, query_parameters
from taming_deploy.images import grid
from taming_deploy.pipeline import Generation, GenerationRequest, Pipeline

APPLICATION = "taming-deploy"
PROXY_GRACE_S = 5.0  # the proxy's timeout is the replicas' plus this
log = logging.getLogger("ray.serve")  # a replica's log file under the Ray session's logs/serve/


@dataclass(frozen=True)
class ServiceConfig:
    model: str | None  # bundle or checkpoint path, readable on every node; None: the embedded model
    backend: str = "auto"
    limits: ServiceLimits = ServiceLimits()
    max_batch: int = 8  # requests per generate_batch call; 1 turns batching off
    batch_wait_s: float = 0.02  # how long a replica waits for more requests before it starts a batch


def error_response(exc: Exception) -> JSONResponse:
    status = 413 if isinstance(exc, RequestTooLarge) else 400 if isinstance(exc, UserError) else 500
    message = str(exc) if isinstance(exc, UserError) else f"internal error: {type(exc).__name__}: {str(exc)[:200]}"
    return JSONResponse({"error": message}, status_code=status)


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def generation_response(generation: Generation, output: str) -> Response:
    if output == "json":
        images = [base64.b64encode(png_bytes(image)).decode("ascii") for image in generation.images]
        return JSONResponse({"images": images, "stats": generation.stats})
    image = generation.images[0] if len(generation.images) == 1 else grid(generation.images)
    return Response(png_bytes(image), media_type="image/png")


@serve.deployment(health_check_period_s=2, health_check_timeout_s=10)
class GenerationService:
    def __init__(self, config: ServiceConfig):
        self.pipeline = Pipeline.load(config.model, config.backend)  # type: ignore[arg-type]
        self.limits = config.limits
        self.generate_batched.set_max_batch_size(config.max_batch)
        self.generate_batched.set_batch_wait_timeout_s(config.batch_wait_s)
        self.info = {"spec": self.pipeline.spec.to_dict(), "backend": self.pipeline.backend.name,
                     "limits": asdict(config.limits), "max_batch": config.max_batch}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def generate_batched(self, jobs: list[tuple[GenerationRequest, str]]) -> list[Response]:
        return await asyncio.to_thread(self.run_batch, jobs)

    def run_batch(self, jobs: list[tuple[GenerationRequest, str]]) -> list[Response]:
        """One generate_batch call, its responses encoded here too: every caller of the batch gets its
        reply at the same moment (so their next requests arrive together and form the next batch), and
        the event loop stays free. If a request in the batch is bad, each runs alone so only that one fails."""
        started = time.perf_counter()
        requests = [request for request, _ in jobs]
        try:
            results: list[Generation | Exception] = list(self.pipeline.generate_batch(requests))
        except Exception as exc:  # noqa: BLE001 - returned to the caller as its HTTP error
            results = [exc] if len(requests) == 1 else [self.alone(request) for request in requests]
        responses = [error_response(result) if isinstance(result, Exception) else generation_response(result, output)
                     for result, (_, output) in zip(results, jobs)]
        log.info("batch of %d requests (%d images) answered in %.3f s", len(jobs),
                 sum(request.n for request in requests), time.perf_counter() - started)
        return responses

    def alone(self, request: GenerationRequest) -> Generation | Exception:
        try:
            return self.pipeline.generate_batch([request])[0]
        except Exception as exc:  # noqa: BLE001
            return exc

    async def __call__(self, http: Request) -> Response:
        route = http.url.path.rstrip("/") or "/"
        if route == "/health" and http.method == "GET":
            return JSONResponse({"status": "ok", "pid": os.getpid()})
        if route == "/info" and http.method == "GET":
            return JSONResponse(self.info)
        if route != "/generate" or http.method != "POST":
            return JSONResponse({"error": f"no route {http.method} {route[:80]}; try POST /generate, GET /info"},
                                status_code=404)
        try:
            job = generation_request(query_parameters(http.query_params.multi_items()),
                                     await body_prefix(http, self.limits.max_body_bytes + 1),
                                     http.headers.get("content-type"), self.limits)
        except UserError as exc:
            return error_response(exc)
        try:
            return await asyncio.wait_for(self.generate_batched(job), self.limits.timeout_s)
        except asyncio.TimeoutError:  # still queued: dropped from its batch; already sampling: its result is discarded
            return JSONResponse({"error": f"no reply within this service's request timeout of "
                                          f"{self.limits.timeout_s:g} s (--timeout-s)"}, status_code=504)


async def body_prefix(http: Request, limit: int) -> bytes:
    """At most ``limit`` bytes of the request body: enough for ``generation_request`` to refuse one over
    the service's limit, without holding a body of any size in the replica's memory."""
    chunks, size = [], 0
    async for chunk in http.stream():
        chunks.append(chunk[: limit - size])
        size += len(chunks[-1])
        if size >= limit:
            break
    return b"".join(chunks)


def check_listen_address(host: str, port: int, address: str | None) -> None:
    """Before Ray starts: ``host`` is an address of this machine and, for a Ray of our own, ``port`` is
    free on it (Ray Serve fails a bad one later, with a traceback). Joining a cluster, Serve may already
    listen there: check_http_address decides."""
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError, ValueError) as exc:
        raise UserError(f"--host {host[:60]!r} is not an address or host name here ({exc})") from None
    if address is not None:
        return
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def check_http_address(host: str, port: int) -> None:
    """On a cluster where Serve already runs, its HTTP proxies keep their address (Ray Serve ignores new
    HTTP options with a warning): refuse rather than announce an address nobody listens on."""
    running = serve.context._get_global_client().http_config  # no public API tells the proxies' address
    if (running.host, running.port) != (host, port):
        raise UserError(f"Ray Serve already runs on this cluster with HTTP on {running.host}:{running.port}; "
                        f"pass --host {running.host} --port {running.port} to add this application there")


def serve_forever(config: ServiceConfig, host: str, port: int, replicas: int, address: str | None,
                  cpus_per_replica: float, echo: Callable[[str], None]) -> None:
    """Start (or join, with ``address``) Ray, deploy ``replicas`` replicas, and serve until SIGINT/SIGTERM.

    The request timeout is the replicas' (a JSON reply); the proxy's own, a little longer, is only a
    backstop for a replica that never answers, and one that a client's x-request-timeout-seconds
    header can change."""
    try:
        # 'local' without --address: a Ray of our own, never one that RAY_ADDRESS or an earlier `ray start` names
        ray.init(address=address or 'local', include_dashboard=False, log_to_driver=False, configure_logging=False)
    except ConnectionError as exc:
        raise UserError(f"cannot join the Ray cluster at {address}: {str(exc)[:200]}") from None
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # after ray.init, whose own SIGTERM handler aborts the process
        signal.signal(signum, lambda *_: stop.set())
    deployed = False
    try:
        serve.start(http_options=HTTPOptions(host=host, port=port,
                                             request_timeout_s=config.limits.timeout_s + PROXY_GRACE_S))
        check_http_address(host, port)
        # Ray Serve sends a replica at most max_ongoing_requests at once (5 by default): room for a full
        # batch being sampled and the next one forming behind it
        deployment = GenerationService.options(num_replicas=replicas, max_ongoing_requests=2 * config.max_batch,
                                               ray_actor_options={"num_cpus": cpus_per_replica})
        deployed = True
        serve.run(deployment.bind(config), name=APPLICATION, route_prefix="/", blocking=False)
        echo(f"serving {json.dumps(config.model or 'the embedded model')} on http://{host}:{port} "
             f"({replicas} replica{'s' * (replicas != 1)}, batches of up to {config.max_batch}); Ctrl-C stops")
        stop.wait()
    finally:
        if address is None:  # our own one-node Ray: take it down whole
            serve.shutdown()
            ray.shutdown()
        elif deployed:  # a shared cluster: remove only this application (Serve itself keeps running)
            serve.delete(APPLICATION)
