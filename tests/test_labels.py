"""Finding a model's label ids and colours from the CLI: `info`, `info --legend`, the palette error, the template."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from helpers import assert_one_line_error, run_cli
from taming_deploy.conditions import labels_from_palette_colours, read_label_map
from taming_deploy.errors import UserError
from taming_deploy.labels import legend_image, palette_template
from taming_deploy.model_paths import DEFAULT_MODEL
from taming_deploy.spec import ConditionSpec

EXAMPLES = DEFAULT_MODEL.parents[1] / "examples"


def embedded_condition() -> dict:
    return json.loads((DEFAULT_MODEL / "manifest.json").read_text())["model"]["condition"]


def many_labels(n: int = 182) -> ConditionSpec:
    """A COCO-Stuff-sized label set with distinct colours."""
    palette = tuple((k, 255 - k, (7 * k) % 256) for k in range(n))
    return ConditionSpec("segmentation", n_labels=n, label_names=tuple(f"class{k}" for k in range(n)), palette=palette)


def label_rows(stdout: str) -> dict[int, tuple[str, str]]:
    """id -> (name, #hex) from `info`'s label table."""
    rows = re.findall(r"^\s+(\d+)\s+(\S+)\s+(#[0-9a-f]{6})", stdout, flags=re.MULTILINE)
    return {int(k): (name, colour) for k, name, colour in rows}


def test_info_without_a_path_describes_the_embedded_model_with_every_label():
    proc = run_cli("info")
    assert proc.returncode == 0, proc.stderr
    assert str(DEFAULT_MODEL) in proc.stdout.splitlines()[0] and "embedded" in proc.stdout.splitlines()[0]
    cond = embedded_condition()
    expected = {k: (name, "#%02x%02x%02x" % tuple(colour)) for k, (name, colour) in enumerate(zip(cond["label_names"], cond["palette"]))}
    assert label_rows(proc.stdout) == expected and len(expected) == 8


def test_info_lists_the_labels_of_a_checkpoint(tiny_checkpoint):
    proc = run_cli("info", str(tiny_checkpoint))
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tiny_checkpoint / "config.json").read_text())["condition"]
    rows = label_rows(proc.stdout)
    assert [rows[k][0] for k in sorted(rows)] == config["label_names"]
    assert rows[4][1] == "#%02x%02x%02x" % tuple(config["palette"][4])


def swatch_pixels(image: Image.Image, colour: tuple[int, int, int]) -> int:
    return int(np.all(np.asarray(image.convert("RGB")) == colour, axis=-1).sum())


def test_info_legend_draws_one_swatch_per_label(tmp_path):
    proc = run_cli("info", "--legend", str(tmp_path / "legend.png"))
    assert proc.returncode == 0, proc.stderr
    legend = Image.open(tmp_path / "legend.png")
    for colour in embedded_condition()["palette"]:
        if tuple(colour) != (255, 255, 255):  # snow is the background's colour
            assert swatch_pixels(legend, tuple(colour)) >= 20 * 20  # a 24 px swatch inside its outline


def test_a_182_label_legend_wraps_into_columns_and_keeps_every_colour():
    cond = many_labels()
    legend = legend_image(cond, swatch=12, rows_per_column=24)
    assert legend.width > legend.height  # 8 columns of 24 rows, not one 182-row strip
    assert all(swatch_pixels(legend, colour) >= 10 * 10 for colour in cond.palette[1:])


def test_legend_and_template_refuse_a_model_without_a_palette():
    no_palette = ConditionSpec("segmentation", n_labels=3)
    with pytest.raises(UserError, match="no palette"):
        legend_image(no_palette)
    with pytest.raises(UserError, match="no palette"):
        palette_template(no_palette, (8, 8))
    with pytest.raises(UserError, match="depth"):
        legend_image(ConditionSpec("depth", codebook_size=16))


def test_the_palette_error_lists_the_palette(tiny_checkpoint, tmp_path):
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[:] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "foreign.png")
    proc = run_cli("generate", "--model", str(tiny_checkpoint), "--backend", "torch", "--cond", str(tmp_path / "foreign.png"))
    config = json.loads((tiny_checkpoint / "config.json").read_text())["condition"]
    listed = [f"{k} {name} #%02x%02x%02x" % tuple(c) for k, (name, c) in enumerate(zip(config["label_names"], config["palette"]))]
    assert_one_line_error(proc, "#010203", *listed)


def test_the_palette_error_of_a_182_label_model_stays_short():
    cond = many_labels()
    with pytest.raises(UserError) as error:
        labels_from_palette_colours(np.full((4, 4, 3), 3, np.uint8), cond.palette, "map.png", cond.label_names)
    message = str(error.value)
    assert "0 class0 #00ff00" in message and "182 colours" in message and "taming-deploy info" in message
    assert "class100" not in message and len(message) < 600


def test_the_shipped_palette_template_is_a_blank_map_in_the_embedded_palette():
    template = Image.open(EXAMPLES / "palette_template.png")
    assert template.mode == "P" and template.size == (512, 256)
    palette = np.array(template.getpalette()[: 3 * 8]).reshape(8, 3)
    np.testing.assert_array_equal(palette, embedded_condition()["palette"])
    spec = ConditionSpec.from_dict(embedded_condition())
    assert np.all(read_label_map(EXAMPLES / "palette_template.png", spec) == 0)
    # painted in the palette (what an editor in indexed mode does) it reads back as those ids
    painted = np.array(template)
    painted[128:, :] = 5
    template.putdata(painted.ravel().tolist())
    ids = read_label_map(template, spec)
    assert (ids[128:] == 5).all() and (ids[:128] == 0).all()
    rgb = read_label_map(template.convert("RGB"), spec)  # saved as RGB instead: the same ids
    np.testing.assert_array_equal(rgb, ids)
