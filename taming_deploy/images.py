"""Model images (float32 NCHW in [-1, 1]) to and from PIL."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from taming_deploy.errors import UserError
from taming_deploy.output_marks import image_save_options

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # output file suffix -> Pillow format
SAVE_OPTIONS = {"JPEG": {"quality": 95}, "WEBP": {"quality": 95}}


def output_format(path: Path) -> str:
    """The image format an output file's suffix names; unknown suffixes are refused, not written as PNG."""
    fmt = IMAGE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: unknown image file type {Path(path).suffix!r}; name the output .png, .jpg or .webp")
    return fmt


def save_image(image: Image.Image, path: Path, fmt: str) -> None:
    """Write ``image`` as ``fmt``, marked as ours (so that a later run may replace it without --force)."""
    image.save(path, format=fmt, **SAVE_OPTIONS.get(fmt, {}), **image_save_options())


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) float in [-1, 1] -> (N, H, W, 3) uint8, clamped; truncates like the original's saver."""
    scaled = (np.clip(images, -1.0, 1.0) + 1.0) / 2.0 * 255.0
    return scaled.astype(np.uint8).transpose(0, 2, 3, 1)


def to_pil(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(array) for array in to_uint8(images)]


def from_pil(image: Image.Image) -> np.ndarray:
    """PIL image -> (1, 3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return array.transpose(2, 0, 1)[None].copy()


def grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Tile equally sized images into one, row-major, as square as possible by default."""
    columns = columns or int(np.ceil(np.sqrt(len(images))))
    rows = -(-len(images) // columns)
    width, height = images[0].size
    sheet = Image.new("RGB", (columns * width, rows * height))
    for k, image in enumerate(images):
        sheet.paste(image, ((k % columns) * width, (k // columns) * height))
    return sheet
