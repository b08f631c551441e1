"""TensorRT optimisation profiles from a bundle's manifest and the user's limits.

Every dynamic input axis of the four graphs is named in the manifest (see export/graphs.py):
batch, height/width (pixels), latent_height/latent_width (tokens per side) and tokens (the
transformer's T). Each name gets a (min, opt, max) range here, so the profile of any graph follows
from its declared input shapes. The transformer's dynamic inputs are tokens (batch, tokens), position
(batch,) and the 2 x n_layer cache slots past_key_i / past_value_i (batch, n_head, past, head_dim),
``past`` being the slots fed: one zero slot for a prefill, the whole block for a continuing call.
(Bundles exported before have a 0-d position and past slots fixed at block_size; their profiles
follow from the same declared shapes.) It gets two profiles, one execution context each:
- prefill: T in 1..block_size, tuned for T = block_size (a prefill feeds the condition plus the
  window's tokens before the target: most of the block in the reference-equivalent mode), and
  past in 1..block_size tuned for 1 (a prefill; multi-token continuing calls take the whole block);
- decode: T = 1, the cached step that dominates sampling; past in 1..block_size tuned for the block.
Batch ranges over 1..max_batch, tuned for 1 (one image at a time is the common request).
"""
from __future__ import annotations

from dataclasses import dataclass

from taming_deploy.bundle import GraphFile, TensorSpec
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
            if name not in shapes:
                return f"the engine's profile {self.name!r} has an input {name!r} this runtime does not feed; rebuild the engines"
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
        block = spec.block_size
        return [
            profile("prefill", {"tokens": (1, block, block), "past": (1, 1, block)}),
            profile("decode", {"tokens": (1, 1, 1), "past": (1, block, block)}),
        ]
    return [profile("images", {})]


def transformer_profile_index(profiles: list[Profile], tokens: int) -> int:
    """The profile a transformer call of ``tokens`` new tokens runs on: decode for one, else prefill."""
    wanted = "decode" if tokens == 1 else "prefill"
    return next(i for i, p in enumerate(profiles) if p.name == wanted)


# -- the transformer's interface -----------------------------------------------------------------


def past_names(n_layer: int) -> tuple[str, ...]:
    """The transformer's cache inputs in graph order: past_key_0 .. past_key_{L-1}, then the values
    (the names export/graphs.py gives them)."""
    return tuple(f"past_key_{i}" for i in range(n_layer)) + tuple(f"past_value_{i}" for i in range(n_layer))


def slot_shape(spec: ModelSpec, batch: int, slots: int | None = None) -> Shape:
    """One past_key_i / past_value_i input: (batch, n_head, slots, head_dim), slots the block size unless given."""
    return (batch, spec.n_head, spec.block_size if slots is None else slots, spec.head_dim)


def transformer_shapes(spec: ModelSpec, batch: int, tokens: int, per_entry: bool = False, slots: int | None = None) -> dict[str, Shape]:
    """The shapes of every dynamic transformer input for a call feeding ``tokens`` tokens to ``batch``
    sequences (what ``set_input_shape`` and ``Profile.violation`` take); ``per_entry``: the graph form
    with a (batch,) position and ``slots`` past slots (1 for a prefill, else the block)."""
    shapes: dict[str, Shape] = {"tokens": (batch, tokens)}
    if per_entry:
        shapes["position"] = (batch,)
    return {**shapes, **{name: slot_shape(spec, batch, slots) for name in past_names(spec.n_layer)}}


def per_entry_positions(graph: GraphFile) -> bool:
    """Whether a transformer graph takes one position per entry, (batch,), with past inputs whose slot
    axis is dynamic (the form export/graphs.py writes), rather than one position, (), for the whole
    batch and past inputs of block_size slots (bundles exported before it): told by the declared
    shape of ``position``."""
    return any(t.name == "position" and tuple(t.shape) == ("batch",) for t in graph.inputs)


def transformer_io_problem(graph: GraphFile, spec: ModelSpec) -> str | None:
    """Why a transformer graph is not the per-layer-past / new_kv interface this runtime drives
    (export/graphs.py, either form), or None. The runtime binds the past inputs inside one cache
    buffer and copies new_kv into it byte for byte, so names, shapes and a shared cache dtype are all
    checked."""
    layers, heads, dim = spec.n_layer, spec.n_head, spec.head_dim
    past = past_names(layers)
    per_entry = per_entry_positions(graph)
    slots = "past" if per_entry else spec.block_size
    expected_in: dict[str, tuple] = {"tokens": ("batch", "tokens"), "position": ("batch",) if per_entry else (),
                                     **{n: ("batch", heads, slots, dim) for n in past}}
    expected_out: dict[str, tuple] = {"logits": ("batch", spec.vocab_size), "new_kv": (layers, 2, "batch", heads, "tokens", dim)}
    for kind, actual, expected in (("inputs", graph.inputs, expected_in), ("outputs", graph.outputs, expected_out)):
        by_name: dict[str, TensorSpec] = {t.name: t for t in actual}
        if set(by_name) != set(expected):
            return (f"{graph.file} has the transformer {kind} {sorted(by_name)}, not the {sorted(expected)} "
                    "of this taming-deploy's transformer graph (per-layer past_key_i/past_value_i, new_kv)")
        for name, shape in expected.items():
            if tuple(by_name[name].shape) != shape:
                return f"{graph.file}: transformer {name!r} has shape {tuple(by_name[name].shape)}, expected {shape}"
    dtypes = {t.name: t.dtype for t in (*graph.inputs, *graph.outputs)}
    cache_dtypes = {dtypes[n] for n in (*past, "new_kv")}
    if len(cache_dtypes) != 1 or not cache_dtypes <= {"float32", "float16"}:
        return f"{graph.file}: the past_* inputs and new_kv must share one float dtype, found {sorted(cache_dtypes)}"
    wanted = {"tokens": "int64", "position": "int64", "logits": "float32"}
    for name, dtype in wanted.items():
        if dtypes[name] != dtype:
            return f"{graph.file}: transformer {name!r} is {dtypes[name]}, expected {dtype}"
    return None
