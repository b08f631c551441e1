"""The project's model config: which stages a checkpoint holds and their sizes (stored as config.json)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from taming_deploy.documents import Doc, item_int, shown
from taming_deploy.errors import UserError
from taming_deploy.spec import MAX_BLOCK, MAX_LABELS, MAX_VOCAB, ConditionSpec, ModelSpec
from taming_deploy.training.models.gpt import GPTConfig
from taming_deploy.training.models.vqgan import AutoencoderConfig

CONFIG_FORMAT = "taming-deploy-checkpoint"
CONFIG_VERSION = 1


@dataclass(frozen=True)
class ModelConfig:
    """Any subset of the three stages: a VQGAN run holds only ``first_stage``, a full model all three.

    ``condition_autoencoder`` is set for the VQ conditions (segmentation, depth).
    """

    first_stage: AutoencoderConfig | None = None
    condition: ConditionSpec | None = None
    condition_autoencoder: AutoencoderConfig | None = None
    transformer: GPTConfig | None = None
    window: tuple[int, int] = (16, 16)
    pkeep: float = 1.0

    @property
    def is_complete(self) -> bool:
        return None not in (self.first_stage, self.condition, self.transformer)

    def condition_tokens(self) -> int:
        """Condition tokens in front of one window: the window's cells for spatial conditions, else 1."""
        assert self.condition is not None
        return self.window[0] * self.window[1] if self.condition.spatial else 1

    def validate(self) -> None:
        """Raise UserError when the stages cannot work together."""
        cond, fs, gpt = self.condition, self.first_stage, self.transformer
        if cond is not None and cond.spatial and self.condition_autoencoder is None:
            raise UserError(f"a {cond.kind} condition needs its autoencoder config")
        if cond is not None and cond.kind == "segmentation":
            ae = self.condition_autoencoder
            if ae is not None and ae.in_channels != cond.n_labels:
                raise UserError(f"segmentation autoencoder takes {ae.in_channels} channels but n_labels is {cond.n_labels}")
        if not self.is_complete:
            return
        assert fs is not None and cond is not None and gpt is not None
        needed = max(fs.codebook_tokens, cond.codebook_size or 0, (cond.n_classes or 0), cond.sos_token + 1)
        if gpt.vocab_size < needed:
            raise UserError(f"transformer vocab_size {gpt.vocab_size} does not cover the codebooks ({needed} tokens)")
        if cond.spatial:
            assert self.condition_autoencoder is not None
            if self.condition_autoencoder.downsample_factor != fs.downsample_factor:
                raise UserError(
                    f"condition downsampling factor {self.condition_autoencoder.downsample_factor} differs from "
                    f"the image's {fs.downsample_factor}: condition and image tokens must share one grid"
                )
        sequence = self.condition_tokens() + self.window[0] * self.window[1] - 1
        if sequence > gpt.block_size:
            raise UserError(f"window {self.window} needs {sequence} positions but block_size is {gpt.block_size}")

    def spec(self) -> ModelSpec:
        """The runtime's view of a complete model."""
        self.validate()
        if not self.is_complete:
            raise UserError("this checkpoint does not hold all three stages (first stage, condition, transformer)")
        assert self.first_stage is not None and self.condition is not None and self.transformer is not None
        cond = self.condition
        if cond.spatial and cond.codebook_size is None:
            assert self.condition_autoencoder is not None
            cond = replace(cond, codebook_size=self.condition_autoencoder.codebook_tokens)
        return ModelSpec(
            downsample_factor=self.first_stage.downsample_factor,
            image_codebook_size=self.first_stage.codebook_tokens,
            vocab_size=self.transformer.vocab_size,
            block_size=self.transformer.block_size,
            n_layer=self.transformer.n_layer,
            n_head=self.transformer.n_head,
            n_embd=self.transformer.n_embd,
            condition=cond,
            window=self.window,
        )

    def to_dict(self) -> dict:
        d: dict = {"format": CONFIG_FORMAT, "format_version": CONFIG_VERSION, "window": list(self.window), "pkeep": self.pkeep}
        if self.first_stage is not None:
            d["first_stage"] = self.first_stage.to_dict()
        if self.condition is not None:
            d["condition"] = self.condition.to_dict()
        if self.condition_autoencoder is not None:
            d["condition_autoencoder"] = self.condition_autoencoder.to_dict()
        if self.transformer is not None:
            d["transformer"] = self.transformer.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict | Doc) -> "ModelConfig":
        """From config.json, checked field by field (types and ranges) and for the stages' agreement."""
        doc = d if isinstance(d, Doc) else Doc(d, "checkpoint config")
        if doc.raw("format", None) != CONFIG_FORMAT:
            raise UserError(f"{doc.source}: not a taming-deploy checkpoint config (format is {shown(doc.raw('format', None))})")
        version = doc.int("format_version", 0, 1 << 20, default=0)
        if version > CONFIG_VERSION:
            raise UserError(
                f"{doc.source}: checkpoint format version {version} is newer than this taming-deploy understands "
                f"({CONFIG_VERSION}); upgrade taming-deploy"
            )
        config = cls(
            first_stage=autoencoder_from_doc(doc.doc("first_stage")) if "first_stage" in doc else None,
            condition=ConditionSpec.from_dict(doc.doc("condition")) if "condition" in doc else None,
            condition_autoencoder=autoencoder_from_doc(doc.doc("condition_autoencoder")) if "condition_autoencoder" in doc else None,
            transformer=gpt_from_doc(doc.doc("transformer")) if "transformer" in doc else None,
            window=tuple(doc.list("window", item_int(1, 1024, doc.source), length=2, default=[16, 16])),  # type: ignore[arg-type]
            pkeep=doc.float("pkeep", 0.0, 1.0, default=1.0),
        )
        try:
            config.validate()
        except UserError as exc:
            raise UserError(f"{doc.source}: {exc}") from None
        return config


def autoencoder_from_doc(doc: Doc) -> AutoencoderConfig:
    size = lambda key, high=4096: doc.int(key, 1, high)  # noqa: E731
    return AutoencoderConfig(
        ch=size("ch"),
        ch_mult=tuple(doc.list("ch_mult", item_int(1, 64, doc.source), max_items=8)),
        num_res_blocks=doc.int("num_res_blocks", 0, 64),
        attn_resolutions=tuple(doc.list("attn_resolutions", item_int(1, 1 << 16, doc.source), max_items=16)),
        in_channels=size("in_channels", MAX_LABELS),
        out_ch=size("out_ch", MAX_LABELS),
        resolution=size("resolution", 1 << 16),
        z_channels=size("z_channels"),
        embed_dim=size("embed_dim"),
        n_embed=size("n_embed", MAX_VOCAB),
        dropout=doc.float("dropout", 0.0, 1.0, default=0.0),
        double_z=doc.bool("double_z", default=False),
        beta=doc.float("beta", 0.0, 100.0, default=0.25),
        legacy=doc.bool("legacy", default=True),
        quantizer=doc.str("quantizer", ("vq", "gumbel"), default="vq"),
        remap_codes=doc.int("remap_codes", 0, MAX_VOCAB, default=0),
        unknown_index=unknown_index(doc),
    )


def unknown_index(doc: Doc) -> str | int:
    """The original's remap ``unknown_index``: "random", "extra" or a code id."""
    value = doc.raw("unknown_index", "random")
    if isinstance(value, str):
        return doc.str("unknown_index", ("random", "extra"))
    return doc.int("unknown_index", 0, MAX_VOCAB)


def gpt_from_doc(doc: Doc) -> GPTConfig:
    if unknown := sorted(set(doc.keys()) - set(GPTConfig.__dataclass_fields__)):
        raise UserError(f"{doc.source}: {doc.field(unknown[0])}: not a transformer setting")
    gpt = GPTConfig(
        vocab_size=doc.int("vocab_size", 1, MAX_VOCAB),
        block_size=doc.int("block_size", 1, MAX_BLOCK),
        n_layer=doc.int("n_layer", 1, 1024),
        n_head=doc.int("n_head", 1, 1024),
        n_embd=doc.int("n_embd", 1, 1 << 16),
        **{k: doc.float(k, 0.0, 1.0, default=0.0) for k in ("embd_pdrop", "resid_pdrop", "attn_pdrop")},
    )
    if gpt.n_embd % gpt.n_head:
        raise UserError(f"{doc.source}: {doc.field('n_embd')}: {gpt.n_embd} is not a multiple of n_head {gpt.n_head}")
    return gpt
