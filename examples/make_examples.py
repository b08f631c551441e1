"""Write the example condition maps from held-out synthetic landscape layouts (seeds training never draws).

The maps are palette PNGs: each pixel's palette index is its class id (what `generate --cond` reads)
and the palette holds the label colours, so the files also look right in an image viewer.
Run from the repository root: python examples/make_examples.py
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from taming_deploy.bundle import Bundle
from taming_deploy.labels import palette_template
from taming_deploy.model_paths import DEFAULT_MODEL
from taming_deploy.training.data.sources import VALIDATION_SEED_BASE
from taming_deploy.training.data.synthetic_landscapes import PALETTE, colorize, render_scene

EXAMPLES = {  # name: (seed offset, width, height)
    "landscape_01.png": (19, 256, 256),
    "landscape_02.png": (6, 256, 256),
    "landscape_03.png": (16, 256, 256),
    "panorama_512x256.png": (18, 512, 256),
}
HERE = Path(__file__).parent


def palette_png(labels: np.ndarray) -> Image.Image:
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette([value for colour in PALETTE for value in colour])
    return image


def main() -> None:
    for name, (offset, width, height) in EXAMPLES.items():
        scene = render_scene(VALIDATION_SEED_BASE + 1000 + offset, height, width)
        palette_png(scene.labels).save(HERE / name)
    # the same map drawn as plain RGB in the palette colours: also accepted by `generate --cond`
    first = render_scene(VALIDATION_SEED_BASE + 1000 + EXAMPLES["landscape_01.png"][0], 256, 256)
    Image.fromarray(colorize(first.labels)).save(HERE / "landscape_01_rgb.png")
    # a blank map to paint on: all sky (id 0), an indexed PNG whose palette is the embedded model's
    palette_template(Bundle(DEFAULT_MODEL).spec.condition, (512, 256)).save(HERE / "palette_template.png")


if __name__ == "__main__":
    main()
