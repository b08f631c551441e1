"""Bad input ends in one line on stderr and a non-zero exit code, never a traceback."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import assert_one_line_error, run_cli


def generate(model: Path, cond: Path, out: Path) -> subprocess.CompletedProcess:
    return run_cli("generate", "--model", str(model), "--backend", "torch", "--cond", str(cond), "--out", str(out))


def test_label_id_out_of_range(imported_checkpoint, expected, tmp_path):
    labels = expected["labels"].astype(np.uint8)
    labels[0, :3] = [9, 255, 7]
    Image.fromarray(labels, mode="L").save(tmp_path / "bad.png")
    proc = generate(imported_checkpoint, tmp_path / "bad.png", tmp_path / "out.png")
    assert_one_line_error(proc, "7, 9, 255", "0..6")
    assert not (tmp_path / "out.png").exists()


def test_rgb_image_where_labels_expected(imported_checkpoint, tmp_path):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "rgb.png")
    assert_one_line_error(generate(imported_checkpoint, tmp_path / "rgb.png", tmp_path / "o.png"), "mode RGB")


def test_truncated_png(imported_checkpoint, label_png, tmp_path):
    data = label_png.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert_one_line_error(generate(imported_checkpoint, tmp_path / "cut.png", tmp_path / "o.png"), "truncated")


def test_checkpoint_with_missing_keys_names_them(reference_dir, tmp_path):
    ckpt = torch.load(reference_dir / "last.ckpt", map_location="cpu", weights_only=True)
    del ckpt["state_dict"]["transformer.ln_f.weight"]
    del ckpt["state_dict"]["first_stage_model.quant_conv.bias"]
    torch.save(ckpt, tmp_path / "broken.ckpt")
    proc = run_cli("import-taming", str(tmp_path / "broken.ckpt"), "--config", str(reference_dir / "project.yaml"),
                   "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, "missing", "transformer.ln_f.weight", "first_stage_model.quant_conv.bias")
    assert not (tmp_path / "out").exists()


def test_checkpoint_needing_unpickling_is_refused_without_trust(reference_dir, tmp_path):
    ckpt = torch.load(reference_dir / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["callbacks"] = {"checkpoint": Path("/tmp")}  # an arbitrary Python object, as Lightning stores
    torch.save(ckpt, tmp_path / "pickled.ckpt")
    args = ["import-taming", str(tmp_path / "pickled.ckpt"), "--config", str(reference_dir / "project.yaml"),
            "--out", str(tmp_path / "out")]
    assert_one_line_error(run_cli(*args), "--trust-pickle")
    assert run_cli(*args, "--trust-pickle").returncode == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("size", ["12x", "0x64", "abc"])
def test_bad_size(imported_checkpoint, label_png, tmp_path, size):
    proc = run_cli("generate", "--model", str(imported_checkpoint), "--backend", "torch", "--cond", str(label_png),
                   "--size", size, "--out", str(tmp_path / "o.png"))
    assert_one_line_error(proc, "--size")
