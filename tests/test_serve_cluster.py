"""`taming-deploy serve --address` on a Ray cluster started by the test (one head node on 127.0.0.1),
and the request timeout.

The cluster is `ray start --head --block` in its own process group and temporary directory, stopped
by SIGTERM (the group killed if it lingers), never by `ray stop`, which would stop every Ray on the
machine. Two environment settings, for the head, the server and every other process of the test: Ray
2.60 turns a loopback address into the machine's network address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
is 0, and `ray start` requires token authentication when a token exists: the test makes its own
(RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH in its temporary directory). Before the server joins, another Serve application ("other", on /other) is deployed on the
cluster: the server must share Serve's HTTP proxy with it and, when stopped, remove only its own.

The server batches up to 4 requests and waits up to 6 s for a batch to fill, with a 2 s request
timeout: a lone request outlives the timeout while it waits for a batch (no time spent sampling, so
nothing depends on this machine's speed), and a full batch starts at once and is answered well within it."""
from __future__ import annotations

import io
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from taming_deploy.pipeline import Pipeline
from taming_deploy.service_client import Reply, ServerProcess, call, free_port, generate_url

pytestmark = pytest.mark.slow

TIMEOUT_S = 2
SERVER_OPTIONS = ["--backend", "ort", "--max-batch", "4", "--batch-wait-ms", "6000", "--timeout-s", str(TIMEOUT_S)]
RAY = Path(sys.executable).with_name("ray")
OTHER_APPLICATION = """
import sys, ray
from ray import serve
from ray.serve.config import HTTPOptions
ray.init(address=sys.argv[1], log_to_driver=False)
serve.start(http_options=HTTPOptions(host="127.0.0.1", port=int(sys.argv[2])))

@serve.deployment(ray_actor_options={"num_cpus": 0})
class Other:
    async def __call__(self, request):
        return "other"

serve.run(Other.bind(), name="other", route_prefix="/other")
"""


@dataclass
class Deployment:
    address: str  # the Ray cluster's GCS, host:port
    server: ServerProcess
    base: str  # the server's URL


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def label_map(seed: int) -> np.ndarray:
    """16x16 pixels (2x2 latent cells on the embedded model): cheap to sample."""
    return np.kron(np.random.default_rng(seed).integers(0, 8, (2, 2)), np.ones((8, 8), np.int64))


def stop_group(process: subprocess.Popen, timeout: float) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # what is left of the group: workers the raylet started
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    token = Path(temp_dir) / "auth_token"
    token.write_text(secrets.token_hex(32))
    environment = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        yield from head_node(temp_dir)


def head_node(temp_dir: str) -> Iterator[str]:
    address = f"127.0.0.1:{free_port()}"
    log = tempfile.TemporaryFile()
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", address.split(":")[1],
         "--num-cpus", "2", "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", temp_dir,
         "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port())],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(Path(temp_dir).glob("session_*/sockets/raylet")):  # the head node's raylet is up
            log.seek(0)
            assert head.poll() is None, f"ray start exited: {log.read().decode(errors='replace')[-2000:]}"
            assert time.monotonic() < deadline, "the Ray head did not start within 120 s"
            time.sleep(1)
        yield address
    finally:
        stop_group(head, timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def deployment(cluster: str) -> Iterator[Deployment]:
    server = ServerProcess(None, [*SERVER_OPTIONS, "--address", cluster])
    other = subprocess.run([sys.executable, "-c", OTHER_APPLICATION, cluster, str(server.port)], timeout=180,
                           capture_output=True, text=True)
    assert other.returncode == 0, other.stderr[-3000:]
    with server as base:
        yield Deployment(cluster, server, base)


def concurrent_requests(base: str, seeds: list[int], **params: object) -> list[Reply]:
    with ThreadPoolExecutor(len(seeds)) as pool:
        return list(pool.map(lambda seed: call(generate_url(base, seed=seed, **params), png(label_map(seed)), timeout=60),
                             seeds))


def test_requests_through_a_joined_cluster_equal_direct_pipeline_calls(deployment):
    replies = concurrent_requests(deployment.base, [0, 1, 2, 3])  # one full batch
    pipeline = Pipeline.load(None, "ort")
    for seed, reply in enumerate(replies):
        assert (reply.status, reply.content_type) == (200, "image/png"), reply.body[:300]
        direct = pipeline.generate(label_map(seed), seed=seed).images[0]
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(reply.body))), np.asarray(direct))
    assert call(deployment.base + "/info").json()["limits"]["timeout_s"] == TIMEOUT_S


def test_a_request_over_the_timeout_gets_json_and_the_replica_keeps_serving(deployment):
    pid = call(deployment.base + "/health").json()["pid"]
    started = time.monotonic()
    reply = call(generate_url(deployment.base, seed=5), png(label_map(5)), timeout=60)  # alone: waits for a batch
    elapsed = time.monotonic() - started
    assert (reply.status, reply.content_type) == (504, "application/json"), reply.body[:300]
    message = reply.json()["error"]
    assert message == f"no reply within this service's request timeout of {TIMEOUT_S} s (--timeout-s)"
    assert elapsed >= TIMEOUT_S
    # Ray Serve leaves the timed-out request in the forming batch and drops it when the batch runs:
    # three more requests complete that batch at once, and are sampled without it
    replies = concurrent_requests(deployment.base, [6, 7, 8], format="json")
    assert [r.status for r in replies] == [200] * 3, [r.body[:200] for r in replies]
    assert [r.json()["stats"]["batch"] for r in replies] == [3] * 3
    assert call(deployment.base + "/health").json()["pid"] == pid  # the same replica, not a replacement


def test_joining_a_serve_that_listens_elsewhere_is_refused_in_one_line(deployment):
    command = [sys.executable, "-m", "taming_deploy.cli", "serve", "--host", "127.0.0.1", "--port", str(free_port()),
               "--address", deployment.address, "--backend", "ort"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=180)
    port = deployment.server.port
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: Ray Serve already runs on this cluster with HTTP on 127.0.0.1:{port}; "
        f"pass --host 127.0.0.1 --port {port} to add this application there")
    assert "Traceback" not in proc.stderr
    assert call(deployment.base + "/health").status == 200  # the refused command deleted nothing


def test_without_address_serve_starts_its_own_ray_even_where_a_cluster_is_named(deployment, monkeypatch):
    """Ray's own default would join the cluster RAY_ADDRESS (or the last `ray start`) names, and be refused
    there because that cluster's Serve listens elsewhere: no --address means a one-node Ray of its own."""
    monkeypatch.setenv("RAY_ADDRESS", deployment.address)
    with ServerProcess(None, ["--backend", "ort"]) as base:
        reply = call(generate_url(base, seed=0), png(label_map(0)), timeout=60)
        assert (reply.status, reply.content_type) == (200, "image/png"), reply.body[:300]
    assert call(deployment.base + "/health").status == 200


def test_stopping_the_server_removes_only_its_application(deployment):
    deployment.server.stop()
    assert deployment.server.process.returncode == 0, deployment.server.output()[-2000:]
    deadline = time.monotonic() + 60
    while call(deployment.base + "/health").status != 404:  # our routes go as the application is deleted
        assert time.monotonic() < deadline, "the application was not removed"
        time.sleep(1)
    other = call(deployment.base + "/other")  # the cluster, its Serve proxy and the other application remain
    assert (other.status, other.body) == (200, b"other")
