"""Procedural landscape scenes: an RGB image and the segmentation label map it was painted from.

The training data of the small segmentation-conditioned demo model and the data of the test suite.
A scene is made in two steps. The layout step decides which class every pixel shows (sky, clouds,
mountain ranges with snow caps, a lake or the sea with beaches, grass, clusters of trees); the
painting step fills each class with its own procedural texture, so the image follows the label map
exactly and a model has to learn textures, not flat colours.

All geometry is in units of the image height: ``y`` runs from 0 (top) to 1 (bottom) and ``x`` from
0 to width / height. A wide image is therefore a wider view of the same kind of landscape rather
than a stretched one, and textures keep their size relative to the scene at any resolution.
Everything random comes from ``np.random.default_rng(seed)``, so a (seed, height, width) triple
always gives the same scene.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

LABELS: tuple[str, ...] = ("sky", "cloud", "mountain", "snow", "water", "grass", "tree", "sand")
SKY, CLOUD, MOUNTAIN, SNOW, WATER, GRASS, TREE, SAND = range(len(LABELS))

PALETTE: tuple[tuple[int, int, int], ...] = (
    (120, 190, 255),  # sky: light blue
    (190, 190, 190),  # cloud: grey
    (130, 90, 60),  # mountain: brown
    (255, 255, 255),  # snow: white
    (20, 60, 200),  # water: deep blue
    (90, 200, 60),  # grass: green
    (20, 100, 30),  # tree: dark green
    (240, 210, 140),  # sand: beige
)


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    labels: np.ndarray  # (H, W) uint8 class ids, index into LABELS


def render_scene(seed: int, height: int, width: int) -> Scene:
    """The landscape of ``seed`` at the given size."""
    if height < 1 or width < 1:
        raise ValueError(f"scene size must be positive, got {height}x{width}")
    # Separate streams, so that changing how one step draws numbers leaves the others' scenes alone.
    layout_rng, style_rng, texture_rng = np.random.default_rng(seed).spawn(3)
    layout = _make_layout(layout_rng, height, width)
    image = _paint(layout, _make_style(style_rng), texture_rng)
    return Scene(image=image, labels=layout.labels)


def colorize(labels: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 picture in PALETTE colours."""
    return np.asarray(PALETTE, np.uint8)[labels]


# --- noise -----------------------------------------------------------------------------------------

_MIN_CELL_PX = 1.5  # finer lattices only alias into per-pixel noise
_SPLINE_VAR = 151 / 315  # variance of cubic B-spline interpolated unit-variance lattice values, per axis


@dataclass(frozen=True)
class _Spline:
    """Where to sample a lattice: sample i is ``sum_k weights[k, i] * lattice[nodes[k, i]]``.

    Sampling is a gather of four taps rather than a product with a (mostly zero) interpolation
    matrix: on a shared 2-core machine OpenBLAS's threads stall every small matrix product for a
    scheduler time slice whenever another process holds the second core, 20x slower overall.
    """

    nodes: np.ndarray  # (4, n) lattice indices
    weights: np.ndarray  # (4, n) cubic B-spline weights
    size: int  # lattice nodes needed


def _spline(rng: np.random.Generator, pos: np.ndarray) -> _Spline:
    """Cubic B-spline sampling at ``pos`` (lattice cells) with a random phase."""
    pos = pos - pos.min() + rng.random()
    node = pos.astype(np.intp)
    f = (pos - node).astype(np.float32)
    weights = np.stack([(1 - f) ** 3, 3 * f**3 - 6 * f**2 + 4, -3 * f**3 + 3 * f**2 + 3 * f + 1, f**3]) / 6
    return _Spline(node + np.arange(4)[:, None], weights, int(node.max()) + 4)


def _octave_freqs(cells: float, octaves: int, unit: int) -> list[tuple[float, float]]:
    """(frequency, amplitude) of each octave, frequencies capped at the pixel grid of ``unit`` px."""
    return [(min(cells * 2**o, unit / _MIN_CELL_PX), 0.5**o) for o in range(octaves)]


def _noise_1d(rng: np.random.Generator, coords: np.ndarray, unit: int, cells: float, octaves: int = 1) -> np.ndarray:
    """Fractal value noise at ``coords`` (height units), roughly zero mean and unit variance.

    ``cells`` lattice cells per height unit in the first octave; ``unit`` pixels per height unit.
    """
    total = np.zeros(len(coords), np.float32)
    octave_freqs = _octave_freqs(cells, octaves, unit)
    for freq, amplitude in octave_freqs:
        spline = _spline(rng, coords * freq)
        lattice = rng.standard_normal(spline.size, dtype=np.float32)
        total += amplitude * (lattice[spline.nodes] * spline.weights).sum(axis=0)
    return total / math.sqrt(_SPLINE_VAR * sum(a * a for _, a in octave_freqs))


def _noise_2d(
    rng: np.random.Generator,
    rows: np.ndarray,
    cols: np.ndarray,
    unit: int,
    cells: float,
    octaves: int = 1,
    stretch: float = 1.0,
) -> np.ndarray:
    """Fractal value noise on the grid ``rows`` x ``cols`` (height units), roughly zero mean and unit variance.

    ``stretch`` > 1 makes features wider than tall (clouds, ripples), < 1 taller than wide (grass
    blades). Rows need not be evenly spaced: ground textures squash them towards the horizon.
    """
    total = np.zeros((len(rows), len(cols)), np.float32)
    octave_freqs = _octave_freqs(cells, octaves, unit)
    for freq, amplitude in octave_freqs:
        row = _spline(rng, rows * freq)
        col = _spline(rng, cols * min(freq / stretch, unit / _MIN_CELL_PX))
        lattice = rng.standard_normal((row.size, col.size), dtype=np.float32)
        along_cols = (lattice[:, col.nodes] * col.weights).sum(axis=1)  # (row nodes, len(cols))
        total += amplitude * (along_cols[row.nodes] * row.weights[..., None]).sum(axis=0)
    return total / (_SPLINE_VAR * math.sqrt(sum(a * a for _, a in octave_freqs)))


# --- layout ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ranges:
    """Mountain ranges, far to near, and per pixel the range in front (-1: none) for shading."""

    ridges: np.ndarray  # (K, W) ridge elevation above the horizon, height units
    heights: np.ndarray  # (K,) tallest possible elevation of each range
    front: np.ndarray  # (H, W) int8


@dataclass(frozen=True)
class _Trees:
    """Per-pixel data of the trees drawn into the label map, for painting them."""

    shade: np.ndarray  # (H, W) 0 at the top of a crown to 1 at its bottom; 2 on trunks
    tint: np.ndarray  # (H, W) per-tree colour variation around 0
    distance: np.ndarray  # (H, W) how far below the horizon the tree stands


@dataclass(frozen=True)
class _Tree:
    base_y: float
    base_x: float
    radius: float
    conifer: bool
    tint: float


@dataclass(frozen=True)
class _Layout:
    labels: np.ndarray  # (H, W)
    horizon: float  # y of the horizon
    unit: int  # pixels per height unit: the height of the whole scene, also of a crop
    y: np.ndarray  # (H, 1) row centres
    x: np.ndarray  # (1, W) column centres
    ranges: _Ranges
    cloud_density: np.ndarray  # (H, W) > 0 inside clouds
    trees: _Trees

    def crop(self, top: int, bottom: int) -> _Layout:
        """The rows top:bottom, so that a class is painted only over the rows it occupies."""
        rows = slice(top, bottom)
        trees = _Trees(self.trees.shade[rows], self.trees.tint[rows], self.trees.distance[rows])
        return replace(
            self,
            labels=self.labels[rows],
            y=self.y[rows],
            ranges=replace(self.ranges, front=self.ranges.front[rows]),
            cloud_density=self.cloud_density[rows],
            trees=trees,
        )


def _make_layout(rng: np.random.Generator, height: int, width: int) -> _Layout:
    """Label map by painter's algorithm, back to front: sky, clouds, mountains, snow, ground, trees."""
    y = ((np.arange(height, dtype=np.float32) + 0.5) / height)[:, None]
    x = ((np.arange(width, dtype=np.float32) + 0.5) / height)[None, :]
    horizon = rng.uniform(0.35, 0.68)
    labels = np.full((height, width), SKY, np.uint8)

    cloud_density = _clouds(rng, y, x, horizon)
    labels[cloud_density > 0] = CLOUD
    ranges = _mountains(rng, y, x, horizon)
    labels[ranges.front >= 0] = MOUNTAIN
    labels[_snow(rng, y, x, horizon, ranges)] = SNOW
    for label, mask in _ground(rng, y, x, horizon):
        labels[mask] = label
    trees = _trees(rng, labels, y, x, horizon)
    return _Layout(labels, horizon, height, y, x, ranges, cloud_density, trees)


def _clouds(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, horizon: float) -> np.ndarray:
    """Cloud density minus the threshold that gives this scene's cover; > 0 inside clouds."""
    height = y.shape[0]
    kind = rng.choice(["clear", "fair", "cloudy"], p=[0.2, 0.5, 0.3])
    cover = {"clear": 0.0, "fair": rng.uniform(0.05, 0.3), "cloudy": rng.uniform(0.3, 0.65)}[kind]
    density = np.full((height, x.shape[1]), -1.0, np.float32)
    sky_rows = int(np.sum(y < horizon))
    if cover == 0 or sky_rows == 0:
        return density
    sky_y = y[:sky_rows]
    sky = _noise_2d(rng, sky_y[:, 0], x[0], height, cells=rng.uniform(3, 7), octaves=5, stretch=rng.uniform(1.5, 3.5))
    sky += 1.2 * (horizon - sky_y) / horizon  # fewer clouds towards the horizon, where they are seen flatter
    density[:sky_rows] = sky - np.quantile(sky[::2, ::2], 1 - cover)
    return density


def _mountains(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, horizon: float) -> _Ranges:
    """0-3 ranges of ridged 1-D fractal noise; far ones are taller so that they show behind near ones."""
    height, width = y.shape[0], x.shape[1]
    count = rng.choice(4, p=[0.15, 0.4, 0.33, 0.12])
    tallest = np.sort(rng.uniform(0.25, 0.9, count) * horizon)[::-1].astype(np.float32)
    ridges = np.empty((count, width), np.float32)
    front = np.full((height, width), -1, np.int8)
    for k, top in enumerate(tallest):
        cells = rng.uniform(1.0, 3.0) * (1 + 0.5 * k)
        ridged = 1 - np.abs(_noise_1d(rng, x[0], height, cells, octaves=2))  # sharp peaks at zero crossings
        detail = _noise_1d(rng, x[0], height, cells * 4, octaves=5)
        profile = np.clip(0.75 * ridged + 0.15 * detail, 0, 1)
        floor = rng.uniform(0.0, 0.35)
        ridge = top * (floor + (1 - floor) * profile)
        if rng.random() < 0.35:  # a lone massif instead of a range across the whole view
            centre, half = rng.uniform(0, x[0, -1]), rng.uniform(0.2, 0.6)
            ridge *= np.sqrt(np.clip(1 - ((x[0] - centre) / half) ** 2, 0, 1))
        ridges[k] = ridge
        front[(y >= horizon - ridge) & (y < horizon)] = k
    return _Ranges(ridges, tallest, front)


def _snow(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, horizon: float, ranges: _Ranges) -> np.ndarray:
    """Snow above a snow line relative to each range's height, reaching down in fingers along gullies."""
    if len(ranges.heights) == 0 or rng.random() < 0.3:
        return np.zeros(ranges.front.shape, bool)
    line = rng.uniform(0.35, 0.8) * ranges.heights
    line[ranges.heights < 0.12] = np.inf  # low hills stay bare
    gullies = _noise_1d(rng, x[0], y.shape[0], 12, octaves=3)
    front = ranges.front
    tallest = np.where(front >= 0, ranges.heights[front], 0)
    return (front >= 0) & (horizon - y > line[front] + 0.06 * tallest * gullies)


_Masks = list[tuple[int, np.ndarray]]  # (label, pixels) to draw into the label map in order


def _ground(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, horizon: float) -> _Masks:
    """(label, mask) pairs to draw in order: grass, then maybe the sea or a lake, with or without beaches."""
    kind = rng.choice(["none", "lake", "sea"], p=[0.42, 0.3, 0.28])
    beach = bool(rng.random() < 0.7)
    if kind == "sea":
        return _sea(rng, y, x, horizon, beach)
    hills = rng.uniform(0.0, 0.08) * (rng.random() < 0.6)
    ground_top = horizon - hills * np.clip(0.5 + 0.4 * _noise_1d(rng, x[0], y.shape[0], 2.5, 3), 0, 1)
    grass = [(GRASS, np.broadcast_to(y >= ground_top, (y.shape[0], x.shape[1])))]
    return grass + _lake(rng, y, x, horizon, beach, ground_top) if kind == "lake" else grass


def _sea(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, horizon: float, beach: bool) -> _Masks:
    """Sea from the flat horizon down to a wavy shore, then maybe a beach, then grass."""
    height, depth = y.shape[0], 1 - horizon
    shore = horizon + depth * (rng.uniform(0.15, 0.6) + 0.06 * _noise_1d(rng, x[0], height, 3, 3))
    sand_width = depth * rng.uniform(0.08, 0.5) * (1 + 0.4 * _noise_1d(rng, x[0], height, 2, 2))
    water = (y >= horizon) & (y < shore)
    sand = (y >= shore) & (y < shore + np.maximum(sand_width, 0.01)) & beach
    return [(GRASS, np.broadcast_to(y >= horizon, water.shape)), (SAND, sand), (WATER, water)]


def _lake(
    rng: np.random.Generator, y: np.ndarray, x: np.ndarray, horizon: float, beach: bool, ground_top: np.ndarray
) -> _Masks:
    """A lake with a wobbly shore below the horizon, maybe ringed by a beach."""
    half_y = min(rng.uniform(0.04, 0.15), 0.4 * (1 - horizon))
    half_x = half_y * rng.uniform(3, 7)  # perspective flattens a round lake into a wide ellipse
    nearest = horizon + half_y + 0.02
    centre_y, centre_x = rng.uniform(nearest, max(nearest, 1 - 0.3 * half_y)), rng.uniform(0, x[0, -1])
    wobble = 0.15 * _noise_2d(rng, y[:, 0], x[0], y.shape[0], cells=4, octaves=2)
    distance = np.sqrt(((x - centre_x) / half_x) ** 2 + ((y - centre_y) / half_y) ** 2) + wobble
    sand = (distance < 1 + rng.uniform(0.1, 0.4)) & beach & (y >= ground_top)
    return [(SAND, sand), (WATER, distance < 1)]


def _trees(rng: np.random.Generator, labels: np.ndarray, y: np.ndarray, x: np.ndarray, horizon: float) -> _Trees:
    """Clusters of trees standing on grass, sized by perspective, drawn far to near into ``labels``."""
    height, width = labels.shape
    trees = _Trees(*(np.zeros(labels.shape, np.float32) for _ in range(3)))
    grass = np.flatnonzero(labels == GRASS)
    if grass.size == 0 or rng.random() < 0.2:
        return trees
    conifers = rng.choice([0.0, 0.5, 1.0])
    edge = _noise_2d(rng, y[:, 0], x[0], height, cells=40, octaves=2)
    bases: list[tuple[float, float, float]] = []
    for seed_px in rng.choice(grass, round(rng.integers(1, 7) * max(1.0, x[0, -1]))):
        cy, cx = y[seed_px // width, 0], x[0, seed_px % width]
        distance = max(cy - horizon, 0) + 0.02  # on flat ground apparent size grows with the distance below horizon
        n = rng.integers(1, 14)
        spread = distance * rng.uniform(0.3, 1.5)
        sizes = distance * rng.uniform(0.1, 0.3, n)
        bases += zip(cy + rng.normal(0, 0.15 * spread, n), cx + rng.normal(0, spread, n), sizes)
    for base_y, base_x, radius in sorted(bases):
        row, col = int(np.floor(base_y * height)), int(np.floor(base_x * height))
        if 0 <= row < height and 0 <= col < width and labels[row, col] == GRASS:
            tree = _Tree(base_y, base_x, radius, bool(rng.random() < conifers), rng.normal(0, 1))
            _draw_tree(tree, labels, trees, edge, horizon)
    return trees


def _draw_tree(tree: _Tree, labels: np.ndarray, trees: _Trees, edge: np.ndarray, horizon: float) -> None:
    """Rasterise one tree, a cone or a round crown on a trunk, within its bounding box."""
    unit = labels.shape[0]
    radius = max(tree.radius, 1.2 / unit)
    trunk = 0.0 if tree.conifer else 0.35 * radius
    crown_height = (2.6 if tree.conifer else 2.2) * radius
    top = tree.base_y - trunk - crown_height
    r0, r1 = max(int(top * unit), 0), min(int(tree.base_y * unit) + 1, labels.shape[0])
    c0, c1 = max(int((tree.base_x - radius) * unit), 0), min(int((tree.base_x + radius) * unit) + 2, labels.shape[1])
    py = ((np.arange(r0, r1, dtype=np.float32) + 0.5) / unit)[:, None]
    px = ((np.arange(c0, c1, dtype=np.float32) + 0.5) / unit)[None, :]
    v = (py - top) / crown_height  # 0 at the crown's top, 1 at its bottom
    wobble = 0.25 * edge[r0:r1, c0:c1]
    if tree.conifer:
        crown = (np.abs(px - tree.base_x) / radius < v * (1 + wobble)) & (v <= 1)
    else:
        crown = np.hypot((px - tree.base_x) / radius, 2 * v - 1) < 1 + wobble
    stem = ~crown & (v > 1) & (np.abs(px - tree.base_x) < max(0.12 * radius, 0.6 / unit))
    mask = crown | stem
    box = (slice(r0, r1), slice(c0, c1))
    labels[box][mask] = TREE
    trees.shade[box][mask] = np.where(stem, 2.0, np.clip(v, 0, 1))[mask]
    trees.tint[box][mask] = tree.tint
    trees.distance[box][mask] = max(tree.base_y - horizon, 0)


# --- painting --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Style:
    """The colours of one scene: time of day and season, jittered a little per scene."""

    zenith: np.ndarray  # sky at the top of the picture
    horizon: np.ndarray  # sky at the horizon; also the colour of haze and of reflections on water
    sun: np.ndarray  # tint of sunlit surfaces
    sun_side: float  # +1: light from the left, -1: from the right
    grass: np.ndarray
    tree: np.ndarray
    rock: np.ndarray
    water: np.ndarray
    sand: np.ndarray


_TIMES_OF_DAY = {  # zenith, horizon, sunlight
    "noon": ((0.22, 0.45, 0.85), (0.68, 0.82, 0.95), (1.0, 1.0, 1.0)),
    "golden": ((0.28, 0.42, 0.75), (0.98, 0.78, 0.55), (1.08, 0.95, 0.8)),
    "dusk": ((0.2, 0.22, 0.5), (0.92, 0.6, 0.55), (0.92, 0.8, 0.85)),
    "overcast": ((0.58, 0.62, 0.68), (0.8, 0.82, 0.84), (0.9, 0.92, 0.95)),
}
_SEASONS = {  # grass, tree
    "spring": ((0.38, 0.66, 0.22), (0.16, 0.38, 0.12)),
    "summer": ((0.28, 0.52, 0.16), (0.1, 0.3, 0.1)),
    "dry": ((0.55, 0.56, 0.25), (0.2, 0.32, 0.12)),
    "autumn": ((0.45, 0.5, 0.2), (0.27, 0.3, 0.1)),
}


def _make_style(rng: np.random.Generator) -> _Style:
    time = rng.choice(list(_TIMES_OF_DAY), p=[0.55, 0.2, 0.1, 0.15])
    season = rng.choice(list(_SEASONS), p=[0.25, 0.4, 0.15, 0.2])

    def jitter(rgb: tuple[float, float, float], amount: float = 0.06) -> np.ndarray:
        return np.clip(np.asarray(rgb, np.float32) * (1 + rng.normal(0, amount, 3)), 0, 1).astype(np.float32)

    zenith, horizon, sun = _TIMES_OF_DAY[time]
    grass, tree = _SEASONS[season]
    return _Style(
        zenith=jitter(zenith),
        horizon=jitter(horizon, 0.04),
        sun=jitter(sun, 0.02),
        sun_side=float(rng.choice([-1.0, 1.0])),
        grass=jitter(grass),
        tree=jitter(tree),
        rock=jitter((0.45, 0.4, 0.37), 0.05),
        water=jitter((0.08, 0.22, 0.38)),
        sand=jitter((0.86, 0.78, 0.58), 0.04),
    )


def _texture(
    rng: np.random.Generator, view: _Layout, cells: float, octaves: int = 1, stretch: float = 1.0, ground: bool = False
) -> np.ndarray:
    """(h, W, 1) noise over a view for shading colours; ``ground`` lays it flat on the ground plane."""
    rows = _ground_rows(view) if ground else view.y[:, 0]
    return _noise_2d(rng, rows, view.x[0], view.unit, cells, octaves, stretch)[..., None]


def _ground_rows(view: _Layout) -> np.ndarray:
    """Vertical texture coordinate of flat ground.

    Ground at distance d appears 1/d high, so a texture of fixed size on the ground gets flatter
    towards the horizon. A logarithm squashes less than 1/d would, which keeps the texture from
    aliasing into noise there, and the offset keeps it finite at the horizon itself. Above the
    horizon (hills) the coordinate mirrors the rows just below it.
    """
    return 0.3 * np.log(np.abs(view.y[:, 0] - view.horizon) + 0.015)


def _paint_sky(view: _Layout, style: _Style, rng: np.random.Generator) -> np.ndarray:
    """(h, 1, 3): the pale horizon colour blending into the zenith colour upwards."""
    t = np.clip(1 - view.y / view.horizon, 0, 1) ** 0.6
    return (style.horizon + (style.zenith - style.horizon) * t[..., None]).astype(np.float32)


def _paint_clouds(view: _Layout, style: _Style, rng: np.random.Generator) -> np.ndarray:
    """Soft-edged clouds lit from above: brighter where the density grows downwards (their tops)."""
    density = view.cloud_density
    shift = max(1, view.unit // 50)
    above = np.vstack([np.full((shift, density.shape[1]), -1.0, np.float32), density[:-shift]])[: len(density)]
    lit = np.clip(0.65 + 2.0 * (density - above)[..., None] + 0.1 * _texture(rng, view, 20, 2), 0, 1)
    bright = np.clip(style.sun * 0.97, 0, 1)
    shadow = 0.55 * style.horizon + 0.25 * style.zenith + 0.1
    cloud = shadow + (bright - shadow) * lit
    opacity = np.clip(0.35 + 1.5 * density, 0, 1)[..., None]
    sky = _paint_sky(view, style, rng)
    return sky + (cloud - sky) * opacity


def _paint_mountains(view: _Layout, style: _Style, rng: np.random.Generator) -> np.ndarray:
    """Rock and snow under the same light: both darken on faces turned from the sun, snow towards blue."""
    light = _mountain_light(view, style, rng)
    rock = style.rock * style.sun * (0.45 + 0.8 * light + 0.05 * _texture(rng, view, 120))
    sunlit_snow = np.clip(np.array([0.98, 0.98, 1.0], np.float32) * style.sun, 0, 1)
    shaded_snow = np.array([0.62, 0.7, 0.86], np.float32)
    snow = shaded_snow + (sunlit_snow - shaded_snow) * np.clip(1.4 * light - 0.1, 0, 1)
    colour = np.where(view.labels[..., None] == SNOW, snow, rock)
    return colour + (style.horizon - colour) * _range_haze(view)


def _mountain_light(view: _Layout, style: _Style, rng: np.random.Generator) -> np.ndarray:
    """(h, W, 1) light in [0, 1]: the slope of the ridge above, carried down the face along
    wandering gullies so each face is lit or shaded as a whole, plus fractal relief."""
    ranges, width = view.ranges, view.x.shape[1]
    # The slope over a wide baseline gives the orientation of whole faces, not of every jag of the ridge.
    half = max(1, view.unit // 16)
    padded = np.pad(ranges.ridges, ((0, 0), (half, half)), mode="edge")
    slopes = (padded[:, 2 * half :] - padded[:, : -2 * half]) * (view.unit / (2 * half))
    front = np.maximum(ranges.front, 0)
    below_ridge = np.clip(ranges.ridges[front, np.arange(width)] - (view.horizon - view.y), 0, None)
    wander = _texture(rng, view, cells=6, octaves=2)[..., 0] * below_ridge * view.unit * 0.4
    col = np.clip(np.arange(width) + wander.astype(np.intp), 0, width - 1)
    facing = np.tanh(2.5 * style.sun_side * slopes[front, col])[..., None]
    return np.clip(0.5 + 0.35 * facing + 0.18 * _texture(rng, view, cells=30, octaves=3, stretch=0.6), 0, 1)


def _range_haze(view: _Layout) -> np.ndarray:
    """(h, W, 1) share of haze on each mountain range: the farthest is the palest."""
    count = len(view.ranges.heights)
    per_range = np.linspace(0.4, 0.12, count, dtype=np.float32) if count > 1 else np.array([0.25], np.float32)
    return per_range[np.maximum(view.ranges.front, 0)][..., None]


def _ground_haze(colour: np.ndarray, distance: np.ndarray, style: _Style) -> np.ndarray:
    """Aerial perspective: ground near the horizon fades into the horizon's colour."""
    return colour + (style.horizon - colour) * (0.45 * np.exp(-distance / 0.06))


def _paint_water(view: _Layout, style: _Style, rng: np.random.Generator) -> np.ndarray:
    """Deep colour plus the sky's reflection, stronger far away (grazing view), broken by ripples."""
    ripples = _texture(rng, view, cells=25, octaves=3, stretch=6, ground=True)
    distance = np.clip(view.y - view.horizon, 0, None)[..., None]
    reflection = np.clip(0.2 + 0.6 * np.exp(-distance / 0.12) + 0.2 * ripples, 0, 1)
    glints = np.clip(_texture(rng, view, cells=50, stretch=5, ground=True) - 1.2, 0, None)
    return style.water + (style.horizon * 0.95 - style.water) * reflection + 0.25 * glints


def _paint_grass(view: _Layout, style: _Style, rng: np.random.Generator) -> np.ndarray:
    """Lighter and drier patches over blade streaks."""
    patches = _texture(rng, view, cells=4, octaves=3, ground=True)
    blades = _texture(rng, view, cells=60, octaves=2, stretch=0.25, ground=True)
    dry = np.clip(0.3 * patches, 0, None) * np.array([0.2, 0.08, 0.0], np.float32)
    grass = style.grass * style.sun * (0.95 + 0.1 * patches + 0.1 * blades) + dry
    return _ground_haze(grass, np.clip(view.y - view.horizon, 0, None)[..., None], style)


def _paint_trees(view: _Layout, style: _Style, rng: np.random.Generator) -> np.ndarray:
    """Clumps of foliage on crowns that darken towards their bottom; brown trunks."""
    shade, tint = view.trees.shade[..., None], view.trees.tint[..., None]
    clumps = _texture(rng, view, cells=60, octaves=2)
    crown = style.tree * style.sun * (1.25 - 0.6 * np.clip(shade, 0, 1) + 0.2 * clumps) * (1 + 0.12 * tint)
    trunk = np.array([0.25, 0.17, 0.1], np.float32)
    return _ground_haze(np.where(shade > 1.5, trunk, crown), view.trees.distance[..., None], style)


def _paint_sand(view: _Layout, style: _Style, rng: np.random.Generator) -> np.ndarray:
    """Wind ripples and grain."""
    ripples = _texture(rng, view, cells=40, stretch=5, ground=True)
    grain = rng.standard_normal((*view.labels.shape, 1), dtype=np.float32)
    sand = style.sand * style.sun * (0.95 + 0.05 * ripples + 0.03 * grain)
    return _ground_haze(sand, np.clip(view.y - view.horizon, 0, None)[..., None], style)


_Painter = Callable[[_Layout, _Style, np.random.Generator], np.ndarray]
_PAINTERS: tuple[tuple[tuple[int, ...], _Painter], ...] = (
    ((SKY,), _paint_sky),
    ((CLOUD,), _paint_clouds),
    ((MOUNTAIN, SNOW), _paint_mountains),
    ((WATER,), _paint_water),
    ((GRASS,), _paint_grass),
    ((TREE,), _paint_trees),
    ((SAND,), _paint_sand),
)
_PAINTER_OF_LABEL = np.array(
    [next(i for i, (group, _) in enumerate(_PAINTERS) if label in group) for label in range(len(LABELS))]
)


def _paint(layout: _Layout, style: _Style, rng: np.random.Generator) -> np.ndarray:
    """Fill the pixels of every class with that class's texture, computed only over the rows it occupies."""
    image = np.zeros((*layout.labels.shape, 3), np.float32)
    painter_of_pixel = _PAINTER_OF_LABEL[layout.labels]
    for index, (_, painter) in enumerate(_PAINTERS):
        mask = painter_of_pixel == index
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size:
            top, bottom = rows[0], rows[-1] + 1
            colours = painter(layout.crop(top, bottom), style, rng)
            np.copyto(image[top:bottom], colours, where=mask[top:bottom, :, None])
    return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)
