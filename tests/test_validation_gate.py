"""The export's validation gate: index agreement judged against a float64 run with near-ties forgiven,
thresholds sized for the number of indices, and wrong graphs still refused (mutation tests)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from taming_deploy.errors import UserError
from taming_deploy.export.index_agreement import Float64Reference, IndexLimits
from taming_deploy.training.checkpoint import load_model


def test_threshold_allows_more_mismatches_for_more_indices_but_never_fewer_than_the_minimum():
    limits = IndexLimits(tie_tolerance=1e-4, mismatch_rate=1e-3, min_mismatches=1)
    assert limits.threshold(256) == 1 - 1 / 256  # floor(0.256) = 0 < the minimum of one
    assert limits.threshold(2048) == 1 - 2 / 2048
    assert limits.threshold(100_000) == 1 - 100 / 100_000


def test_greedy_top1_forgives_a_flip_only_between_near_equal_fp32_logits():
    from taming_deploy.export.validate import top1_agreement

    logits32 = np.array([[[2.0, 1.995, -1.0], [3.0, 0.0, 1.0], [0.5, 0.4, 0.1], [1.0, 2.0, 0.0]]], np.float32)
    variant = logits32.copy()
    variant[0, 0, 1] += 0.01  # fp32 gap 0.005: a near tie flips
    variant[0, 1, 2] += 2.5  # fp32 gap 2.0: a real change of the greedy token
    adjusted, raw = top1_agreement(variant, logits32, tie_tolerance=0.01)
    assert raw == 0.5 and adjusted == 0.75
    assert top1_agreement(variant, logits32, tie_tolerance=0.001) == (0.5, 0.5)  # the near tie is over this one


@torch.no_grad()
def test_float64_reference_forgives_only_near_ties(tiny_checkpoint):
    """A code swapped for its runner-up counts as a mismatch exactly when their distances differ by more
    than the tolerance times |z|^2 + |e|^2, computed here by hand."""
    vq = load_model(tiny_checkpoint).first_stage_model
    images = np.random.default_rng(0).uniform(-1, 1, size=(2, 3, 32, 32)).astype(np.float32)
    reference = Float64Reference(vq, images)
    vq64 = vq.double()
    z = vq64.quant_conv(vq64.encoder(torch.from_numpy(images).double())).permute(0, 2, 3, 1).reshape(-1, 8)
    codebook = vq64.quantize.embedding.weight
    distances = torch.cdist(z, codebook) ** 2
    best2 = distances.topk(2, largest=False).indices
    assert torch.equal(best2[:, 0].view(reference.tokens.shape), torch.from_numpy(reference.tokens))
    runner_up = best2[:, 1].numpy().reshape(reference.tokens.shape)
    gap = (distances.gather(1, best2[:, 1:]) - distances.gather(1, best2[:, :1])).squeeze(1)
    scale = (z**2).sum(1) + (codebook[best2[:, 1]] ** 2).sum(1)
    tolerance = float((gap / scale).median())  # half the cells are within it
    result = reference.agreement(runner_up, reference.tokens, tolerance)
    assert result.raw == 0.0
    assert result.adjusted == pytest.approx(float((gap <= tolerance * scale).double().mean()), abs=1e-12)
    assert 0.3 < result.adjusted < 0.7


def perturb_one_conv(model: onnx.ModelProto) -> None:
    """Every weight of the middle 3x3 convolution off by 1% (relative, random signs). (Scaling a conv's
    weights uniformly would hardly show: the GroupNorm after most convs removes a common scale.)"""
    initializers = {t.name: t for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.input[1] in initializers
             and len(numpy_helper.to_array(initializers[n.input[1]]).shape) == 4
             and numpy_helper.to_array(initializers[n.input[1]]).shape[-1] == 3]
    weight = initializers[convs[len(convs) // 2].input[1]]
    values = numpy_helper.to_array(weight)
    noise = 1 + 0.01 * np.random.default_rng(0).standard_normal(values.shape)
    weight.CopyFrom(numpy_helper.from_array((values * noise).astype(np.float32), weight.name))


def groupnorm_epsilon(epsilon: float):
    def wrong_epsilon(model: onnx.ModelProto) -> None:
        """GroupNorm epsilon ``epsilon`` instead of the original's 1e-6."""
        nodes = [n for n in model.graph.node if n.op_type == "GroupNormalization"]
        assert nodes
        for node in nodes:
            for attribute in node.attribute:
                if attribute.name == "epsilon":
                    attribute.f = epsilon
    return wrong_epsilon


def transposed_attention(model: onnx.ModelProto) -> None:
    """The attention weights used transposed (keys for queries) in every attention block."""
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert softmaxes
    for node in softmaxes:
        original = node.output[0]
        node.output[0] = original + "_untransposed"
        model.graph.node.append(helper.make_node("Transpose", [node.output[0]], [original], perm=[0, 2, 1]))
    sorted_nodes = topological(model.graph)
    del model.graph.node[:]
    model.graph.node.extend(sorted_nodes)


def topological(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all((not t) or t in available for t in n.input)]
        assert ready, "cycle"
        for node in ready:
            ordered.append(node)
            available.update(node.output)
            pending.remove(node)
    return ordered


@pytest.mark.slow
@pytest.mark.parametrize("graph_name, mutation, failing_check", [
    ("encoder", perturb_one_conv, r"encoder fp32 index agreement vs torch float64 \(calibration"),
    ("encoder", groupnorm_epsilon(1e-4), r"encoder fp32 index agreement vs torch float64 \(calibration"),
    ("decoder", groupnorm_epsilon(1e-5), r"decoder fp32 max relative error vs torch \(calibration\)"),
    ("encoder", transposed_attention, r"encoder fp32 index agreement vs torch float64 \(calibration"),
], ids=["conv_weights_1pct", "encoder_groupnorm_eps_1e-4", "decoder_groupnorm_eps_1e-5", "transposed_attention"])
def test_a_wrong_graph_fails_the_export(graph_name, mutation, failing_check, tiny_checkpoint, tmp_path, monkeypatch):
    import taming_deploy.export.exporter as exporter

    real_export = exporter.export_graph

    def export_then_mutate(graph, path):
        model = real_export(graph, path)
        if graph.name == graph_name:
            model = onnx.load(str(path))  # with its weights, which export_graph leaves in the data file
            mutation(model)
            onnx.save_model(model, str(path))
        return model

    monkeypatch.setattr(exporter, "export_graph", export_then_mutate)
    with pytest.raises(UserError, match=failing_check):
        exporter.export_bundle(tiny_checkpoint, tmp_path / "bundle", calibration_count=4, fp16=False, echo=lambda line: None)
    assert not (tmp_path / "bundle").exists()

