"""Hostile checkpoints for import-taming: random bytes, damaged pickles and archives, a tensor whose CRC
fails, unpicklable objects behind --trust-pickle. See tests/hostile.py for what every case asserts."""
from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

import pytest

from hostile import Case, run_case, write

IMPORT = "import-taming {tmp}/x.ckpt --config {yaml} --out {tmp}/out"
TRUSTING = IMPORT + " --trust-pickle"
RANDOM = os.urandom(8192)
MISSING_CLASS = b"\x80\x02cnosuchmodule\nThing\nq\x00)\x81q\x01."  # a pickle of an object whose class does not exist


def corrupted_tensor(tmp: Path, names: dict) -> None:
    """The reference checkpoint with one byte of a stored tensor flipped (the zip's CRC now disagrees)."""
    data = bytearray(names["ckpt"].read_bytes())
    with zipfile.ZipFile(names["ckpt"]) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length
    data[start + info.file_size // 2] ^= 0xFF
    (tmp / "x.ckpt").write_bytes(bytes(data))


def truncated(tmp: Path, names: dict) -> None:
    data = names["ckpt"].read_bytes()
    (tmp / "x.ckpt").write_bytes(data[: len(data) // 2])


CASES = [
    Case("random-bytes", IMPORT, ("not a PyTorch checkpoint",), write("x.ckpt", RANDOM)),
    Case("random-bytes-trusted", TRUSTING, ("not a PyTorch checkpoint",), write("x.ckpt", RANDOM)),
    Case("empty-file", IMPORT, ("not a PyTorch checkpoint",), write("x.ckpt", b"")),
    Case("pickle-garbage", IMPORT, ("damaged or not a PyTorch checkpoint",), write("x.ckpt", b"\x80\x02" + RANDOM)),
    Case("pickle-garbage-trusted", TRUSTING, ("damaged",), write("x.ckpt", b"\x80\x02" + RANDOM)),
    Case("unpicklable-untrusted", IMPORT, ("--trust-pickle", "nosuchmodule"), write("x.ckpt", MISSING_CLASS)),
    Case("unpicklable-trusted", TRUSTING, ("cannot unpickle", "nosuchmodule"), write("x.ckpt", MISSING_CLASS)),
    Case("zip-crc-mismatch", IMPORT, ("fails its CRC check",), corrupted_tensor),
    Case("zip-truncated", IMPORT, ("damaged",), truncated),
    Case("checkpoint-is-a-directory", "import-taming {tmp} --config {yaml} --out {tmp}/out", ("a directory",)),  # said 'does not exist'
    Case("checkpoint-is-a-device", "import-taming /dev/zero --config {yaml} --out {tmp}/out", ("/dev/zero", "not a regular file")),
    Case("checkpoint-is-a-fifo", "import-taming {tmp}/x.ckpt --config {yaml} --out {tmp}/out", ("x.ckpt", "not a regular file"),
         lambda tmp, names: os.mkfifo(tmp / "x.ckpt")),
    Case("checkpoint-missing", "import-taming {tmp}/x.ckpt --config {yaml} --out {tmp}/out", ("x.ckpt", "no such file")),
    # an endless or blocking config was read until memory ran out, or forever
    Case("project-yaml-is-dev-zero", "import-taming {ckpt} --config /dev/zero --out {tmp}/out", ("/dev/zero", "not a regular file")),
    Case("project-yaml-is-a-fifo", "import-taming {ckpt} --config {tmp}/p.yaml --out {tmp}/out", ("p.yaml", "not a regular file"),
         lambda tmp, names: os.mkfifo(tmp / "p.yaml")),
    Case("train-config-is-dev-zero", "train vqgan --config /dev/zero --out {tmp}/run --steps 1", ("/dev/zero", "not a regular file")),
]


@pytest.fixture
def names(reference_dir):
    return {"ckpt": reference_dir / "last.ckpt", "yaml": reference_dir / "project.yaml"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_checkpoint(case, tmp_path, names):
    run_case(case, tmp_path, names)
