"""Hostile output paths: nothing that is not the command's own earlier output is replaced, and a bad
``--out`` is one line of error before any work. See tests/hostile.py for what every case asserts."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from helpers import assert_one_line_error, run_cli
from hostile import Case, copy_of, run_case, then, write

GENERATE = "generate --model {checkpoint} --backend torch --cond {labels} --greedy"
IMPORT = "import-taming {ckpt} --config {yaml}"
TRAIN = "train vqgan --config {vqgan_config} --steps 1"


def files(*names: str):
    def setup(tmp: Path, _names) -> None:
        for name in names:
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"user data {name}")
    return setup


def link(name: str, to: str):
    def setup(tmp: Path, _names) -> None:
        os.symlink(to, tmp / name)
    return setup


CASES = [
    Case("import-into-dir-with-user-files", IMPORT + " --out {tmp}/out", ("did not write", "notes.txt"), files("out/notes.txt")),
    Case("import-into-dir-holding-its-input", "import-taming {tmp}/in/last.ckpt --config {yaml} --out {tmp}/in", ("input",),
         then(write("in/keep", "x"), copy_of("ckpt", "in/last.ckpt"))),
    Case("import-onto-a-file", IMPORT + " --out {tmp}/out", ("not a directory",), files("out")),
    Case("export-into-dir-with-user-files", "export {checkpoint} --out {tmp}/b --no-fp16", ("did not write",), files("b/x.onnx")),
    Case("export-into-its-own-checkpoint", "export {tmp}/ck --out {tmp}/ck --no-fp16", ("input",),
         copy_of("checkpoint", "ck")),
    Case("export-into-parent-of-checkpoint", "export {tmp}/p/ck --out {tmp}/p --no-fp16", ("input",),
         then(write("p/keep", "x"), copy_of("checkpoint", "p/ck"))),
    Case("generate-onto-directory", GENERATE + " --out {tmp}/d", ("is a directory",), files("d/keep.png")),
    Case("generate-under-a-file", GENERATE + " --out {tmp}/f.txt/x.png", ("not a directory",), files("f.txt")),
    Case("generate-empty-out", GENERATE + " --out ''", ("names no file",)),
    Case("generate-name-too-long", GENERATE + " --out {tmp}/" + "a" * 300 + ".png", ("too long",)),
    Case("generate-unknown-extension", GENERATE + " --out {tmp}/x.gif", ("unknown image file type", ".gif")),
    Case("generate-no-extension", GENERATE + " --out {tmp}/x", ("unknown image file type",)),
    Case("generate-into-sysfs", GENERATE + " --out /sys/x.png", ("cannot write", "/sys/x.png")),  # read-only or root-only
    Case("generate-into-procfs", GENERATE + " --out /proc/x.png", ("cannot write", "/proc/x.png")),
    Case("train-into-dir-with-user-files", TRAIN + " --out {tmp}/run", ("already holds files", "notes.txt"),
         files("run/notes.txt", "run/train_config.json", "run/metrics.jsonl")),
    Case("train-into-procfs", TRAIN + " --out /proc/taming-run", ("cannot write", "/proc/taming-run")),
    Case("export-into-procfs", "export {checkpoint} --out /proc/taming-bundle --no-fp16", ("cannot write", "/proc/taming-bundle")),
    Case("import-into-procfs", IMPORT + " --out /proc/taming-ckpt", ("cannot write", "/proc/taming-ckpt")),
    Case("train-onto-a-file", TRAIN + " --out {tmp}/run", ("not a directory",), files("run")),
    Case("generate-tokens-onto-directory", GENERATE + " --out {tmp}/o.png --save-tokens {tmp}/d", ("is a directory",), files("d/k")),
    Case("generate-stats-onto-its-own-out", GENERATE + " --out {tmp}/o.png --stats {tmp}/o.png", ("different files",)),
    Case("generate-tokens-onto-a-numbered-out", GENERATE + " --out {tmp}/o.png -n 2 --save-tokens {tmp}/o_001.png", ("different files",)),
    Case("generate-onto-a-user-file", GENERATE + " --out {tmp}/photo.png", ("photo.png", "did not write", "--force"), files("photo.png")),
    Case("generate-stats-onto-a-user-file", GENERATE + " --out {tmp}/o.png --stats {tmp}/s.json", ("s.json", "--force"), files("s.json")),
    Case("generate-tokens-onto-an-npy", GENERATE + " --out {tmp}/o.png --save-tokens {tmp}/t.npy", ("t.npy", "--force"), files("t.npy")),
    Case("generate-force-onto-directory", GENERATE + " --out {tmp}/d --force", ("is a directory",), files("d/keep.png")),
    Case("generate-force-onto-device", GENERATE + " --out /dev/null --force", ("not a regular file",)),
    Case("legend-onto-a-user-file", "info {checkpoint} --legend {tmp}/legend.png", ("legend.png", "--force"), files("legend.png")),
    Case("legend-unknown-extension", "info {checkpoint} --legend {tmp}/legend.txt", ("unknown image file type",)),
    Case("eval-json-onto-a-user-file", "eval --quick --what labels --json {tmp}/r.json", ("r.json", "--force"), files("r.json")),
    Case("eval-images-onto-a-file", "eval --quick --what labels --save-images {tmp}/ex", ("not a directory",), files("ex")),
    Case("eval-images-onto-a-user-png", "eval --quick --what labels --save-images {tmp}/ex", ("labels_256x256_000.png", "--force"),
         files("ex/labels_256x256_000.png")),
    Case("import-force-into-dir-holding-its-input", "import-taming {tmp}/in/last.ckpt --config {yaml} --out {tmp}/in --force", ("input",),
         then(write("in/keep", "x"), copy_of("ckpt", "in/last.ckpt"))),
    Case("export-force-onto-a-file", "export {checkpoint} --out {tmp}/b --no-fp16 --force", ("not a directory",), files("b")),
    Case("train-force-with-resume", TRAIN + " --out {tmp}/run --resume --force", ("--force", "--resume"), files("run/notes.txt")),
    Case("train-force-onto-a-file", TRAIN + " --out {tmp}/run --force", ("not a directory",), files("run")),
    Case("generate-onto-a-dangling-symlink", GENERATE + " --out {tmp}/o.png", ("symbolic link", "--force"), link("o.png", "nowhere.png")),
    Case("generate-onto-a-symlink-to-a-user-file", GENERATE + " --out {tmp}/o.png", ("o.png",),
         then(files("photo.png"), link("o.png", "photo.png"))),
    Case("generate-stats-onto-a-symlink", GENERATE + " --out {tmp}/o.png --stats {tmp}/s.json", ("s.json", "symbolic link"),
         link("s.json", "/dev/null")),
    Case("generate-name-with-control-character", GENERATE + " --out '{tmp}/a\x1bb.png'", ("control character",)),
    Case("export-name-with-newline", "export {checkpoint} --out '{tmp}/b\nc' --no-fp16", ("b\\nc", "control character")),
]


@pytest.fixture
def names(imported_checkpoint, label_png, reference_dir):
    return {"checkpoint": imported_checkpoint, "labels": label_png, "ckpt": reference_dir / "last.ckpt",
            "yaml": reference_dir / "project.yaml",
            "vqgan_config": Path(__file__).resolve().parents[1] / "training" / "configs" / "default_vqgan.yaml"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_output_path(case, tmp_path, names):
    run_case(case, tmp_path, names)


def test_an_unwritable_out_is_found_before_sampling(tmp_path):
    """The embedded model prints its backend line when sampling starts: one line of error means none began."""
    example = Path(__file__).resolve().parents[1] / "examples" / "landscape_01.png"
    proc = run_cli("generate", "--cond", str(example), "--out", "/proc/x.png")
    assert_one_line_error(proc, "cannot write", "/proc/x.png")


def test_device_node_is_never_replaced(names, tmp_path):
    before = os.stat("/dev/null")
    proc = run_cli(*GENERATE.format(**names).split(), "--out", "/dev/null")
    assert_one_line_error(proc, "/dev/null", "not a regular file")
    after = os.stat("/dev/null")
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)


@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG"), (".jpg", b"\xff\xd8\xff"), (".JPEG", b"\xff\xd8\xff"),
                                          (".webp", b"RIFF")])
def test_output_format_follows_the_extension(tmp_path, suffix, magic):
    from taming_deploy.images import output_format, save_image

    out = tmp_path / f"o{suffix}"
    save_image(Image.new("RGB", (16, 8), (200, 30, 10)), out, output_format(out))
    assert out.read_bytes().startswith(magic)
    assert Image.open(out).size == (16, 8)


def test_generate_writes_the_format_its_out_names_under_a_long_name(names, tmp_path):
    out = tmp_path / ("a" * 240 + ".webp")  # a long name that fits NAME_MAX: the temporary name must fit too
    proc = run_cli(*GENERATE.format(**names).split(), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes().startswith(b"RIFF") and Image.open(out).format == "WEBP"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_full_file_system_is_one_line_and_leaves_nothing(names, tmp_path):
    """RLIMIT_FSIZE makes every write past 1 KiB fail with EFBIG, as a full disk fails with ENOSPC
    (Python ignores SIGXFSZ, so the write raises instead of killing the process)."""
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    args = GENERATE.format(**names).split() + ["--out", str(tmp_path / "o.png")]
    proc = subprocess.run([sys.executable, "-m", "taming_deploy.cli", *args], capture_output=True, text=True,
                          preexec_fn=limit_file_size, timeout=600)
    assert proc.returncode == 2
    assert_one_line_error(proc, "cannot write", "o.png")
    assert list(tmp_path.iterdir()) == []


def test_own_output_is_replaced_but_not_one_a_user_added_to(names, tmp_path):
    out = tmp_path / "out"
    for _ in range(2):  # the second import replaces the first one's output
        proc = run_cli(*IMPORT.format(**names).split(), "--out", str(out))
        assert proc.returncode == 0, proc.stderr
    (out / "my_notes.txt").write_text("mine")
    assert_one_line_error(run_cli(*IMPORT.format(**names).split(), "--out", str(out)), "my_notes.txt")
    assert (out / "my_notes.txt").read_text() == "mine"
