"""Atomic writes: all or nothing, and the permissions a plain write would give."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from taming_deploy.errors import UserError
from taming_deploy.fileutil import OUTPUT_MARKER, atomic_directory, atomic_file, output_lock


def test_directory_replaces_the_old_one_only_on_success(tmp_path):
    target = tmp_path / "bundle"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash halfway")
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
    with atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == [OUTPUT_MARKER, "b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_written_paths_get_umask_permissions_not_private_temp_ones(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
        with atomic_file(tmp_path / "g.png") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "d" / "f").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "g.png").stat().st_mode) == 0o644


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    gone, alive = dead_pid(), os.getppid()  # our parent is alive and not us
    stale_dir = tmp_path / f".tmp-bundle-{gone}-abc"
    stale_old = tmp_path / f".old-bundle-{gone}-def"
    stale_file = tmp_path / f".tmp-o.png-{gone}-xyz"
    live = tmp_path / f".tmp-bundle-{alive}-ghi"
    for path in (stale_dir, stale_old, live):
        path.mkdir()
        (path / "half.onnx").write_text("x")
    stale_file.write_text("half a png")
    other = tmp_path / f".tmp-other-{gone}-jkl"
    other.mkdir()
    with atomic_directory(tmp_path / "bundle") as tmp:
        (tmp / "a").write_text("a")
    with atomic_file(tmp_path / "o.png") as tmp:
        tmp.write_text("png")
    assert not stale_dir.exists() and not stale_old.exists() and not stale_file.exists()
    assert live.exists() and other.exists()  # a running writer's, and another target's
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".tmp-")) == ["bundle", "o.png"]


def test_a_second_writer_of_the_same_target_is_refused_while_the_first_runs(tmp_path):
    target = tmp_path / "bundle"
    with output_lock(target):
        with pytest.raises(UserError, match="being written by another"):
            with atomic_directory(target):
                pass
    with atomic_directory(target) as tmp:  # free again, and the lock file is gone
        (tmp / "a").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_replacing_refuses_foreign_files_and_inputs(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "mine.txt").write_text("user")
    with pytest.raises(UserError, match="mine.txt"):
        with atomic_directory(target):
            pass
    assert (target / "mine.txt").read_text() == "user"
    (target / "mine.txt").unlink()
    with atomic_directory(target) as tmp:
        (tmp / "model").write_text("m")
    with atomic_directory(target / "engines") as tmp:  # a nested output of ours
        (tmp / "plan").write_text("p")
    (target / ".engines.lock").write_text("")  # a killed build of the nested output left these
    (target / ".tmp-engines-123-abc").mkdir()
    with atomic_directory(target) as tmp:  # replaces both
        (tmp / "model").write_text("m2")
    with pytest.raises(UserError, match="would replace the input"):
        with atomic_directory(tmp_path, inputs=[target / "model"]):
            pass
    assert (target / "model").read_text() == "m2" and not (target / "engines").exists()
