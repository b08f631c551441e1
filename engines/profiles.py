"""TensorRT optimisation profiles from a bundle's manifest and the user's limits.

Every dynamic input axis of the four graphs is named in the manifest (see export/graphs.py):
batch, height/width (pixels), latent_height/latent_width (tokens per side) and tokens (the
transformer's T). Each name gets a (min, opt, max) range here, so the profile of any graph follows
from its declared input shapes. The transformer gets two profiles, one execution context each:
- prefill: T in 1..block_size, tuned for T = block_size (a prefill feeds the condition plus the
  window's tokens before the target: most of the block in the reference-equivalent mode);
- decode: T = 1, the cached step that dominates sampling.
Batch ranges over 1..max_batch, tuned for 1 (one image at a time is the common request).
"""
from __future__ import annotations

from dataclasses import dataclass

from taming_deploy.bundle import GraphFile
from taming_deploy.errors import UserError
from taming_deploy.spec import ModelSpec

Shape = tuple[int, ...]
AxisRange = tuple[int, int, int]  # min, opt, max


@dataclass(frozen=True)
class Limits:
    """The user's build limits: --max-size (width, height) in pixels and --max-batch."""

    max_size: tuple[int, int] = (1024, 1024)
    max_batch: int = 4

    def validate(self, spec: ModelSpec) -> None:
        f = spec.downsample_factor
        width, height = self.max_size
        if self.max_batch < 1:
            raise UserError(f"--max-batch must be >= 1, got {self.max_batch}")
        if width < f or height < f or width % f or height % f:
            raise UserError(
                f"--max-size must be a positive multiple of the model's downsampling factor {f} on both sides, "
                f"got {width}x{height}"
            )


@dataclass(frozen=True)
class TensorRange:
    min: Shape
    opt: Shape
    max: Shape

    def to_dict(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorRange":
        return cls(tuple(d["min"]), tuple(d["opt"]), tuple(d["max"]))


@dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict[str, TensorRange]  # dynamic inputs only; static inputs need no profile entry

    def to_dict(self) -> dict:
        return {"name": self.name, "shapes": {k: v.to_dict() for k, v in self.shapes.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        return cls(d["name"], {k: TensorRange.from_dict(v) for k, v in d["shapes"].items()})

    def violation(self, shapes: dict[str, Shape]) -> str | None:
        """Why these input shapes cannot run on this profile (and which build option to raise), or None."""
        for name, rng in self.shapes.items():
            shape = tuple(shapes[name])
            if len(shape) != len(rng.max) or any(s < lo or s > hi for s, lo, hi in zip(shape, rng.min, rng.max)):
                return (
                    f"input {name!r} of shape {shape} is outside the engine's range {rng.min}..{rng.max} "
                    f"(profile {self.name!r}); rebuild with a larger --max-size / --max-batch"
                )
        return None


def axis_ranges(spec: ModelSpec, limits: Limits) -> dict[str, AxisRange]:
    """(min, opt, max) for every named image-side axis; the opt size is one sampling window."""
    f = spec.downsample_factor
    width, height = limits.max_size
    opt_h = min(spec.window[0] * f, height)
    opt_w = min(spec.window[1] * f, width)
    return {
        "batch": (1, 1, limits.max_batch),
        "height": (f, opt_h, height),
        "width": (f, opt_w, width),
        "latent_height": (1, opt_h // f, height // f),
        "latent_width": (1, opt_w // f, width // f),
    }


def tensor_range(shape: tuple[int | str, ...], axes: dict[str, AxisRange], where: str) -> TensorRange:
    resolved = []
    for axis in shape:
        if isinstance(axis, int):
            resolved.append((axis, axis, axis))
        elif axis in axes:
            resolved.append(axes[axis])
        else:
            raise UserError(f"{where}: dynamic axis {axis!r} is unknown to this taming-deploy; export the bundle again")
    return TensorRange(*(tuple(r[i] for r in resolved) for i in range(3)))


def graph_profiles(name: str, graph: GraphFile, spec: ModelSpec, limits: Limits) -> list[Profile]:
    """The profiles of one graph; their order is the engine's profile index order."""
    limits.validate(spec)
    axes = axis_ranges(spec, limits)
    dynamic = [t for t in graph.inputs if any(isinstance(a, str) for a in t.shape)]

    def profile(profile_name: str, extra: dict[str, AxisRange]) -> Profile:
        all_axes = {**axes, **extra}
        return Profile(profile_name, {t.name: tensor_range(t.shape, all_axes, f"{graph.file}: {t.name}") for t in dynamic})

    if name == "transformer":
        return [
            profile("prefill", {"tokens": (1, spec.block_size, spec.block_size)}),
            profile("decode", {"tokens": (1, 1, 1)}),
        ]
    return [profile("images", {})]


def transformer_profile_index(profiles: list[Profile], tokens: int) -> int:
    """The profile a transformer call of ``tokens`` new tokens runs on: decode for one, else prefill."""
    wanted = "decode" if tokens == 1 else "prefill"
    return next(i for i, p in enumerate(profiles) if p.name == wanted)
