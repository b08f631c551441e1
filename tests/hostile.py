"""The table-driven battery of hostile inputs: a case is one line (an id, a command line, a setup, words
the error must contain), and every case is checked the same way: exit code 2, exactly one line on stderr,
no traceback, and nothing changed in the test's directory (which holds every file the case names)."""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from helpers import assert_one_line_error, run_cli

Setup = Callable[[Path, dict[str, Path]], None]  # (the test's directory, the named fixture paths)


@dataclass(frozen=True)
class Case:
    id: str
    command: str  # shell words; {tmp}, {checkpoint}, {bundle}, {labels}, {ckpt}, {yaml} are filled in
    needles: tuple[str, ...] = ()
    setup: Setup | None = None


def tree_state(root: Path) -> dict[str, str]:
    """Every path under ``root`` -> its kind and content hash (files), target (links) or mode (others)."""
    state: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        key = str(path.relative_to(root))
        if stat.S_ISLNK(info.st_mode):
            state[key] = f"link {os.readlink(path)}"
        elif stat.S_ISREG(info.st_mode):
            state[key] = "file " + hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            state[key] = f"mode {info.st_mode:o}"
    return state


def run_case(case: Case, tmp: Path, names: dict[str, Path]) -> subprocess.CompletedProcess:
    """Run one case and assert what every hostile input must give; return the process for extra checks."""
    if case.setup is not None:
        case.setup(tmp, names)
    before = tree_state(tmp)
    words = [word.format(tmp=tmp, **names) for word in shlex.split(case.command)]
    proc = run_cli(*words)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert_one_line_error(proc, *case.needles)
    assert len(proc.stderr) < 2000, "an error message should be one readable line"
    assert tree_state(tmp) == before, "a refused command changed files"
    return proc


def copy_of(name: str, to: str) -> Setup:
    """Copy the named fixture (a bundle or checkpoint directory, or a file) to ``tmp/to``."""
    def setup(tmp: Path, names: dict[str, Path]) -> None:
        source = names[name]
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp / to)
    return setup


def then(*setups: Setup) -> Setup:
    def setup(tmp: Path, names: dict[str, Path]) -> None:
        for step in setups:
            step(tmp, names)
    return setup


def write(relative: str, content: str | bytes) -> Setup:
    def setup(tmp: Path, names: dict[str, Path]) -> None:
        path = tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)  # type: ignore[operator]
    return setup


def edit_json(relative: str, dotted: str, value: object) -> Setup:
    """Set one field (``a.b.0.c``; ``-`` deletes it) of a JSON file under tmp."""
    def setup(tmp: Path, names: dict[str, Path]) -> None:
        path = tmp / relative
        document = json.loads(path.read_text())
        *parents, last = dotted.split(".")
        node = document
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        key = int(last) if isinstance(node, list) else last
        if value == "-":
            del node[key]
        else:
            node[key] = value
        path.write_text(json.dumps(document))
    return setup


def edit_text(relative: str, old: str, new: str, count: int = -1) -> Setup:
    """Replace ``old`` (which must occur) by ``new`` in a text file under tmp: for what JSON cannot say."""
    def setup(tmp: Path, names: dict[str, Path]) -> None:
        path = tmp / relative
        text = path.read_text()
        assert old in text, (relative, old)
        path.write_text(text.replace(old, new, count))
    return setup
