"""What TensorRT's ONNX parser accepts, as data, and the checks the exporter runs against it.

Source: ONNX-TensorRT docs/operators.md as shipped with TensorRT 10.15 ("TensorRT 10.15 supports
operators in the inclusive range of opset 9 to opset 24"), the rows marked "Y". TensorRT 11.x's
opset guide raises the maximum opset to 25 and keeps 9 as the minimum; the 10.15 range is used here
because the bundles must build on 10.x too.
Version notes for the ops the exporter emits (ONNX-TensorRT changelog):
- GroupNormalization (opset 18 form) since 8.6; the opset-21 form (per-channel scale/bias) since
  10.9, hence engines.deps.MIN_TENSORRT.
- LayerNormalization since 8.6 (only the first output, Y, is supported).
- INT64 tensors are native since 9.0 ("ONNX models with INT64 I/O require INT64 bindings").
The per-op restrictions of operators.md (e.g. Resize modes, constant Squeeze axes) are checked by
the parser itself when an engine is built; this module answers the cheaper question of whether
every op type is known to it at all.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    import onnx

PARSER_DOC = "ONNX-TensorRT operators.md, TensorRT 10.15"
MIN_OPSET = 9
MAX_OPSET = 24
DEFAULT_DOMAINS = ("", "ai.onnx")

SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish
Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike
Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign
RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid
Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
TensorScatter ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())


def default_opset(model: "onnx.ModelProto") -> int | None:
    for entry in model.opset_import:
        if entry.domain in DEFAULT_DOMAINS:
            return int(entry.version)
    return None


def opset_problem(model: "onnx.ModelProto") -> str | None:
    """Why TensorRT's parser would not take the model's opset, or None."""
    opset = default_opset(model)
    if opset is None:
        return "the model imports no default-domain (ai.onnx) opset"
    if not MIN_OPSET <= opset <= MAX_OPSET:
        return f"opset {opset} is outside the range TensorRT's ONNX parser supports ({MIN_OPSET}-{MAX_OPSET}, {PARSER_DOC})"
    return None


def _subgraphs(node: "onnx.NodeProto") -> Iterable["onnx.GraphProto"]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def unsupported_ops(model: "onnx.ModelProto") -> list[str]:
    """Op types in the model (subgraphs and local functions included) that TensorRT's parser does
    not support, sorted; ops of other domains are named ``domain::Op``."""
    functions = {(f.domain, f.name): f for f in model.functions}
    found: set[str] = set()
    expanded: set[tuple[str, str]] = set()

    def visit(nodes: Iterable["onnx.NodeProto"]) -> None:
        for node in nodes:
            key = (node.domain, node.op_type)
            if key in functions:  # a model-local function: the parser inlines its body
                if key not in expanded:
                    expanded.add(key)
                    visit(functions[key].node)
            elif node.domain not in DEFAULT_DOMAINS:
                found.add(f"{node.domain}::{node.op_type}")
            elif node.op_type not in SUPPORTED_OPS:
                found.add(node.op_type)
            for graph in _subgraphs(node):
                visit(graph.node)

    visit(model.graph.node)
    return sorted(found)
