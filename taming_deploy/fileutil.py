"""Atomic, crash-safe replacement of output files and directories, and file hashing.

Every directory taming-deploy writes (checkpoint, bundle, engines, training state) carries a marker file,
``.taming-deploy-output``, listing the entries it wrote. An existing ``--out`` is replaced only when it is
such an output and holds nothing else (or is empty), so a mistyped ``--out`` never deletes a user's files,
and never a directory that holds one of the command's inputs. With ``force`` a directory holding other
files is accepted too, and only the command's own entries are replaced: the other entries move into the
new directory before it is renamed in (journaled, so that a writer killed in between loses none of them).
Files follow the same rule through their marks (see ``output_marks``). Writers hold a lock beside the
target, name their temporary directories with their pid, and clean up after the ones that were killed.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

from taming_deploy.errors import UserError
from taming_deploy.output_marks import is_own_file

OUTPUT_MARKER = ".taming-deploy-output"
CARRIED_JOURNAL = ".taming-deploy-carried"  # in a temporary output: the entries moved into it from the target
WRITE_ERRORS = (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EEXIST,
                errno.EACCES, errno.EPERM, errno.EISDIR)
TEMP_NAME_CHARS = 48
NAME_MAX = 255  # bytes in one path component on Linux file systems  # of the target's name in temporary names: keeps them under NAME_MAX for long targets


def default_mode(directory: bool) -> int:
    """The permissions a plain mkdir/open would give (mkdtemp/mkstemp make private 0700/0600 paths)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


WRITER_LEFTOVER = re.compile(rf"\.(tmp|old)-.+-\d+-.+|\..+\.lock|{re.escape(CARRIED_JOURNAL)}")  # what a writer killed inside an output leaves


def foreign_entries(path: Path) -> list[str]:
    """The entries of a directory that taming-deploy did not write there: all of them without the marker;
    nested outputs of ours (e.g. a bundle's engines/) and a killed nested writer's leftovers count as ours."""
    entries = sorted(path.iterdir())
    try:
        listed = set(json.loads((path / OUTPUT_MARKER).read_text())["entries"])
    except (OSError, ValueError, KeyError, TypeError):
        return [entry.name for entry in entries]
    own_dir = lambda entry: entry.is_dir() and not entry.is_symlink() and not foreign_entries(entry)  # noqa: E731
    return [entry.name for entry in entries
            if entry.name != OUTPUT_MARKER and not (entry.name in listed and not entry.is_symlink()) and not own_dir(entry)
            and not WRITER_LEFTOVER.fullmatch(entry.name)]


def check_replaceable(target: Path, inputs: Iterable[Path] = (), force: bool = False) -> None:
    """Raise UserError unless ``target`` may be replaced: absent, an empty directory or an earlier output of
    ours (with ``force``, any directory), and holding none of ``inputs``."""
    target = Path(target)
    check_output_name(target)
    resolved = target.resolve()
    for source in inputs:
        source_resolved = Path(source).resolve()
        if source_resolved == resolved or source_resolved.is_relative_to(resolved):
            raise UserError(f"{target}: the output directory would replace the input {source}; choose another --out")
    if os.path.lexists(target):
        if target.is_symlink() or not target.is_dir():
            raise UserError(f"{target} exists and is not a directory; choose another --out or remove it")
        if not force and (foreign := foreign_entries(target)):
            shown = ", ".join(foreign[:3]) + (f", ... ({len(foreign)} entries)" if len(foreign) > 3 else "")
            raise UserError(f"{target} already holds files taming-deploy did not write ({shown}); choose another --out, "
                            "or pass --force to write into it (its other files are kept)")
    check_can_create_in(existing_ancestor(target), target)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_prefix(kind: str, target: Path) -> str:
    return f".{kind}-{target.name[:TEMP_NAME_CHARS]}-{os.getpid()}-"


def remove_stale_temporaries(target: Path) -> None:
    """Remove temporary siblings of ``target`` whose writer (the pid in their name) is gone, first giving
    back what a killed ``force`` writer had carried into one (see ``restore_carried``)."""
    pattern = re.compile(rf"\.(tmp|old)-{re.escape(target.name[:TEMP_NAME_CHARS])}-(\d+)-")
    stale = [sibling for sibling in target.parent.iterdir()
             if (match := pattern.match(sibling.name)) and int(match.group(2)) != os.getpid() and not pid_alive(int(match.group(2)))]
    for sibling in stale:
        if (sibling / CARRIED_JOURNAL).is_file():
            restore_carried(sibling, target)
    for sibling in stale:
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)


def restore_carried(tmp: Path, target: Path) -> None:
    """Undo a killed writer's carry: the user's entries it had moved from ``target`` into its finished
    temporary output ``tmp`` go back. If it died after moving ``target`` aside, ``tmp`` (complete: the
    journal is written only after the output is) becomes ``target``."""
    if not os.path.lexists(target):
        os.replace(tmp, target)
        (target / CARRIED_JOURNAL).unlink()
        fsync_path(target.parent)
        return
    for name in json.loads((tmp / CARRIED_JOURNAL).read_text())["entries"]:
        if os.path.lexists(tmp / name) and not os.path.lexists(target / name):
            os.replace(tmp / name, target / name)
    fsync_path(target)


def carry_foreign_entries(target: Path, tmp: Path) -> None:
    """Move the entries of ``target`` that taming-deploy did not write, and that the new output ``tmp``
    does not replace, into ``tmp``: after the rename they are where they were. The journal goes first."""
    carried = [name for name in foreign_entries(target) if not os.path.lexists(tmp / name)]
    if not carried:
        return
    (tmp / CARRIED_JOURNAL).write_text(json.dumps({"entries": carried}) + "\n")
    fsync_path(tmp / CARRIED_JOURNAL)
    fsync_path(tmp)
    for name in carried:
        os.replace(target / name, tmp / name)
    fsync_path(target)
    fsync_path(tmp)


@contextlib.contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """Hold ``.<name>.lock`` beside ``target``; a second writer of the same target is refused at once."""
    lock_path = target.parent / f".{target.name[:NAME_MAX - 6]}.lock"
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{target} is being written by another taming-deploy process; wait for it to finish") from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)  # the previous holder removed the lock file after we opened it: take the new one
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(fd)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
        if not path.is_symlink():
            fsync_path(path)
    fsync_path(root)


@contextlib.contextmanager
def writing(target: Path) -> Iterator[None]:
    """Turn a failure to write (read-only or full file system, name too long, parent not a directory)
    into a UserError naming the target."""
    try:
        yield
    except OSError as exc:
        if exc.errno in WRITE_ERRORS:
            raise UserError(f"cannot write {target}: {exc.strerror or exc}") from None
        raise


@contextlib.contextmanager
def atomic_directory(target: Path, inputs: Iterable[Path] = (), force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``target``; on success it replaces ``target``.

    ``target`` must be absent, empty, or an earlier output of taming-deploy (with ``force``, any
    directory: entries the new output does not replace are kept), and must not hold any of ``inputs``
    (see ``check_replaceable``). If the body raises (or the process dies), ``target`` is untouched and the
    temporary directory is removed (after a hard kill, by the next writer of ``target``). The new
    directory and its files are fsynced before the rename, an existing ``target`` is moved aside, the new
    one renamed in, the parent fsynced, and only then the old one deleted.
    """
    target = Path(target)
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
    inputs = list(inputs)
    with writing(target), output_lock(target):
        remove_stale_temporaries(target)
        check_replaceable(target, inputs, force)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix("tmp", target), dir=target.parent))
        try:
            yield tmp
            entries = sorted(p.name for p in tmp.iterdir())
            (tmp / OUTPUT_MARKER).write_text(json.dumps({"written_by": "taming-deploy", "entries": entries}) + "\n")
            tmp.chmod(default_mode(directory=True))
            for path in tmp.rglob("*"):
                path.chmod(default_mode(directory=path.is_dir()))
            fsync_tree(tmp)
            check_replaceable(target, inputs, force)  # again: the body may have run for hours
            if force and target.is_dir():
                carry_foreign_entries(target, tmp)
        except BaseException:
            if (tmp / CARRIED_JOURNAL).is_file():
                restore_carried(tmp, target)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=temp_prefix("old", target), dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
        fsync_path(target.parent)
        (target / CARRIED_JOURNAL).unlink(missing_ok=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def check_output_file(target: Path, force: bool = False) -> None:
    """Raise UserError unless ``target`` names a file we may create or replace: absent, or a regular file
    (not a directory, device, pipe or socket) that taming-deploy wrote (with ``force``, any regular file)."""
    target = Path(target)
    if not target.name or target.name in (".", ".."):
        raise UserError(f"output path {str(target)!r} names no file")
    check_output_name(target)
    ancestor = existing_ancestor(target)
    if target.is_symlink() and not force:
        raise UserError(f"{target} is a symbolic link; choose another name, or pass --force to replace the link "
                        "(never the file it points to)")
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise UserError(f"cannot write {target}: {exc.strerror or exc}") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise UserError(f"{target} is a directory; name an output file")
    if mode is not None and not stat.S_ISREG(mode):
        raise UserError(f"{target} exists and is not a regular file (a device, pipe or socket); name an output file")
    if mode is not None and not force and not is_own_file(target):
        raise UserError(f"{target} exists and taming-deploy did not write it; choose another name, or pass --force to replace it")
    check_can_create_in(ancestor, target)


def check_output_name(target: Path) -> None:
    """An output's name: within NAME_MAX, and free of control characters (a newline in a file name breaks
    every line-based tool, and the lines taming-deploy prints about it)."""
    if len(os.fsencode(target.name)) > NAME_MAX:
        raise UserError(f"{target.name[:40]}...: file name too long ({len(os.fsencode(target.name))} bytes, at most {NAME_MAX})")
    if any(unicodedata.category(ch) == "Cc" for ch in target.name):
        raise UserError(f"{target}: the output name holds a control character (a newline?); choose a plain name")


def existing_ancestor(target: Path) -> Path:
    """The nearest existing directory above ``target``, where its writer's temporaries (and missing parents) go."""
    ancestor = target.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot write {target}: {ancestor} is not a directory")
    return ancestor


def check_can_create_in(directory: Path, target: Path) -> None:
    """Create and remove a temporary file in ``directory``: a read-only file system, missing permissions or
    a pseudo file system (/proc) is found here, before the work, not when the result is written. (Permission
    bits alone do not tell: root passes them, and /proc refuses new files whatever they say.)"""
    try:
        fd, name = tempfile.mkstemp(prefix=temp_prefix("tmp", target), dir=directory)
    except OSError as exc:
        raise UserError(f"cannot write {target}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(name)


@contextlib.contextmanager
def atomic_file(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is fsynced and renamed over ``target``.

    ``target`` must be absent or a file we may replace (``check_output_file``); a failure to write ends
    in a UserError naming it, and never leaves the temporary file behind.
    """
    target = Path(target)
    check_output_file(target, force)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
        fd, name = tempfile.mkstemp(prefix=temp_prefix("tmp", target), dir=target.parent)
    except OSError as exc:  # any reason: nothing of ours is running yet (read-only, /proc, permissions...)
        raise UserError(f"cannot write {target}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp = Path(name)
    with writing(target):
        try:
            yield tmp
            tmp.chmod(default_mode(directory=False))
            fsync_path(tmp)
            check_output_file(target, force)
            os.replace(tmp, target)
            fsync_path(target.parent)
        finally:
            tmp.unlink(missing_ok=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_relative_name(name: str, source: str) -> str:
    """A file name a document gives, refused unless it is a plain relative path (no '..', not absolute)."""
    parts = PurePosixPath(name).parts
    if not name or name.startswith("/") or ".." in parts or "\\" in name or "\x00" in name or len(name) > 1024:
        raise UserError(f"{source}: the file name {name[:60]!r} is not a plain relative path inside its directory")
    return name


def contained_path(root: Path, name: str, source: str) -> Path:
    """``root / name``, refused unless it resolves inside ``root`` (symlinks included)."""
    path = Path(root) / check_relative_name(name, source)
    resolved, inside = path.resolve(), Path(root).resolve()
    if not resolved.is_relative_to(inside):
        raise UserError(f"{source}: {name} points outside {root} (to {resolved}); refusing to load it")
    return path
