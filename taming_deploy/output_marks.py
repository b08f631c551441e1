"""How taming-deploy recognises its own earlier output files.

An existing file is replaced without ``--force`` only when it carries our mark, so that a mistyped
``--out`` never overwrites a user's photo or document: images carry "taming-deploy" as their EXIF
Software tag (PNG, JPEG and WebP alike, read from the header without decoding pixels), JSON documents a
top-level ``"written_by": "taming-deploy"``. Other files (e.g. ``.npy`` token grids) cannot carry a
mark, so replacing one always needs ``--force``.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

WRITER = "taming-deploy"
SOFTWARE_TAG = 0x0131  # EXIF "Software"
MAX_MARKED_JSON_BYTES = 64 << 20  # a larger .json is not one of ours (stats and results are kilobytes)


def image_save_options() -> dict[str, Any]:
    """Keyword arguments for ``Image.save`` that mark the file as ours."""
    exif = Image.Exif()
    exif[SOFTWARE_TAG] = WRITER
    return {"exif": exif.tobytes()}


def marked_document(document: dict[str, Any]) -> dict[str, Any]:
    """A JSON document with our mark first."""
    return {"written_by": WRITER, **document}


def is_own_file(path: Path) -> bool:
    """Whether ``path`` is a file taming-deploy wrote (see the module docstring)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        try:
            if path.stat().st_size > MAX_MARKED_JSON_BYTES:
                return False
            document = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return False
        return isinstance(document, dict) and document.get("written_by") == WRITER
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                exif = image.info.get("exif")
                if not isinstance(exif, bytes):
                    return False
                tags = Image.Exif()
                tags.load(exif)
                return tags.get(SOFTWARE_TAG) == WRITER
    except Exception:  # noqa: BLE001 - any unreadable, foreign or hostile file is simply not ours
        return False
