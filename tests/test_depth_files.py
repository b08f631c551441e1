"""Depth files: 8/16-bit grayscale PNGs and the original's RGBA-float32 PNGs, min-max scaled per image."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from taming_deploy.conditions import read_depth_map
from taming_deploy.errors import UserError


def originals_scaling(depth: np.ndarray) -> np.ndarray:
    """The original's preprocessing: min-max to [0, 1] (range at least 1e-8), then to [-1, 1]."""
    depth = depth.astype(np.float64)
    return 2.0 * (depth - depth.min()) / max(1e-8, depth.max() - depth.min()) - 1.0


def test_rgba_png_holding_one_float32_per_pixel_reads_as_that_float(tmp_path):
    depth = np.random.default_rng(0).uniform(0.3, 80.0, size=(5, 7)).astype(np.float32)
    rgba = np.ascontiguousarray(depth).view(np.uint8).reshape(5, 7, 4)  # the original's depth_to_rgba
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "depth.png")
    np.testing.assert_allclose(read_depth_map(tmp_path / "depth.png"), originals_scaling(depth), atol=1e-6)


@pytest.mark.parametrize("dtype, mode", [(np.uint8, "L"), (np.uint16, "I;16")])
def test_grayscale_png_is_min_max_scaled(tmp_path, dtype, mode):
    values = (np.arange(20).reshape(4, 5) * 3 + 10).astype(dtype) * (200 if dtype == np.uint16 else 1)
    Image.fromarray(values).save(tmp_path / "depth.png")
    assert Image.open(tmp_path / "depth.png").mode == mode
    np.testing.assert_allclose(read_depth_map(tmp_path / "depth.png"), originals_scaling(values), atol=1e-6)


def test_rgba_picture_that_is_not_float_depth_is_refused(tmp_path):
    rgba = np.full((4, 4, 4), 255, dtype=np.uint8)  # 0xffffffff is a NaN as float32
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "picture.png")
    with pytest.raises(UserError, match="not finite"):
        read_depth_map(tmp_path / "picture.png")


def test_rgb_picture_is_refused_naming_the_accepted_formats(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "picture.png")
    with pytest.raises(UserError, match="8/16-bit grayscale PNG, or the original's RGBA-float32 PNG"):
        read_depth_map(tmp_path / "picture.png")
