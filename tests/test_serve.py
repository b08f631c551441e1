"""`taming-deploy serve` on Ray Serve, on loopback only: requests parsed and limited as the CLI does,
seeded images equal to direct Pipeline calls under concurrency and batching, bad requests answered with
4xx JSON while the service keeps serving, and a replica killed with SIGKILL replaced.

Every server is a child process started by the test and stopped by SIGTERM (its process group is killed
if it does not stop); every request has a timeout and the polling loops a deadline."""
from __future__ import annotations

import base64
import io
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from taming_deploy.errors import UserError
from taming_deploy.http_request import RequestTooLarge, ServiceLimits, generation_request, query_parameters
from taming_deploy.pipeline import GenerationRequest, Pipeline
from taming_deploy.service_client import ServerProcess, call, generate_url

LIMITS = ServiceLimits(max_pixels=128 * 128, max_n=4)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def gif(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8), mode="L").save(buffer, format="GIF")
    return buffer.getvalue()


def animated_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    frames = [Image.fromarray(a.astype(np.uint8), mode="L") for a in (array, array + 1)]
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def bomb_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds no pixels: a decompression bomb before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


def labels(seed: int, shape=(32, 32)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.kron(rng.integers(0, 7, (shape[0] // 8, shape[1] // 8)), np.ones((8, 8), np.int64))


# --- parsing and limits, no server -------------------------------------------------------------------

def test_query_parameters_become_the_request_the_cli_would_make():
    request, output = generation_request(
        {"seed": "3", "n": "2", "size": "64x32", "mode": "fast", "window_stride": "4", "top_k": "0", "top_p": "0.9",
         "temperature": "0.8", "greedy": "true", "format": "json"}, png(labels(0)), "image/png", LIMITS)
    assert output == "json"
    assert (request.seed, request.n, request.size, request.mode, request.window_stride) == (3, 2, (64, 32), "fast", 4)
    assert (request.top_k, request.top_p, request.temperature, request.greedy) == (None, 0.9, 0.8, True)
    np.testing.assert_array_equal(np.asarray(request.cond), labels(0))
    defaults, output = generation_request({}, b"", None, LIMITS)
    assert output == "png" and defaults == GenerationRequest()
    assert generation_request({"class_id": "7"}, b"", None, LIMITS)[0].cond == 7


@pytest.mark.parametrize("params, body, content_type, error, message", [
    ({"seed": "x"}, b"", None, UserError, "seed must be an integer"),
    ({"temperature": "nan"}, b"", None, UserError, "temperature must be a finite number"),
    ({"greedy": "maybe"}, b"", None, UserError, "greedy must be true or false"),
    ({"mode": "slow"}, b"", None, UserError, "mode must be exact or fast"),
    ({"seed": "-1"}, b"", None, UserError, "seed must be an integer in 0.."),
    ({"top_p": "1.5"}, b"", None, UserError, "top-p must be in"),
    ({"temperature": "0"}, b"", None, UserError, "temperature must be a finite number > 0"),
    ({"format": "gif"}, b"", None, UserError, "format must be png or json"),
    ({"colour": "red"}, b"", None, UserError, "unknown query parameter 'colour'"),
    ({"size": "12"}, b"", None, UserError, "--size must look like"),
    ({}, b"\x89PNG garbage", "image/png", UserError, "request body: not a PNG image"),
    ({}, png(labels(0)), "text/plain", UserError, "Content-Type: image/png"),
    ({"class_id": "1"}, png(labels(0)), "image/png", UserError, "not both"),
    ({"n": "5"}, b"", None, RequestTooLarge, "n must be between 1 and 4"),
    ({"size": "256x256"}, b"", None, RequestTooLarge, "at most 16384"),
    ({"size": "96x64", "n": "3"}, b"", None, RequestTooLarge, "asks for 18432"),
    ({}, png(np.zeros((200, 200))), "image/png", RequestTooLarge, "200x200 is 40,000 pixels"),
    ({}, bomb_header(30000, 30000), "image/png", RequestTooLarge, "900000000 pixels"),
    ({}, gif(labels(0)), "image/png", UserError, "not a PNG image"),
    ({}, animated_png(labels(0)), "image/png", UserError, "animated image \\(2 frames\\)"),
    ({"n": "0"}, b"", None, UserError, "n must be an integer >= 1, got 0"),  # was taken as n=1
    ({"window_stride": "0", "mode": "fast"}, b"", None, UserError, "window stride must be an integer >= 1"),  # was 8
    ({"window_stride": "4"}, b"", None, UserError, "applies to --mode fast only"),  # was ignored
    ({"seed": "\u0661\u0662"}, b"", None, UserError, "seed must be an integer"),  # int() reads Arabic-Indic digits
    ({"seed": "1_000"}, b"", None, UserError, "seed must be an integer"),
    ({"seed": "9" * 5000}, b"", None, UserError, "at most 40 digits"),
    ({"size": "\uff13\uff12x32"}, b"", None, UserError, "--size must look like"),  # full-width digits
    ({"temperature": "1e999"}, b"", None, UserError, "temperature must be a finite number"),
    ({"top_p": "infinity"}, b"", None, UserError, "top_p must be a finite number"),
    ({"mode": ""}, b"", None, UserError, "mode must be exact or fast, got ''"),
])
def test_bad_requests_are_refused_in_one_line(params, body, content_type, error, message):
    with pytest.raises(error, match=message) as caught:
        generation_request(params, body, content_type, LIMITS)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300


def test_a_repeated_query_parameter_is_refused_not_resolved():
    """Starlette's dict(query_params) kept the last of ?seed=1&seed=2 silently."""
    assert query_parameters([("seed", "1"), ("n", "2")]) == {"seed": "1", "n": "2"}
    with pytest.raises(UserError, match="query parameter 'seed' is given more than once"):
        query_parameters([("seed", "1"), ("seed", "2")])


def test_the_content_type_is_matched_case_insensitively():
    request, _ = generation_request({}, png(labels(0)), "Image/PNG; charset=binary", LIMITS)
    assert np.asarray(request.cond).shape == (32, 32)


def test_a_replica_reads_no_more_of_a_body_than_its_limit():
    """A body of any size was read whole into the replica's memory before its size was checked."""
    import asyncio

    from starlette.requests import Request

    from taming_deploy.serving import body_prefix

    sent = []

    async def receive():  # an endless body, 1 MiB a message
        sent.append(1)
        return {"type": "http.request", "body": b"x" * (1 << 20), "more_body": True}

    http = Request({"type": "http", "method": "POST", "path": "/generate", "headers": [], "query_string": b""}, receive)
    prefix = asyncio.run(body_prefix(http, 3 * (1 << 20) + 1))
    assert len(prefix) == 3 * (1 << 20) + 1 and len(sent) == 4
    with pytest.raises(RequestTooLarge, match="over this service's limit"):
        generation_request({}, prefix, "image/png", ServiceLimits(max_body_bytes=3 << 20))


# --- a real server on 127.0.0.1 -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(fixture_bundle) -> Iterator[str]:
    options = ["--backend", "ort", "--max-batch", "4", "--batch-wait-ms", "300", "--max-pixels", str(64 * 64 * 4), "--max-n", "4"]
    with ServerProcess(fixture_bundle, options) as base:
        yield base


@pytest.mark.slow
def test_concurrent_seeded_requests_equal_direct_pipeline_calls(server, fixture_bundle):
    jobs = [(labels(k), {"seed": k, "size": "32x32"}) for k in range(4)] + [(labels(9), {"seed": 1, "n": 2})]
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda job: call(generate_url(server, format="json", **job[1]), png(job[0])), jobs))
    pipeline = Pipeline.load(fixture_bundle, backend="ort")
    batches = []
    for (cond, params), reply in zip(jobs, replies):
        assert (reply.status, reply.content_type) == (200, "application/json"), reply.body[:300]
        served_images, stats = reply.json()["images"], reply.json()["stats"]
        direct = pipeline.generate(cond, seed=params["seed"], n=params.get("n", 1),
                                   size=(32, 32) if "size" in params else None)
        assert len(served_images) == len(direct.images)
        for encoded, image in zip(served_images, direct.images):
            served = np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))))
            np.testing.assert_array_equal(served, np.asarray(image))
        batches.append(stats["batch"])
    assert max(batches) > 1, f"no two requests were batched together: {batches}"


@pytest.mark.slow
def test_png_response_and_info(server):
    reply = call(generate_url(server, seed=0), png(labels(3)))
    assert (reply.status, reply.content_type) == (200, "image/png")
    assert Image.open(io.BytesIO(reply.body)).size == (32, 32)
    reply = call(server + "/info")
    info = reply.json()
    assert reply.status == 200 and info["spec"]["condition"]["kind"] == "segmentation"
    assert info["spec"]["condition"]["n_labels"] == 7 and info["limits"]["max_n"] == 4


@pytest.mark.slow
def test_bad_requests_get_4xx_json_and_the_service_keeps_serving(server):
    unknown_label = labels(0)
    unknown_label[0, 0] = 99
    for url, body, status in [
        (generate_url(server, seed=0), png(unknown_label), 400),
        (generate_url(server, size="4096x4096"), png(labels(0)), 413),
        (generate_url(server), b"not a png at all", 400),
        (generate_url(server, class_id=3), b"", 400),  # a segmentation model takes no class id
        (generate_url(server, seed=0) + "&seed=1", png(labels(0)), 400),  # a repeated parameter
        (generate_url(server), b"\x89PNG" + bytes(17 << 20), 413),  # over the 16 MiB body limit
        (generate_url(server, n=0), png(labels(0)), 400),  # was served as n=1
        (server + "/nowhere", None, 404),
    ]:
        reply = call(url, body)
        assert (reply.status, reply.content_type) == (status, "application/json"), reply.body[:300]
        message = reply.json()["error"]
        assert message and "\n" not in message and "Traceback" not in message
    assert "label ids 99 are out of range" in call(generate_url(server), png(unknown_label)).json()["error"]
    assert call(generate_url(server, seed=0), png(labels(1))).status == 200


@pytest.mark.slow
def test_a_replica_killed_with_sigkill_is_replaced(server):
    pid = call(server + "/health").json()["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, "the replica was not replaced"
        try:
            reply = call(server + "/health", timeout=10)
            if reply.status == 200 and reply.json()["pid"] != pid:
                break
        except OSError:
            pass
        time.sleep(1)
    reply = call(generate_url(server, seed=0), png(labels(2)))
    assert (reply.status, reply.content_type) == (200, "image/png")


def test_serve_without_ray_says_what_to_install(tmp_path):
    code = ("import sys\nsys.modules['ray'] = None\nfrom taming_deploy.cli import main\n"
            "sys.argv = ['taming-deploy', 'serve']\nmain()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: serve needs Ray Serve (ray is missing): pip install 'taming-deploy[serve]'"]
