"""Which label ids, names and colours a segmentation model takes, as text and as pictures.

A label map is an 8-bit PNG of class ids (or an RGB picture in the model's palette); these helpers
let a user find the ids and colours without reading the manifest: the lines ``info`` prints, the
palette shown in the foreign-colour error, a swatch legend (``info --legend``) and a blank indexed
template to paint on (``examples/palette_template.png``).
"""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from taming_deploy.errors import UserError
from taming_deploy.spec import ConditionSpec

Colour = tuple[int, int, int]


def hex_colour(colour: Colour) -> str:
    return "#{:02x}{:02x}{:02x}".format(*colour)


def label_name(names: tuple[str, ...] | None, label: int) -> str:
    return names[label] if names is not None and label < len(names) else f"label {label}"


def label_lines(cond: ConditionSpec) -> list[str]:
    """One line per label id: id, name and colour (``-`` without a palette)."""
    if cond.kind != "segmentation" or not cond.n_labels:
        return []
    width = max((len(label_name(cond.label_names, k)) for k in range(cond.n_labels)), default=4)
    lines = [f"labels:       {'id':>3}  {'name':<{width}}  colour (RGB)"]
    for k in range(cond.n_labels):
        colour = cond.palette[k] if cond.palette is not None and k < len(cond.palette) else None
        shown = f"{hex_colour(colour)} ({colour[0]}, {colour[1]}, {colour[2]})" if colour else "-"
        lines.append(f"              {k:>3}  {label_name(cond.label_names, k):<{width}}  {shown}")
    for source, target in sorted(cond.label_remap.items()):
        lines.append(f"              id {source} in a map is read as {target} ({label_name(cond.label_names, target)})")
    return lines


def palette_listing(palette: tuple[Colour, ...], names: tuple[str, ...] | None = None, limit: int = 12) -> str:
    """'0 sky #78beff, 1 cloud #bebebe, ...' for the first ``limit`` colours, then how many more."""
    shown = ", ".join(f"{k} {label_name(names, k)} {hex_colour(c)}" for k, c in enumerate(palette[:limit]))
    if len(palette) > limit:
        shown += f", ... ({len(palette)} colours in all; `taming-deploy info MODEL` lists every one)"
    return shown


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def legend_image(cond: ConditionSpec, swatch: int = 24, rows_per_column: int = 24) -> Image.Image:
    """An RGB picture of one swatch per label with its id, name and hex colour, in columns of
    ``rows_per_column`` labels (182-label models fit on one page)."""
    if cond.kind != "segmentation" or not cond.n_labels:
        raise UserError(f"the model is conditioned on {cond.kind}, not on label maps: it has no labels to draw")
    if cond.palette is None:
        raise UserError("the model has no palette: its label maps are class-id PNGs (mode L); `taming-deploy info` lists the ids")
    font = _font(max(10, swatch * 2 // 3))
    texts = [f"{k:>3}  {label_name(cond.label_names, k)}  {hex_colour(cond.palette[k])}" for k in range(cond.n_labels)]
    text_width = max(int(font.getlength(t)) for t in texts)
    pad = swatch // 3
    column_width = pad + swatch + pad + text_width + 2 * pad
    columns = -(-len(texts) // rows_per_column)
    rows = min(len(texts), rows_per_column)
    image = Image.new("RGB", (columns * column_width, pad + rows * (swatch + pad)), "white")
    draw = ImageDraw.Draw(image)
    for k, text in enumerate(texts):
        x = (k // rows_per_column) * column_width + pad
        y = pad + (k % rows_per_column) * (swatch + pad)
        draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=tuple(cond.palette[k]), outline=(0, 0, 0))
        draw.text((x + swatch + pad, y + swatch // 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    return image


def palette_template(cond: ConditionSpec, size: tuple[int, int], fill: int = 0) -> Image.Image:
    """A blank (all ``fill``) indexed PNG image of ``size`` = (width, height) whose palette is the
    model's: index = label id, so an editor in indexed mode paints only valid labels, and
    ``generate --cond`` reads the indices as the ids."""
    if cond.palette is None or not cond.n_labels:
        raise UserError("the model has no palette to make a template from")
    image = Image.new("P", size, fill)
    image.putpalette([value for colour in cond.palette for value in colour])
    return image
