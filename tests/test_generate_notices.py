"""What `generate` tells the user before sampling: backend choice, rounded sizes, grids under the window;
and the messages and help of its sampling options."""
from __future__ import annotations

import contextlib
import re

import numpy as np
import pytest
from PIL import Image

from helpers import assert_one_line_error, run_cli
from taming_deploy import progress
from taming_deploy.cli import app
from taming_deploy.training.data.synthetic_landscapes import render_scene


@pytest.fixture(scope="module")
def label_map(tmp_path_factory):
    path = tmp_path_factory.mktemp("maps") / "ids.png"
    Image.fromarray(render_scene(5, 96, 96).labels, mode="L").save(path)
    return path


def generate(model, cond, out, *args):
    return run_cli("generate", "--model", str(model), "--backend", "torch", "--cond", str(cond), "--out", str(out), *args)


def notices(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if not line.startswith("wrote ")]


def test_a_rounded_size_and_a_grid_under_the_window_are_each_one_line(tiny_checkpoint, label_map, tmp_path):
    """The tiny model: f=4, 16x16 window, so 64x64 px is the smallest grid it was trained on."""
    proc = generate(tiny_checkpoint, label_map, tmp_path / "o.png", "--size", "30x21", "--greedy")
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "o.png").size == (32, 20)
    assert notices(proc) == [
        "size 30x21 rounded to 32x20, a multiple of the model's downsampling factor 4",
        "32x20 is 8x5 latent cells, under the 16x16 window the model was trained on (below 64x64 px it follows "
        "the condition less)",
    ]
    wide = generate(tiny_checkpoint, label_map, tmp_path / "w.png", "--size", "128x48", "--greedy")
    assert wide.returncode == 0 and notices(wide) == [
        "128x48 is 32x12 latent cells, under the 16x16 window the model was trained on (below 64x64 px it follows "
        "the condition less)"]
    exact = generate(tiny_checkpoint, label_map, tmp_path / "e.png", "--size", "64x64", "--greedy")
    assert exact.returncode == 0 and notices(exact) == []  # a multiple of 4 and the whole window: nothing to say
    own = generate(tiny_checkpoint, label_map, tmp_path / "m.png", "--greedy")  # the map's own 96x96
    assert own.returncode == 0 and notices(own) == []


def test_the_embedded_model_notes_come_before_the_first_token(monkeypatch, capsys, tmp_path):
    """The `backend auto` line and the small-grid notice are on stderr when sampling starts, not after it."""
    at_first_token: list[str] = []

    @contextlib.contextmanager
    def recording_bar(description, unit, enabled=None, stderr=False):
        def update(done, total, info=""):
            if not at_first_token:
                at_first_token.append(capsys.readouterr().err)
        yield update

    monkeypatch.setattr(progress, "progress_bar", recording_bar)
    labels = tmp_path / "map.png"
    Image.fromarray(np.zeros((64, 64), np.uint8), mode="L").save(labels)
    with pytest.raises(SystemExit) as done:
        app(["generate", "--cond", str(labels), "--out", str(tmp_path / "o.png"), "--greedy"], prog_name="taming-deploy")
    assert done.value.code in (0, None)
    before = at_first_token[0]
    assert "backend auto: running on ONNX Runtime" in before
    assert "64x64 is 8x8 latent cells, under the 16x16 window" in before and "below 128x128 px" in before  # f=8
    assert "wrote" not in before


def test_sampling_option_messages(tiny_checkpoint, label_map, tmp_path):
    proc = generate(tiny_checkpoint, label_map, tmp_path / "o.png", "--top-k", "-1")
    assert_one_line_error(proc, "--top-k must be >= 0 (0 = off), got -1")
    proc = generate(tiny_checkpoint, label_map, tmp_path / "o.png", "--window-stride", "4")
    assert_one_line_error(proc, "--window-stride applies to --mode fast only")
    fast = generate(tiny_checkpoint, label_map, tmp_path / "o.png", "--mode", "fast", "--window-stride", "4", "--greedy",
                    "--size", "64x64")
    assert fast.returncode == 0, fast.stderr
    assert_one_line_error(run_cli("eval", "--top-k", "-1"), "--top-k must be >= 0 (0 = off)")


def help_text(*command: str) -> str:
    proc = run_cli(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", proc.stdout).split())


def test_help_says_what_the_defaults_and_sampling_options_mean():
    generate_help = help_text("generate")
    assert "omit it to use the embedded model" in generate_help
    assert "Divides the logits before sampling" in generate_help
    assert "Fast mode only" in generate_help
    eval_help = help_text("eval")
    assert "map k uses seed + k" in eval_help and "--quick" in eval_help and "Needs PyTorch" in eval_help


def test_the_progress_count_shows_nothing_until_the_total_is_known():
    from rich.progress import Progress

    column = progress.CountColumn()
    with Progress(column, disable=True) as bar:
        task = bar.add_task("sampling", total=None)
        assert column.render(bar.tasks[0]).plain == ""  # rich's MofNCompleteColumn shows "0/?" here
        bar.update(task, completed=3, total=256)
        assert column.render(bar.tasks[0]).plain == "3/256"
