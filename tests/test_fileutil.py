"""Atomic writes: all or nothing, and the permissions a plain write would give."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from taming_deploy.errors import UserError
from taming_deploy.fileutil import CARRIED_JOURNAL, OUTPUT_MARKER, atomic_directory, atomic_file, output_lock


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


def test_force_keeps_the_other_entries_and_replaces_only_its_own(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "model").write_text("old model")
        (tmp / "stale").write_text("an entry the new output no longer has")
    (target / "notes.txt").write_text("user")
    (target / "data").mkdir()
    (target / "data" / "x").write_text("user data")
    (target / "config.json").write_text("the user's, under a name the output writes")
    with pytest.raises(UserError, match="--force"):
        with atomic_directory(target):
            pass
    with atomic_directory(target, force=True) as tmp:
        (tmp / "model").write_text("new model")
        (tmp / "config.json").write_text("ours")
    assert sorted(p.name for p in target.iterdir()) == [OUTPUT_MARKER, "config.json", "data", "model", "notes.txt"]
    assert (target / "model").read_text() == "new model" and (target / "config.json").read_text() == "ours"
    assert (target / "notes.txt").read_text() == "user" and (target / "data" / "x").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no journal, temporary or lock left
    with pytest.raises(UserError, match="notes.txt"):  # the kept files are still the user's, not ours
        with atomic_directory(target):
            pass


def test_force_never_replaces_an_input_or_a_file(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "last.ckpt").write_text("input")
    with pytest.raises(UserError, match="would replace the input"):
        with atomic_directory(tmp_path / "in", inputs=[tmp_path / "in" / "last.ckpt"], force=True):
            pass
    (tmp_path / "f").write_text("a file")
    with pytest.raises(UserError, match="not a directory"):
        with atomic_directory(tmp_path / "f", force=True):
            pass
    assert (tmp_path / "in" / "last.ckpt").read_text() == "input" and (tmp_path / "f").read_text() == "a file"


def killed_forced_writer(tmp_path, target_moved_aside: bool):
    """The state a ``force`` writer leaves when killed after carrying the user's entry into its finished
    output: before (target still there) or after (target moved into an .old- directory) the first rename."""
    gone = dead_pid()
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "model").write_text("old model")
    new = tmp_path / f".tmp-out-{gone}-abc"
    new.mkdir()
    (new / "model").write_text("new model")
    (new / OUTPUT_MARKER).write_text((target / OUTPUT_MARKER).read_text())
    (new / CARRIED_JOURNAL).write_text('{"entries": ["notes.txt"]}\n')
    (new / "notes.txt").write_text("user")
    if target_moved_aside:
        old = tmp_path / f".old-out-{gone}-def"
        old.mkdir()
        os.replace(target, old / "out")
    return target


@pytest.mark.parametrize("target_moved_aside", [False, True])
def test_the_next_writer_gives_back_what_a_killed_forced_writer_carried(tmp_path, target_moved_aside):
    target = killed_forced_writer(tmp_path, target_moved_aside)
    with pytest.raises(UserError, match="notes.txt"):  # recovered first, then the user's file is seen
        with atomic_directory(target):
            pass
    assert (target / "notes.txt").read_text() == "user"
    assert (target / "model").read_text() == ("new model" if target_moved_aside else "old model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert not (target / CARRIED_JOURNAL).exists()


def test_own_files_are_recognised_by_their_mark(tmp_path):
    from PIL import Image

    from taming_deploy.images import save_image
    from taming_deploy.output_marks import is_own_file, marked_document

    image = Image.new("RGB", (8, 8), (10, 20, 30))
    for suffix, fmt in ((".png", "PNG"), (".jpg", "JPEG"), (".webp", "WEBP")):
        save_image(image, tmp_path / f"ours{suffix}", fmt)
        image.save(tmp_path / f"theirs{suffix}", format=fmt)
        assert is_own_file(tmp_path / f"ours{suffix}") and not is_own_file(tmp_path / f"theirs{suffix}")
    exif = Image.Exif()
    exif[0x0131] = "GIMP 2.10"
    image.save(tmp_path / "edited.png", exif=exif.tobytes())
    (tmp_path / "ours.json").write_text(json.dumps(marked_document({"tokens": 3})))
    (tmp_path / "list.json").write_text('["taming-deploy"]')
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (tmp_path / "tokens.npy").write_bytes(b"\x93NUMPY")
    assert is_own_file(tmp_path / "ours.json")
    for name in ("edited.png", "list.json", "garbage.png", "tokens.npy", "missing.png"):
        assert not is_own_file(tmp_path / name), name


def test_an_existing_file_is_replaced_only_when_ours_or_forced(tmp_path):
    from taming_deploy.images import save_image
    from PIL import Image

    target = tmp_path / "o.png"
    target.write_bytes(b"the user's photo")
    with pytest.raises(UserError, match="did not write it.*--force"):
        with atomic_file(target):
            pass
    assert target.read_bytes() == b"the user's photo"
    with atomic_file(target, force=True) as tmp:
        save_image(Image.new("RGB", (4, 4)), tmp, "PNG")
    with atomic_file(target) as tmp:  # now it is ours
        save_image(Image.new("RGB", (5, 5)), tmp, "PNG")
    assert Image.open(target).size == (5, 5)
