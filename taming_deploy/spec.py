"""What the runtime needs to know about a model, independent of where its weights live.

A project checkpoint (training side) and an exported bundle (manifest.json) both describe a model
with this spec; the sampler, the condition readers and every backend work from it alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ConditionKind = Literal["segmentation", "depth", "image", "class", "unconditional"]
SPATIAL_KINDS = ("segmentation", "depth", "image")  # image: an RGB picture (super-resolution, keypoints, edges)


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
    def from_dict(cls, d: dict) -> "ConditionSpec":
        return cls(
            kind=d["kind"],
            codebook_size=d.get("codebook_size"),
            n_labels=d.get("n_labels"),
            label_names=tuple(d["label_names"]) if d.get("label_names") else None,
            palette=tuple(tuple(int(v) for v in c) for c in d["palette"]) if d.get("palette") else None,
            label_remap={int(k): int(v) for k, v in d.get("label_remap", {}).items()},
            n_classes=d.get("n_classes"),
            sos_token=int(d.get("sos_token", 0)),
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
    def from_dict(cls, d: dict) -> "ModelSpec":
        return cls(
            downsample_factor=int(d["downsample_factor"]),
            image_codebook_size=int(d["image_codebook_size"]),
            vocab_size=int(d["vocab_size"]),
            block_size=int(d["block_size"]),
            n_layer=int(d["n_layer"]),
            n_head=int(d["n_head"]),
            n_embd=int(d["n_embd"]),
            window=(int(d["window"][0]), int(d["window"][1])),
            condition=ConditionSpec.from_dict(d["condition"]),
        )
