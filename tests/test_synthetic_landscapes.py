"""The procedural landscape dataset: determinism, shapes, class coverage, textures and layout sanity."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from taming_deploy.training.data.synthetic_landscapes import LABELS, PALETTE, Scene, colorize, render_scene

SIZE = 128
SEEDS = range(40)
TEXTURED = ("grass", "water", "mountain")


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return [render_scene(seed, SIZE, SIZE) for seed in SEEDS]


def _id(name: str) -> int:
    return LABELS.index(name)


def _rows(scene: Scene, name: str) -> np.ndarray:
    """Row index of every pixel of a class."""
    return np.nonzero(scene.labels == _id(name))[0]


def test_label_set_and_palette() -> None:
    assert {"sky", "cloud", "mountain", "snow", "water", "grass", "tree", "sand"} <= set(LABELS)
    assert len(PALETTE) == len(LABELS)
    assert len(set(PALETTE)) == len(PALETTE)
    assert all(len(rgb) == 3 and all(0 <= c <= 255 for c in rgb) for rgb in PALETTE)


def test_colorize_maps_ids_to_palette() -> None:
    labels = np.arange(len(LABELS), dtype=np.uint8).reshape(1, -1).repeat(3, axis=0)
    picture = colorize(labels)
    assert picture.shape == (3, len(LABELS), 3) and picture.dtype == np.uint8
    assert [tuple(int(c) for c in rgb) for rgb in picture[1]] == list(PALETTE)


def test_same_seed_and_size_give_identical_scenes() -> None:
    np.random.seed(1)
    first = render_scene(7, 96, 160)
    np.random.seed(2)  # the global RNG must play no part
    second = render_scene(7, 96, 160)
    assert np.array_equal(first.image, second.image)
    assert np.array_equal(first.labels, second.labels)


def test_different_seeds_give_different_scenes() -> None:
    scenes = [render_scene(seed, 64, 64) for seed in range(6)]
    for a, b in itertools.combinations(scenes, 2):
        assert np.mean(a.labels != b.labels) > 0.05
        assert np.mean(np.abs(a.image.astype(int) - b.image.astype(int))) > 5


@pytest.mark.parametrize("height,width", [(1, 1), (3, 2), (16, 16), (77, 130), (128, 128), (256, 512), (512, 256)])
def test_shapes_dtypes_and_label_range(height: int, width: int) -> None:
    scene = render_scene(3, height, width)
    assert scene.image.shape == (height, width, 3) and scene.image.dtype == np.uint8
    assert scene.labels.shape == (height, width) and scene.labels.dtype == np.uint8
    assert scene.labels.max() < len(LABELS)


def test_rejects_empty_size() -> None:
    with pytest.raises(ValueError):
        render_scene(0, 0, 16)


def test_every_label_appears_in_a_fair_share_of_scenes(scenes: list[Scene]) -> None:
    present = np.array([np.bincount(s.labels.ravel(), minlength=len(LABELS)) > 0 for s in scenes])
    share = dict(zip(LABELS, present.mean(axis=0)))
    assert all(fraction >= 0.2 for fraction in share.values()), share


def test_class_mean_colours_are_distinct(scenes: list[Scene]) -> None:
    sums = np.zeros((len(LABELS), 3))
    counts = np.zeros(len(LABELS))
    for scene in scenes:
        for label in range(len(LABELS)):
            mask = scene.labels == label
            sums[label] += scene.image[mask].sum(axis=0)
            counts[label] += mask.sum()
    means = sums / counts[:, None]
    for a, b in itertools.combinations(range(len(LABELS)), 2):
        assert np.linalg.norm(means[a] - means[b]) > 25, (LABELS[a], LABELS[b], means[a], means[b])


def _class_pixels(scenes: list[Scene], name: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(luminance image, class mask) of the scenes where the class covers at least 100 pixels."""
    return [
        (s.image.astype(float).mean(axis=-1), s.labels == _id(name))
        for s in scenes
        if np.sum(s.labels == _id(name)) >= 100
    ]


@pytest.mark.parametrize("name", TEXTURED)
def test_textured_classes_vary_within_a_scene(scenes: list[Scene], name: str) -> None:
    spreads = [lum[mask].std() for lum, mask in _class_pixels(scenes, name)]
    assert len(spreads) >= 5 and np.median(spreads) > 8, spreads


@pytest.mark.parametrize("name", TEXTURED)
def test_textured_classes_have_fine_detail(scenes: list[Scene], name: str) -> None:
    """Neighbouring pixels differ inside the class: a texture, not only a smooth gradient like the sky."""
    roughness = []
    for lum, mask in _class_pixels(scenes, name):
        dx = np.abs(np.diff(lum, axis=1))[mask[:, 1:] & mask[:, :-1]]
        dy = np.abs(np.diff(lum, axis=0))[mask[1:] & mask[:-1]]
        roughness.append(np.concatenate([dx, dy]).mean())
    assert min(roughness) > 1.2, roughness


def test_sky_is_above_the_ground(scenes: list[Scene]) -> None:
    for scene in scenes:
        sky, grass = _rows(scene, "sky"), _rows(scene, "grass")
        if sky.size and grass.size:
            assert sky.mean() < grass.mean()


@pytest.mark.parametrize("name", ["water", "sand"])
def test_water_and_beaches_lie_below_the_horizon(scenes: list[Scene], name: str) -> None:
    """Sky pixels never lie below the horizon, so every one of them is above all water and sand."""
    checked = 0
    for scene in scenes:
        sky, below = _rows(scene, "sky"), _rows(scene, name)
        if sky.size and below.size:
            assert sky.max() < below.min()
            checked += 1
    assert checked >= 5


def test_mountains_stand_on_the_horizon_and_snow_caps_them(scenes: list[Scene]) -> None:
    for scene in scenes:
        mountain, snow, water = _rows(scene, "mountain"), _rows(scene, "snow"), _rows(scene, "water")
        if mountain.size and water.size:
            assert mountain.max() < water.min()
        if mountain.size and snow.size:
            assert snow.mean() < mountain.mean()


def test_clouds_stay_in_the_upper_part(scenes: list[Scene]) -> None:
    for scene in scenes:
        clouds = _rows(scene, "cloud")
        if clouds.size:
            assert clouds.max() < 0.7 * SIZE
