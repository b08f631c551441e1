"""`taming-deploy generate` options, outputs and errors, on a tiny random model with a palette."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import save_tiny_model
from helpers import assert_one_line_error, run_cli
from taming_deploy.pipeline import Pipeline
from taming_deploy.training.data.synthetic_landscapes import PALETTE, colorize, render_scene

SIZE = "64x48"  # 16 x 12 latent cells at f=4: seconds on a CPU


@pytest.fixture(scope="module")
def label_map(tmp_path_factory) -> tuple[Path, Path]:
    """The same landscape layout as a class-id PNG and as an RGB picture in the palette."""
    labels = render_scene(5, 48, 64).labels
    folder = tmp_path_factory.mktemp("maps")
    Image.fromarray(labels, mode="L").save(folder / "ids.png")
    Image.fromarray(colorize(labels)).save(folder / "rgb.png")
    return folder / "ids.png", folder / "rgb.png"


def generate(model: Path, cond: Path, out: Path, *args: str):
    return run_cli("generate", "--model", str(model), "--backend", "torch", "--cond", str(cond), "--out", str(out), *args)


def test_rgb_palette_map_gives_the_same_image_as_the_class_id_map(tiny_checkpoint, label_map, tmp_path):
    ids, rgb = label_map
    for name, cond in (("a", ids), ("b", rgb)):
        proc = generate(tiny_checkpoint, cond, tmp_path / f"{name}.png", "--greedy", "--save-tokens", str(tmp_path / f"{name}.npy"))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == ""  # no progress bar when stdout is not a terminal
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    assert np.load(tmp_path / "a.npy").shape == (12, 16)
    assert Image.open(tmp_path / "a.png").size == (64, 48)


def test_colours_outside_the_palette_are_refused(tiny_checkpoint, label_map, tmp_path):
    rgb = np.asarray(Image.open(label_map[1])).copy()
    rgb[10, 10] = (1, 2, 3)  # one anti-aliased pixel
    Image.fromarray(rgb).save(tmp_path / "aa.png")
    assert_one_line_error(generate(tiny_checkpoint, tmp_path / "aa.png", tmp_path / "o.png"), "#010203", "palette")


def test_batch_writes_numbered_files_or_one_grid_and_stats(tiny_checkpoint, label_map, tmp_path):
    proc = generate(tiny_checkpoint, label_map[0], tmp_path / "s.png", "-n", "3", "--seed", "1", "--stats", str(tmp_path / "stats.json"))
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.name for p in tmp_path.glob("s_*.png"))
    assert files == ["s_000.png", "s_001.png", "s_002.png"]
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert {"sample_seconds", "decode_seconds", "tokens", "prefills", "steps", "backend", "mode"} <= set(stats)
    assert stats["tokens"] == 3 * 12 * 16 and stats["prefills"] + stats["steps"] == 12 * 16
    assert stats["backend"] == "torch" and stats["mode"] == "exact"
    proc = generate(tiny_checkpoint, label_map[0], tmp_path / "grid.png", "-n", "4", "--grid")
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "grid.png").size == (2 * 64, 2 * 48)


def test_same_seed_same_image_other_seed_other_image(tiny_checkpoint, label_map):
    pipeline = Pipeline.load(tiny_checkpoint, backend="torch")
    first = pipeline.generate(label_map[0], seed=3).tokens
    assert np.array_equal(first, pipeline.generate(label_map[0], seed=3).tokens)
    assert not np.array_equal(first, pipeline.generate(label_map[0], seed=4).tokens)


def test_size_resizes_the_condition_and_rounds_to_the_downsampling_factor(tiny_checkpoint, label_map, tmp_path):
    proc = generate(tiny_checkpoint, label_map[0], tmp_path / "o.png", "--size", "30x21", "--greedy")
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "o.png").size == (32, 20)


def test_fast_mode_uses_fewer_prefills(tiny_checkpoint):
    pipeline = Pipeline.load(tiny_checkpoint, backend="torch")
    labels = render_scene(2, 64, 128).labels
    exact = pipeline.generate(labels, greedy=True).stats
    fast = pipeline.generate(labels, greedy=True, mode="fast", window_stride=8).stats
    assert fast["prefills"] < exact["prefills"] / 2
    assert fast["prefills"] + fast["steps"] == exact["prefills"] + exact["steps"] == 16 * 32


def test_class_id_for_a_segmentation_model_is_refused(tiny_checkpoint, tmp_path):
    proc = run_cli("generate", "--model", str(tiny_checkpoint), "--backend", "torch", "--class-id", "3", "--out", str(tmp_path / "o.png"))
    assert_one_line_error(proc, "segmentation map")


@pytest.mark.slow
def test_bundle_without_condition_encoder_refuses_cond(tmp_path, label_map):
    from taming_deploy.export.exporter import export_bundle

    checkpoint = save_tiny_model(tmp_path / "unconditional", kind="unconditional")
    export_bundle(checkpoint, tmp_path / "bundle", calibration_count=2, fp16=False, echo=lambda line: None)
    proc = run_cli("generate", "--model", str(tmp_path / "bundle"), "--cond", str(label_map[0]), "--out", str(tmp_path / "o.png"))
    assert_one_line_error(proc, "no condition encoder")
    proc = run_cli("generate", "--model", str(tmp_path / "bundle"), "--size", "64x64", "--greedy", "--out", str(tmp_path / "u.png"))
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "u.png").size == (64, 64)


def test_pipeline_calls_from_several_threads_give_what_each_gives_alone(tiny_checkpoint, label_map):
    from concurrent.futures import ThreadPoolExecutor

    pipeline = Pipeline.load(tiny_checkpoint, backend="torch")
    alone = {seed: pipeline.generate(label_map[0], seed=seed).tokens for seed in range(4)}
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = dict(zip(range(4), pool.map(lambda seed: pipeline.generate(label_map[0], seed=seed).tokens, range(4))))
    for seed in range(4):
        np.testing.assert_array_equal(together[seed], alone[seed])
