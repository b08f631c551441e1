"""Talking to a `taming-deploy serve` service from Python with the standard library alone: one HTTP call,
and a server run as a child process (for scripts, benchmarks and tests on one machine)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Reply:
    status: int
    content_type: str
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def call(url: str, body: bytes | None = None, timeout: float = 120) -> Reply:
    """GET ``url``, or POST ``body`` (a condition PNG, or b"" for none) to it; HTTP errors are replies too."""
    request = urllib.request.Request(url, data=body, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "image/png"} if body else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Reply(response.status, response.headers.get("content-type", ""), response.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, exc.headers.get("content-type", ""), exc.read())


def generate_url(base: str, **params: object) -> str:
    return f"{base}/generate?{urllib.parse.urlencode(params)}" if params else f"{base}/generate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``taming-deploy serve MODEL OPTIONS`` on 127.0.0.1 as a child process, in its own process group:
    ``with ServerProcess(...) as base:`` waits until GET /health answers, and stops it with SIGTERM on exit
    (the whole group with SIGKILL if it has not stopped within ``stop_timeout`` seconds)."""

    def __init__(self, model: Path | None, options: Sequence[str] = (), start_timeout: float = 180,
                 stop_timeout: float = 60):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "taming_deploy.cli", "serve", *([str(model)] if model else []),
                        "--host", "127.0.0.1", "--port", str(self.port), *options]
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.process: subprocess.Popen | None = None
        self.log = tempfile.TemporaryFile()  # not a pipe: a chatty server must never block on a full one

    def __enter__(self) -> str:
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        try:
            while not self.healthy():
                if self.process.poll() is not None:
                    raise RuntimeError(f"the server exited ({self.process.returncode}): {self.output()[-3000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the server did not answer /health within {self.start_timeout} s")
                time.sleep(1)
        except BaseException:
            self.stop()
            raise
        return self.base

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def healthy(self) -> bool:
        try:
            return call(self.base + "/health", timeout=5).status == 200
        except OSError:
            return False

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
