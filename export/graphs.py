"""The four graphs a model is split into, as small torch modules with their ONNX signatures.

- encoder:      image (B, 3, H, W) float32 in [-1, 1] -> indices (B, h, w) int64
- decoder:      indices (B, h, w) int64 -> image (B, 3, H, W) float32 (unclamped)
- cond_encoder: labels (B, H, W) int64 class ids, depth (B, 1, H, W) or an image (B, 3, H, W), float32 in
                [-1, 1] -> indices (B, h, w)
- transformer:  tokens (B, T) int64, position (B,) int64 (where each entry's tokens start), past_key_i /
                past_value_i (B, n_head, past, head_dim) per layer i, ``past`` in 1..block_size -> logits
                (B, V) of the last position, new_kv (n_layer, 2, B, n_head, T, head_dim): the fed tokens'
                keys and values, which the runtime writes into its cache at slots position[b]..+T-1. Entry
                b attends to the past slots below position[b] and causally to its fed tokens, so a prefill
                (all positions 0) is fed one masked slot instead of the empty cache, and continuing calls
                the whole cache (a view, no copy). One graph for prefills and steps, entries at different
                positions in one batch; no shape grows with the step count.
                (Bundles exported before had position () and past slots fixed at block_size: the
                "shared-position" form, which the runtimes still run; see engines/profiles.py.)
The quantizer's distances (Gumbel: logits) and argmin (argmax) are fp32 inside every graph (quantizer.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from taming_deploy.training.models.gpt import GPT
from taming_deploy.training.models.net2net import TamingModel
from taming_deploy.training.models.vqgan import VQModel


class EncoderGraph(nn.Module):
    def __init__(self, vq: VQModel):
        super().__init__()
        self.vq = vq

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vq.codes(image)


class SegmentationEncoderGraph(EncoderGraph):
    """One-hot inside the graph (a comparison against the label range), so callers pass class ids."""

    def forward(self, labels: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        label_range = torch.arange(self.vq.config.in_channels, device=labels.device).view(1, -1, 1, 1)
        return super().forward((labels.unsqueeze(1) == label_range).float())


class DecoderGraph(nn.Module):
    def __init__(self, vq: VQModel):
        super().__init__()
        self.vq = vq

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.vq.decode_indices(indices)


class TransformerStepGraph(nn.Module):
    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, tokens: torch.Tensor, position: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``past``: past_key_0 .. past_key_{L-1}, then past_value_0 .. past_value_{L-1}."""
        layers = len(past) // 2
        return self.gpt(tokens, list(zip(past[:layers], past[layers:])), position, last_only=True)


CONDITION_INPUTS = {"segmentation": "labels", "depth": "depth", "image": "image"}  # the cond_encoder graph's input, per kind


def past_names(n_layer: int) -> tuple[str, ...]:
    return tuple(f"past_key_{i}" for i in range(n_layer)) + tuple(f"past_value_{i}" for i in range(n_layer))


@dataclass
class GraphDef:
    name: str
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_shapes: dict  # torch.export dynamic shapes per input name
    axis_names: dict[str, tuple[int | str, ...]]  # declared shapes of every input/output, dynamic axes named


def graph_defs(model: TamingModel, example_hw: tuple[int, int] = (64, 64)) -> list[GraphDef]:
    """The graphs of a complete model, with example inputs of ``example_hw`` pixels."""
    auto = torch.export.Dim.AUTO
    batch = torch.export.Dim("batch", min=1, max=1024)
    cfg = model.config
    spec = cfg.spec()
    f = spec.downsample_factor
    h, w = example_hw
    image_axes = ("batch", 3, "height", "width")
    latent_axes = ("batch", "latent_height", "latent_width")
    defs = [
        GraphDef(
            "encoder", EncoderGraph(model.first_stage_model), (torch.rand(2, 3, h, w) * 2 - 1,),
            ("image",), ("indices",), {"image": {0: batch, 2: auto, 3: auto}},
            {"image": image_axes, "indices": latent_axes},
        ),
        GraphDef(
            "decoder", DecoderGraph(model.first_stage_model),
            (torch.randint(0, spec.image_codebook_size, (2, h // f, w // f)),),
            ("indices",), ("image",), {"indices": {0: batch, 1: auto, 2: auto}},
            {"indices": latent_axes, "image": image_axes},
        ),
    ]
    cond = spec.condition
    if cond.kind == "segmentation":
        assert cond.n_labels is not None
        defs.append(GraphDef(
            "cond_encoder", SegmentationEncoderGraph(model.cond_stage_model), (torch.randint(0, cond.n_labels, (2, h, w)),),
            ("labels",), ("indices",), {"labels": {0: batch, 1: auto, 2: auto}},
            {"labels": ("batch", "height", "width"), "indices": latent_axes},
        ))
    elif cond.spatial:
        channels = model.cond_stage_model.config.in_channels
        name = CONDITION_INPUTS[cond.kind]
        # dynamic_shapes are keyed by the forward's argument ("image"); the ONNX input is named for the kind
        defs.append(GraphDef(
            "cond_encoder", EncoderGraph(model.cond_stage_model), (torch.rand(2, channels, h, w) * 2 - 1,),
            (name,), ("indices",), {"image": {0: batch, 2: auto, 3: auto}},
            {name: ("batch", channels, "height", "width"), "indices": latent_axes},
        ))
    names = past_names(spec.n_layer)
    slot_axes = ("batch", spec.n_head, "past", spec.head_dim)
    # distinct example tensors: torch.export must not see the layers' caches as one aliased tensor
    past = tuple(torch.randn(2, spec.n_head, spec.block_size, spec.head_dim) for _ in names)
    slots = torch.export.Dim("past", min=1, max=spec.block_size)
    defs.append(GraphDef(
        "transformer", TransformerStepGraph(model.transformer),
        (torch.randint(0, spec.vocab_size, (2, 3)), torch.tensor([2, 1]), *past),
        ("tokens", "position", *names), ("logits", "new_kv"),
        {"tokens": {0: batch, 1: torch.export.Dim("tokens", min=1, max=spec.block_size)}, "position": {0: batch},
         "past": tuple({0: batch, 2: slots} for _ in names)},
        {"tokens": ("batch", "tokens"), "position": ("batch",), **{name: slot_axes for name in names},
         "logits": ("batch", spec.vocab_size), "new_kv": (spec.n_layer, 2, "batch", spec.n_head, "tokens", spec.head_dim)},
    ))
    return defs
