"""The project's model config: which stages a checkpoint holds and their sizes (stored as config.json)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from taming_deploy.errors import UserError
from taming_deploy.spec import ConditionSpec, ModelSpec
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
    def from_dict(cls, d: dict) -> "ModelConfig":
        if d.get("format") != CONFIG_FORMAT:
            raise UserError(f"not a taming-deploy checkpoint config (format is {d.get('format')!r})")
        if int(d.get("format_version", 0)) > CONFIG_VERSION:
            raise UserError(
                f"checkpoint format version {d['format_version']} is newer than this taming-deploy understands "
                f"({CONFIG_VERSION}); upgrade taming-deploy"
            )
        return cls(
            first_stage=AutoencoderConfig.from_dict(d["first_stage"]) if "first_stage" in d else None,
            condition=ConditionSpec.from_dict(d["condition"]) if "condition" in d else None,
            condition_autoencoder=(
                AutoencoderConfig.from_dict(d["condition_autoencoder"]) if "condition_autoencoder" in d else None
            ),
            transformer=GPTConfig(**d["transformer"]) if "transformer" in d else None,
            window=tuple(d.get("window", (16, 16))),
            pkeep=float(d.get("pkeep", 1.0)),
        )
