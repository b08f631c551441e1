"""What the runtime needs to know about a model, independent of where its weights live.

A project checkpoint (training side) and an exported bundle (manifest.json) both describe a model
with this spec; the sampler, the condition readers and every backend work from it alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from taming_deploy.documents import Doc, item_int, item_list, item_str
from taming_deploy.errors import UserError

ConditionKind = Literal["segmentation", "depth", "image", "class", "unconditional"]
SPATIAL_KINDS = ("segmentation", "depth", "image")  # image: an RGB picture (super-resolution, keypoints, edges)
MAX_VOCAB = 1 << 20  # codebooks, vocabularies and class counts
MAX_LABELS = 1 << 16
MAX_BLOCK = 1 << 16  # transformer positions (the original's models use 256..1024)


@dataclass(frozen=True)
class ConditionSpec:
    kind: ConditionKind
    codebook_size: int | None = None  # VQ conditions (segmentation, depth, image)
    n_labels: int | None = None  # segmentation
    label_names: tuple[str, ...] | None = None
    palette: tuple[tuple[int, int, int], ...] | None = None  # RGB per label id
    label_remap: dict[int, int] = field(default_factory=dict)  # e.g. {255: 0} when trained with "unlabeled" = 0
    n_classes: int | None = None  # class-conditional
    sos_token: int = 0  # unconditional

    @property
    def spatial(self) -> bool:
        return self.kind in SPATIAL_KINDS

    def to_dict(self) -> dict:
        d: dict = {"kind": self.kind}
        for key in ("codebook_size", "n_labels", "n_classes"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.kind == "unconditional":
            d["sos_token"] = self.sos_token
        if self.label_names is not None:
            d["label_names"] = list(self.label_names)
        if self.palette is not None:
            d["palette"] = [list(c) for c in self.palette]
        if self.label_remap:
            d["label_remap"] = {str(k): v for k, v in self.label_remap.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict | Doc) -> "ConditionSpec":
        """From a document, checked field by field (see taming_deploy.documents)."""
        doc = d if isinstance(d, Doc) else Doc(d, "condition spec")
        kind = doc.str("kind", get_args(ConditionKind))
        n_labels = doc.int("n_labels", 1, MAX_LABELS, default=None)
        if kind == "segmentation" and n_labels is None:
            raise UserError(f"{doc.source}: {doc.field('n_labels')}: missing (a segmentation condition needs it)")
        n_classes = doc.int("n_classes", 1, MAX_VOCAB, default=None)
        if kind == "class" and n_classes is None:
            raise UserError(f"{doc.source}: {doc.field('n_classes')}: missing (a class condition needs it)")
        per_label = n_labels if kind == "segmentation" else None
        names = doc.list("label_names", item_str(doc.source, 200), default=None, length=per_label)
        colour = item_int(0, 255, doc.source)
        palette = doc.list("palette", item_list(colour, doc.source, length=3), default=None, length=per_label)
        remap = doc.doc("label_remap", default={})
        label_remap = {}
        for key in remap.keys():
            if not key.isdigit() or int(key) > MAX_LABELS:
                raise remap.fail(key, "label ids as keys", key)
            label_remap[int(key)] = remap.int(key, 0, MAX_LABELS)
        return cls(
            kind=kind,  # type: ignore[arg-type]
            codebook_size=doc.int("codebook_size", 1, MAX_VOCAB, default=None),
            n_labels=n_labels,
            label_names=tuple(names) if names else None,
            palette=tuple(tuple(c) for c in palette) if palette else None,  # type: ignore[arg-type]
            label_remap=label_remap,
            n_classes=n_classes,
            sos_token=doc.int("sos_token", 0, MAX_VOCAB, default=0),
        )


@dataclass(frozen=True)
class ModelSpec:
    downsample_factor: int  # image pixels per latent cell, per side
    image_codebook_size: int
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    condition: ConditionSpec
    window: tuple[int, int] = (16, 16)  # latent window of the sliding-window sampler (rows, cols)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def cache_shape(self, batch: int) -> tuple[int, ...]:
        return (self.n_layer, 2, batch, self.n_head, self.block_size, self.head_dim)

    def to_dict(self) -> dict:
        return {
            "downsample_factor": self.downsample_factor,
            "image_codebook_size": self.image_codebook_size,
            "vocab_size": self.vocab_size,
            "block_size": self.block_size,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_embd": self.n_embd,
            "window": list(self.window),
            "condition": self.condition.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict | Doc) -> "ModelSpec":
        """From a document, checked field by field, ranges and the fields' agreement included."""
        doc = d if isinstance(d, Doc) else Doc(d, "model spec")
        spec = cls(
            downsample_factor=doc.int("downsample_factor", 1, 256),
            image_codebook_size=doc.int("image_codebook_size", 1, MAX_VOCAB),
            vocab_size=doc.int("vocab_size", 1, MAX_VOCAB),
            block_size=doc.int("block_size", 1, MAX_BLOCK),
            n_layer=doc.int("n_layer", 1, 1024),
            n_head=doc.int("n_head", 1, 1024),
            n_embd=doc.int("n_embd", 1, 1 << 16),
            window=tuple(doc.list("window", item_int(1, 1024, doc.source), length=2)),  # type: ignore[arg-type]
            condition=ConditionSpec.from_dict(doc.doc("condition")),
        )
        c = spec.condition
        if spec.n_embd % spec.n_head:
            raise UserError(f"{doc.source}: {doc.field('n_embd')}: {spec.n_embd} is not a multiple of n_head {spec.n_head}")
        needed = max(spec.image_codebook_size, c.codebook_size or 0, c.n_classes or 0, c.sos_token + 1)
        if spec.vocab_size < needed:
            raise UserError(f"{doc.source}: {doc.field('vocab_size')}: {spec.vocab_size} does not cover the codebooks ({needed} tokens)")
        cells = spec.window[0] * spec.window[1]
        if (cells if c.spatial else 1) + cells - 1 > spec.block_size:
            raise UserError(f"{doc.source}: {doc.field('window')}: {list(spec.window)} needs more positions than block_size {spec.block_size}")
        return spec
