"""``--force``: a command writes over what it did not write, and replaces only its own entries; without
it, its own earlier outputs (marked) are replaced and nothing else is."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import assert_one_line_error, run_cli

VQGAN_CONFIG = Path(__file__).resolve().parents[1] / "training" / "configs" / "default_vqgan.yaml"


@pytest.fixture
def generate_args(imported_checkpoint, label_png):
    return ["generate", "--model", str(imported_checkpoint), "--backend", "torch", "--cond", str(label_png), "--greedy"]


def test_generate_replaces_its_own_outputs_and_others_only_with_force(generate_args, tmp_path):
    out, stats, tokens = tmp_path / "o.png", tmp_path / "s.json", tmp_path / "t.npy"
    outputs = ["--out", str(out), "--stats", str(stats)]
    for _ in range(2):  # the second run replaces the first one's (marked) image and stats
        proc = run_cli(*generate_args, *outputs)
        assert proc.returncode == 0, proc.stderr
    assert json.loads(stats.read_text())["written_by"] == "taming-deploy"
    first = out.read_bytes()
    out.write_bytes(b"the user's own picture")
    tokens.write_bytes(b"the user's array")
    refused = run_cli(*generate_args, *outputs, "--save-tokens", str(tokens))
    assert_one_line_error(refused, "o.png", "--force")
    assert out.read_bytes() == b"the user's own picture" and tokens.read_bytes() == b"the user's array"
    proc = run_cli(*generate_args, *outputs, "--save-tokens", str(tokens), "--force")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == first  # greedy: the same image as before
    assert np.load(tokens).ndim == 2


def test_import_with_force_keeps_the_users_files(reference_dir, tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "config.json").write_text("a name the checkpoint writes")
    args = ["import-taming", str(reference_dir / "last.ckpt"), "--config", str(reference_dir / "project.yaml"), "--out", str(out)]
    assert_one_line_error(run_cli(*args), "notes.txt", "--force")
    proc = run_cli(*args, "--force")
    assert proc.returncode == 0, proc.stderr
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "config.json").read_text())["transformer"]["n_layer"] >= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    info = run_cli("info", str(out))  # the checkpoint beside the user's file loads
    assert info.returncode == 0, info.stderr


@pytest.mark.slow
def test_train_with_force_replaces_the_runs_own_entries_only(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    (run / "metrics.jsonl").write_text('{"step": 999, "loss": 1.0}\n')
    args = ["train", "vqgan", "--config", str(VQGAN_CONFIG), "--steps", "1", "--batch-size", "1", "--out", str(run)]
    assert_one_line_error(run_cli(*args), "already holds files", "--force")
    proc = run_cli(*args, "--force")
    assert proc.returncode == 0, proc.stderr
    assert (run / "notes.txt").read_text() == "mine"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(row["step"] <= 1 for row in rows)
    assert (run / "final").is_dir()


def test_legend_is_marked_and_replaced_on_a_second_run(tmp_path):
    legend = tmp_path / "legend.webp"
    for _ in range(2):
        proc = run_cli("info", "--legend", str(legend))  # the embedded model has a palette
        assert proc.returncode == 0, proc.stderr
    assert Image.open(legend).format == "WEBP"
