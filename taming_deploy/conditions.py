"""Reading a user's condition (label map, depth map, RGB image, class id) into what a condition encoder takes.

Label maps are 8-bit PNGs of class ids (mode L, or P whose indices are the ids); an RGB image is
accepted only when the model has a palette and every pixel is exactly one of its colours.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, UnidentifiedImageError

from taming_deploy.documents import first_line
from taming_deploy.errors import RequestTooLarge, UserError
from taming_deploy.images import from_pil
from taming_deploy.labels import palette_listing
from taming_deploy.spec import ConditionSpec
from taming_deploy.validation import DEFAULT_MAX_PIXELS, check_condition_array, check_image_size

LABEL_MODES = ("L", "P", "I", "I;16")  # I: 2-D integer arrays handed to the Python API


def open_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file (a device, pipe or socket)" if path.exists() else "no such file"
        raise UserError(f"{path}: {kind}; name an image file")
    return decode_image(path, str(path), max_pixels)


def decode_image(file: Path | IO[bytes], source: str, max_pixels: int, formats: tuple[str, ...] | None = None) -> Image.Image:
    """Open and decode one still image (of ``formats``, default any Pillow reads), refusing an empty or
    animated one and one beyond ``max_pixels`` from its header, before decoding: the one reading of
    condition images, for the CLI, the Python API (paths) and the service (request bodies)."""
    try:
        with warnings.catch_warnings():  # Pillow's DecompressionBombWarning: our own limit is checked next
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(file, formats=formats)
        check_image_size(image.width, image.height, source, max_pixels)
        if getattr(image, "n_frames", 1) > 1:
            raise UserError(f"{source}: an animated image ({image.n_frames} frames); a condition is one still image")
        image.load()  # decode now, so a truncated file fails here and not halfway through sampling
    except UnidentifiedImageError:
        kind = "a " + " or ".join(formats) + " image" if formats else "an image file Pillow can read"
        raise UserError(f"{source}: not {kind}") from None
    except Image.DecompressionBombError as exc:  # raised by Image.open itself, past twice Pillow's own limit
        raise RequestTooLarge(f"{source}: {first_line(exc)}; taming-deploy's limit is {max_pixels:,} pixels (--max-pixels)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UserError(f"{source}: cannot decode image ({first_line(exc)}); is the file truncated or corrupt?") from None
    return image


def labels_from_palette_colours(rgb: np.ndarray, palette: tuple[tuple[int, int, int], ...], source: str,
                                names: tuple[str, ...] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) ids, when every pixel is exactly a palette colour."""
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    palette_codes = np.array([(r << 16) | (g << 8) | b for r, g, b in palette], dtype=np.int64)
    order = np.argsort(palette_codes)
    found = np.searchsorted(palette_codes[order], codes).clip(0, len(order) - 1)
    exact = palette_codes[order][found] == codes
    if not exact.all():
        bad = np.unique(codes[~exact])
        shown = ", ".join(f"#{c:06x}" for c in bad[:8]) + (f" ... ({len(bad)} colours)" if len(bad) > 8 else "")
        raise UserError(
            f"{source}: {int((~exact).sum())} pixels have colours that are not in the model's palette ({shown}); "
            "draw with the palette's exact colours (no anti-aliasing) or pass an 8-bit class-id map; "
            f"the palette: {palette_listing(palette, names)}"
        )
    return order[found]


def label_ids(image: Image.Image, spec: ConditionSpec, source: str) -> np.ndarray:
    if image.mode in LABEL_MODES:
        ids = np.asarray(image).astype(np.int64)
    elif image.mode in ("RGB", "RGBA") and spec.palette is not None:
        rgb = np.asarray(image.convert("RGB"))
        ids = labels_from_palette_colours(rgb, spec.palette, source, spec.label_names)
    else:
        hint = "" if spec.palette is None else " or an RGB image in the model's palette"
        raise UserError(
            f"{source}: expected a label map (8-bit class ids, PNG mode L or P{hint}), got a mode {image.mode} image"
        )
    for src, dst in spec.label_remap.items():
        ids[ids == src] = dst
    return ids


def check_label_range(ids: np.ndarray, spec: ConditionSpec, source: str) -> None:
    n = spec.n_labels
    assert n is not None
    bad = np.unique(ids[(ids < 0) | (ids >= n)])
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:10]) + (" ..." if bad.size > 10 else "")
        hint = " (255 usually means 'unlabeled'; this model was not trained with it)" if 255 in bad else ""
        raise UserError(f"{source}: label ids {shown} are out of range; this model knows ids 0..{n - 1}{hint}")


ImageSource = Path | str | Image.Image | np.ndarray


def as_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, str]:
    """A path, PIL image or 2-D array -> (PIL image, name for messages)."""
    if isinstance(source, Image.Image):
        check_image_size(source.width, source.height, "condition image", max_pixels)
        return source, "condition image"
    if isinstance(source, np.ndarray):
        check_condition_array(source)
        check_image_size(source.shape[1], source.shape[0], "condition array", max_pixels)
        array = source.astype(np.int32) if np.issubdtype(source.dtype, np.integer) else source.astype(np.float32)
        return Image.fromarray(array), "condition array"
    return open_image(Path(source), max_pixels), str(source)


def read_label_map(source: ImageSource, spec: ConditionSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A label map -> (H, W) int64 class ids, checked against the model's label range."""
    image, name = as_image(source, max_pixels)
    ids = label_ids(image, spec, name)
    check_label_range(ids, spec, name)
    return ids


def resize_labels(ids: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of (H, W) ids to ``size`` = (width, height): never invents a label."""
    if ids.shape[::-1] == size:
        return ids
    return np.asarray(Image.fromarray(ids.astype(np.int32)).resize(size, Image.Resampling.NEAREST)).astype(np.int64)


DEPTH_MODES = ("L", "I", "I;16", "I;16B", "I;16L", "F")  # 8/16-bit grayscale, 32-bit integer or float


def depth_values(image: Image.Image, name: str) -> np.ndarray:
    """A depth image's raw values as (H, W) float32: grayscale, or the original's RGBA PNGs whose four
    bytes per pixel are one little-endian float32 (its extract_depth script)."""
    if image.mode == "RGBA":
        rgba = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
        depth = rgba.view("<f4").reshape(rgba.shape[:2]).astype(np.float32)
        if not np.isfinite(depth).all():
            raise UserError(
                f"{name}: an RGBA depth file must hold one float32 per pixel (the original's format); "
                f"{int((~np.isfinite(depth)).sum())} pixels are not finite numbers, so this is not one"
            )
        return depth
    if image.mode not in DEPTH_MODES:
        raise UserError(
            f"{name}: expected a depth image (8/16-bit grayscale PNG, or the original's RGBA-float32 PNG), got mode {image.mode}"
        )
    return np.asarray(image.convert("F") if image.mode != "F" else image, dtype=np.float32)


def read_depth_map(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A depth image -> (H, W) float32 min-max scaled per image to [-1, 1], as the original does."""
    image, name = as_image(source, max_pixels)
    depth = depth_values(image, name)
    low, high = float(depth.min()), float(depth.max())
    return (2.0 * (depth - low) / max(high - low, 1e-8) - 1.0).astype(np.float32)


def resize_depth(depth: np.ndarray, size: tuple[int, int], resample: Image.Resampling = Image.Resampling.BILINEAR) -> np.ndarray:
    """Resize of a (H, W) float map (bilinear by default) to ``size`` = (width, height)."""
    if depth.shape[::-1] == size:
        return depth
    return np.asarray(Image.fromarray(depth, mode="F").resize(size, resample), dtype=np.float32)


def read_condition_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An RGB condition image (low-resolution picture, keypoint render, edge map...) -> (3, H, W) float32 in [-1, 1]."""
    image, name = as_image(source, max_pixels)
    if image.mode not in ("RGB", "RGBA", "L", "P", "LA"):
        raise UserError(f"{name}: expected an RGB image as the condition, got mode {image.mode}")
    return from_pil(image.convert("RGB"))[0]


def resize_condition_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of a (3, H, W) image in [-1, 1] to ``size`` = (width, height), per channel."""
    if image.shape[:0:-1] == size:
        return image
    return np.stack([resize_depth(channel, size, Image.Resampling.BICUBIC) for channel in image])


EXPECTED_CONDITION = {
    "segmentation": "--cond LABELS.png: 8-bit class ids (PNG mode L or P), or RGB in the model's palette",
    "depth": "--cond DEPTH.png: 8/16-bit grayscale, or the original's RGBA-float32 PNG; min-max scaled to [-1, 1]",
    "image": "--cond IMAGE: an RGB image, scaled to [-1, 1]; the output takes its size (or --size)",
    "class": "--class-id N",
    "unconditional": "no condition; --size WxH",
}


def check_class_id(class_id: int, spec: ConditionSpec) -> None:
    assert spec.n_classes is not None
    if not 0 <= class_id < spec.n_classes:
        raise UserError(f"class id {class_id} is out of range; this model knows classes 0..{spec.n_classes - 1}")


def snap_size(width: int, height: int, factor: int) -> tuple[int, int]:
    """Round a pixel size to the nearest multiple of the downsampling factor (at least one cell)."""
    return max(factor, round(width / factor) * factor), max(factor, round(height / factor) * factor)
