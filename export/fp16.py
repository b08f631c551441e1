"""fp32 ONNX graph -> strongly typed mixed fp16/fp32 graph, decided by measurement.

TensorRT 11 builds only strongly typed networks, so the precision of every tensor must be in the
graph: here every float tensor gets its final type and every change of precision is an explicit
Cast. ``to_mixed_precision`` is called by the exporter once per graph.

What stays fp32 (each reason is recorded in the report):

- ``quantizer``: the codebook distance subgraph in front of every ArgMin/ArgMax, i.e. the nodes on
  the paths from the latent z (the data operand of the MatMul against a constant codebook, traced back
  through reshapes/transposes and scalings by constants) to the ArgMin: |z|^2 (Pow, ReduceSum),
  -2 z.e (Mul, MatMul), the sums, the ArgMin itself. Always, whatever the measured ranges: in fp16 the
  large |z|^2 + |e|^2 terms swamp the differences between neighbouring codes (REFERENCE.md).
- ``range``: a node any of whose float inputs/outputs reached max |x| > ``threshold`` on the
  calibration feeds. The fp32 graph is run with ONNX Runtime (CPU) with max |x| of every
  intermediate float tensor as an extra output (``activation_ranges``); infinities that the fp32
  graph itself produces (the -inf of attention masks) are not counted, fp16 represents them.
- ``normalization range``: a GroupNormalization/LayerNormalization/InstanceNormalization whose input
  reached max |x| > sqrt(threshold). fp16 normalisation nodes carry ``stash_type=1`` (ONNX spec,
  opset 17+/21: stage one - mean and variance - is computed in fp32 and only the normalised result is
  cast back), which covers the statistics in any backend that follows the spec. A backend that
  squares the input in its own precision before accumulating would still overflow once |x|^2 leaves
  fp16's range; this guard keeps such a node wholly fp32 when the squares would not have the same
  headroom as every other activation.
- ``initializer range``: a node reading a constant with finite values beyond fp16's max (65504).
- ``no fp16 in schema`` / ``output type from attribute`` / ``unknown op``: ops whose ONNX schema at
  the model's opset has no float16 for that input (e.g. Range at opset 21), whose float output type is
  set by an attribute (RandomNormal, EyeLike, ...), or that are not standard ONNX ops.

Softmax is not forced to fp32: its output lies in [0, 1], implementations subtract the row maximum
before exp (no overflow), and the row sum is at most the row length; its input is range-checked like
any other tensor. Keeping only the Softmax in fp32 would not restore the precision of the attention
scores anyway - that is set by the fp16 MatMul producing them.

Threshold: 4096 (``DEFAULT_THRESHOLD``) = fp16 max / 16. Activations seen on the calibration feeds
may grow on unseen inputs (other images, larger sizes, other prompts); a factor of 16 (four binades)
of headroom keeps those in range, and also covers partial sums inside fp16 kernels that are larger
than the node's output. Below the threshold nothing is lost by fp16's range - its relative precision
(2^-11) is the same at every magnitude.

Judging the result without a GPU: ONNX Runtime 1.32's CPU provider has fp16 kernels only for a few
ops (measured: Transpose, Reshape, Concat, Gather, LayerNormalization). For Conv, MatMul, Gemm,
Add/Mul/..., Sigmoid, GroupNormalization, Softmax, Gelu, Resize, ArgMin it inserts Casts and runs
chains of such ops in fp32 without rounding in between (a Conv -> LayerNormalization -> Conv chain
whose middle tensor is 1e5 runs without overflow). A plain ORT CPU run of an fp16 graph therefore
under-reports fp16 error and hides overflows; ``fp16_storage_emulation`` builds an fp32 graph that
rounds every fp16 tensor where it is stored, which is what fp16 accuracy should be judged by on CPU
(the acceptance checks should run both).

Graph inputs/outputs keep their types except those named in ``fp16_io`` (the transformer's
``cache``/``new_cache``); asking for an fp16 I/O tensor whose calibration range exceeds the
threshold raises ``Fp16IoRangeError``.

Why not NVIDIA ModelOpt AutoCast (``modelopt.onnx.autocast.convert_to_mixed_precision``)? It was
installed (nvidia-modelopt 0.47.0 with the [onnx] extra, in a separate venv) and run on the four
fixture graphs (CPU, ORT reference, 0.4-2.4 s per graph). It does the same kind of range-driven
classification, but:
- its [onnx] extra pins onnx~=1.21 and onnxruntime-gpu~=1.24 (this project: onnx 1.23, onnxruntime
  1.32, which cannot be installed beside onnxruntime-gpu) and pulls torch 2.14 (project pins 2.13)
  plus CUDA wheels, cupy and triton: a 6.5 GB environment for an export step;
- ``keep_io_types`` is all or nothing: the fp16 cache with fp32 image/logits I/O needs post-editing;
- with default settings it converted the quantizer (ArgMin and distances) to fp16; it can be told
  not to only by node-name patterns that we would compute ourselves;
- its -inf attention-mask constants count as out of range, so it kept the masking Where and Softmax
  of the transformer in fp32;
- its output encoder/decoder graphs did not run in ONNX Runtime 1.32 ("Shape mismatch attempting to
  re-use buffer"): it rewrote the value_info shapes with one symbolic channel dim 'unk' shared by
  tensors of 32 and 64 channels, so ORT reused buffers of the wrong size (also with
  use_standalone_type_inference=True).
The pass below is small, depends only on onnx, numpy and onnxruntime (already export/runtime
dependencies), and keeps the exporter's shapes.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from taming_deploy.export.graph_files import is_external, model_tensors, tensor_bytes

PROTOBUF_LIMIT = 2**31 - 1  # bytes of one serialized message: larger graphs are checked from their files

FP16_MAX = 65504.0
DEFAULT_THRESHOLD = 4096.0

FLOAT = TensorProto.FLOAT
FLOAT16 = TensorProto.FLOAT16

# ops that read only the shape of a float input: they take whatever type the tensor has
SHAPE_ONLY_OPS = {"Shape", "Size"}
NORMALIZATION_OPS = {"GroupNormalization", "LayerNormalization", "InstanceNormalization"}
STASH_TYPE_OPS = {"GroupNormalization", "LayerNormalization"}
INDEX_OPS = {"ArgMin", "ArgMax"}
# ops the quantizer trace passes through on its way from the codebook MatMul back to z
PASS_THROUGH_OPS = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity"}
SCALING_OPS = {"Mul", "Div", "Neg"}


class Fp16IoRangeError(ValueError):
    """A graph input/output requested in fp16 carries values beyond the threshold."""


@dataclass
class MixedPrecisionReport:
    threshold: float
    norm_input_limit: float  # normalisation nodes with a larger input stay fp32 (sqrt(threshold))
    float_nodes: int  # nodes computing on float tensors (the ones that get a precision)
    fp16_nodes: int
    fp32_nodes: int
    casts_inserted: int
    calibration_feeds: int
    fp16_io: list[str]
    fp32_reasons: dict[str, int]  # reason -> number of nodes
    fp32: list[dict] = field(default_factory=list)  # {"node", "op", "reason", "max_abs"}
    max_abs: float = 0.0  # largest finite |x| of any intermediate tensor on the calibration feeds
    max_abs_tensor: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def to_mixed_precision(
    model: onnx.ModelProto,
    calibration_feeds: list[dict[str, np.ndarray]],
    fp16_io: tuple[str, ...] = (),
    threshold: float = DEFAULT_THRESHOLD,
    keep_quantizer_fp32: bool = True,
    base_dir: Path | None = None,
) -> tuple[onnx.ModelProto, MixedPrecisionReport]:
    """The mixed-precision variant of the fp32 ``model`` and what was kept in fp32 and why.

    ``calibration_feeds``: inputs of the fp32 graph (one dict per run), realistic content.
    ``fp16_io``: float graph inputs/outputs that become fp16 (all others keep their type).
    ``threshold``: max |activation| a node may see and still run in fp16 (inf: convert everything,
    which with ``keep_quantizer_fp32=False`` is a naive all-fp16 conversion, for comparisons).
    ``base_dir``: where ``model``'s external data files are. Its weights are read from them one tensor
    at a time; the result holds its fp16 weights inline and names the same files for the fp32 ones
    it keeps (``graph_files.save_graph`` with the same ``base_dir`` writes it out self-contained).
    """
    if not calibration_feeds:
        raise ValueError("to_mixed_precision needs at least one calibration feed")
    model = _with_constants_as_initializers(model)
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        raise NotImplementedError("graphs with control flow (If/Loop/Scan) are not supported")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise ValueError("model has no default-domain opset import")
    types = _tensor_types(model)
    io_types = {v.name: v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.output)}
    for name in fp16_io:
        if io_types.get(name) != FLOAT:
            raise ValueError(f"fp16_io: {name!r} is not a float32 graph input or output")

    ranges = activation_ranges(model, calibration_feeds, base_dir)
    initializers = {i.name: i for i in graph.initializer}
    init_max = {name: _finite_max_abs(numpy_helper.to_array(t, _dir(base_dir))) for name, t in initializers.items() if t.data_type == FLOAT}
    for name in fp16_io:
        if ranges.get(name, 0.0) > threshold:
            raise Fp16IoRangeError(f"{name} reaches |x| = {ranges[name]:.4g} on the calibration feeds, beyond the fp16 threshold {threshold:g}")

    plans = [_NodePlan.of(node, opset, types) for node in graph.node]
    forced = _quantizer_nodes(graph, initializers) if keep_quantizer_fp32 else set()
    norm_limit = math.sqrt(threshold)
    fp32_rows = []
    for index, (node, plan) in enumerate(zip(graph.node, plans)):
        if plan.kind != "float":
            continue
        activations = [t for t in plan.float_inputs + plan.float_outputs if t not in initializers]
        seen = max((ranges.get(t, 0.0) for t in activations), default=0.0)
        reason = plan.fixed_reason
        if reason is None and index in forced:
            reason = "quantizer"
        if reason is None and seen > threshold:
            reason = "range"
        if reason is None and node.op_type in NORMALIZATION_OPS:
            if ranges.get(node.input[0], 0.0) > norm_limit:
                reason = "normalization range"
            elif sum(1 for o in node.output if o) > 1:
                reason = "normalization statistics outputs"
        if reason is None and any(init_max.get(t, 0.0) > FP16_MAX for t in plan.float_inputs):
            reason = "initializer range"
        if reason is not None:
            plan.fp16 = False
            fp32_rows.append({"node": node.name or f"{node.op_type}#{index}", "op": node.op_type, "reason": reason, "max_abs": float(seen)})

    out, casts = _rewrite(model, plans, types, set(fp16_io), base_dir)
    if not any(is_external(t) for t in model_tensors(out)) and tensor_bytes(out) < PROTOBUF_LIMIT:  # else: checked once written
        onnx.checker.check_model(out, full_check=True)
    reasons: dict[str, int] = defaultdict(int)
    for row in fp32_rows:
        reasons[row["reason"]] += 1
    float_plans = [p for p in plans if p.kind == "float"]
    internal = {t: v for t, v in ranges.items() if t not in io_types}
    top = max(internal.items(), key=lambda kv: kv[1], default=("", 0.0))
    report = MixedPrecisionReport(
        threshold=float(threshold),
        norm_input_limit=float(norm_limit),
        float_nodes=len(float_plans),
        fp16_nodes=sum(p.fp16 for p in float_plans),
        fp32_nodes=sum(not p.fp16 for p in float_plans),
        casts_inserted=casts,
        calibration_feeds=len(calibration_feeds),
        fp16_io=list(fp16_io),
        fp32_reasons=dict(reasons),
        fp32=fp32_rows,
        max_abs=float(top[1]),
        max_abs_tensor=top[0],
    )
    return out, report


# --- evaluating fp16 on a CPU ------------------------------------------------------------------------


def fp16_storage_emulation(model: onnx.ModelProto) -> onnx.ModelProto:
    """An fp32 graph that computes like the mixed-precision ``model`` on a GPU: every op in fp32,
    every fp16 tensor rounded to fp16 where it is stored (after each node, at fp16 inputs and
    constants). Same inputs/outputs and types as ``model``.

    Why: ONNX Runtime's CPU provider has fp16 kernels for few ops (measured with 1.32: Transpose,
    Reshape, Concat, Gather, LayerNormalization); for Conv, MatMul, Gemm, elementwise ops,
    GroupNormalization, Softmax, Gelu, Resize, ... it inserts Casts and runs chains of them in fp32
    without rounding in between. A plain ORT CPU run of an fp16 graph therefore misses most of fp16's
    rounding and overflow. This emulation rounds every fp16 tensor (fp32 arithmetic inside each op,
    like fp32-accumulating GPU kernels; no cross-op fusion, so it is the pessimistic side of what
    TensorRT does) and is what fp16 accuracy should be judged by without a GPU.

    fp16 weights are read through a Cast to fp32, which ONNX Runtime folds into an fp32 constant when
    it loads the graph: building the emulation reads no weight (they may stay in external data).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    types = _tensor_types(out)
    outputs16 = {v.name for v in graph.output if v.type.tensor_type.elem_type == FLOAT16}
    renamed: dict[str, str] = {}  # fp16 graph inputs, outputs and weights -> their fp32 twin read inside
    ordered = []
    for value in [*graph.input, *graph.initializer]:
        elem_type = value.type.tensor_type.elem_type if isinstance(value, onnx.ValueInfoProto) else value.data_type
        if elem_type == FLOAT16 and value.name not in renamed:  # (an initializer may also be listed as an input)
            renamed[value.name] = f"{value.name}__f32"
            ordered.append(helper.make_node("Cast", [value.name], [renamed[value.name]], to=FLOAT))
    for name in outputs16:
        renamed[name] = f"{name}__f32"
    for node in graph.node:
        for i, t in enumerate(node.input):
            if t in renamed:
                node.input[i] = renamed[t]
        if node.op_type == "Cast" and any(a.name == "to" and a.i == FLOAT16 for a in node.attribute):
            _set_attr(node, "to", FLOAT)
        if node.op_type == "ConstantOfShape":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == FLOAT16:
                    a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
        rounding = []
        for i, o in enumerate(node.output):
            if not o or types.get(o) != FLOAT16:
                continue
            wide = f"{o}__wide"
            node.output[i] = wide
            if o in outputs16:  # graph output: store as fp16, read back as fp32 inside
                rounding += [helper.make_node("Cast", [wide], [o], to=FLOAT16), helper.make_node("Cast", [o], [renamed[o]], to=FLOAT)]
            else:
                rounding += [helper.make_node("Cast", [wide], [f"{o}__half"], to=FLOAT16), helper.make_node("Cast", [f"{o}__half"], [o], to=FLOAT)]
        ordered.append(node)
        ordered.extend(rounding)
    _replace_nodes(graph, ordered)
    for value in graph.value_info:
        if value.type.tensor_type.elem_type == FLOAT16:
            value.type.tensor_type.elem_type = FLOAT
    return out


# --- measurement ------------------------------------------------------------------------------------


def activation_ranges(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], base_dir: Path | None = None) -> dict[str, float]:
    """Largest finite |x| of every float32 graph input and node output over ``feeds`` (fp32 ORT run).

    The graph is extended with ReduceMax(Abs(t)) for every float tensor t, so a run returns one scalar
    per tensor instead of every activation (a 256 x 256 decoder has gigabytes of them). Tensors whose
    maximum is not finite (the -inf of attention masks, an overflow) are fetched whole in a second
    pass and reduced over their finite values only. ``base_dir``: where the model's external data is.
    """
    types = _tensor_types(model)
    names = [o for n in model.graph.node for o in n.output if o and types.get(o) == FLOAT]
    float_inputs = [i.name for i in model.graph.input if i.type.tensor_type.elem_type == FLOAT]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    for k, name in enumerate(names):
        probe.graph.node.extend([
            helper.make_node("Abs", [name], [f"__absval_{k}"]),
            helper.make_node("ReduceMax", [f"__absval_{k}"], [f"__absmax_{k}"], keepdims=0),
        ])
        probe.graph.output.append(helper.make_tensor_value_info(f"__absmax_{k}", FLOAT, []))
    session = _cpu_session(probe, base_dir)
    del probe
    ranges: dict[str, float] = defaultdict(float)
    not_finite: set[str] = set()
    for feed in feeds:
        for name in float_inputs:
            ranges[name] = max(ranges[name], _finite_max_abs(np.asarray(feed[name])))
        for name, value in zip(names, session.run(None, feed)):
            value = float(value)
            if math.isfinite(value):
                ranges[name] = max(ranges[name], value)
            else:
                not_finite.add(name)
    if not_finite:
        full = onnx.ModelProto()
        full.CopyFrom(model)
        declared = {v.name: v for v in full.graph.value_info}
        present = {o.name for o in full.graph.output}
        wanted = [n for n in names if n in not_finite]
        for name in wanted:
            if name not in present:
                full.graph.output.append(declared.get(name) or helper.make_tensor_value_info(name, FLOAT, None))
        session = _cpu_session(full, base_dir)
        for feed in feeds:
            for name, value in zip(wanted, session.run(wanted, feed)):
                ranges[name] = max(ranges[name], _finite_max_abs(value))
    return dict(ranges)


def _dir(base_dir: Path | None) -> str:
    return "" if base_dir is None else str(base_dir)


def _cpu_session(model: onnx.ModelProto, base_dir: Path | None):
    """An ONNX Runtime CPU session of ``model``, its external data read from ``base_dir``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if base_dir is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(Path(base_dir).resolve()))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _finite_max_abs(array: np.ndarray) -> float:
    array = np.abs(np.asarray(array, dtype=np.float32))
    finite = array[np.isfinite(array)]
    return float(finite.max()) if finite.size else 0.0


# --- which nodes form the quantizer ------------------------------------------------------------------


def _quantizer_nodes(graph: onnx.GraphProto, initializers: dict) -> set[int]:
    """Indices of the nodes computing codebook distances for each ArgMin/ArgMax, plus the ArgMin.

    The latent z is found from the MatMul/Gemm against a constant (the codebook) nearest to the
    ArgMin: its other operand, traced back through reshapes, transposes and scalings by constants.
    The distance subgraph is every node on a path from z to the ArgMin, plus nodes computing only
    from constants that feed it (e.g. a transposed codebook or the |e|^2 terms).
    """
    producer = {out: i for i, n in enumerate(graph.node) for out in n.output if out}
    constant = _constant_tensors(graph, initializers, producer)
    selected: set[int] = set()
    for index, node in enumerate(graph.node):
        if node.op_type not in INDEX_OPS:
            continue
        ancestors = _ancestors(graph, producer, node.input[0])
        codebook_product = None
        for i in sorted(ancestors, reverse=True):  # nearest first (graph order is topological)
            n = graph.node[i]
            if n.op_type in ("MatMul", "Gemm") and sum(t in constant for t in n.input[:2]) == 1:
                codebook_product = n
                break
        if codebook_product is None:
            # no codebook product found: keep the arithmetic feeding the ArgMin
            z = node.input[0]
        else:
            z = next(t for t in codebook_product.input[:2] if t not in constant)
            while z in producer:
                p = graph.node[producer[z]]
                data = [t for t in p.input if t and t not in constant]
                if p.op_type in PASS_THROUGH_OPS or (p.op_type in SCALING_OPS and len(data) == 1):
                    z = data[0]
                else:
                    break
        descendants = _descendants(graph, z)
        on_path = {i for i in ancestors if i in descendants or _computes_constant(graph.node[i], constant)}
        selected |= on_path | {index}
    return selected


def _constant_tensors(graph, initializers, producer) -> set[str]:
    constant = set(initializers) - {i.name for i in graph.input}
    for node in graph.node:  # topological order: a node of constants only is a constant
        if node.input and all((not t) or t in constant for t in node.input):
            constant.update(o for o in node.output if o)
    return constant


def _computes_constant(node, constant) -> bool:
    return bool(node.output) and all(o in constant for o in node.output if o)


def _ancestors(graph, producer, tensor: str) -> set[int]:
    seen: set[int] = set()
    stack = [tensor]
    while stack:
        t = stack.pop()
        i = producer.get(t)
        if i is None or i in seen:
            continue
        seen.add(i)
        stack.extend(x for x in graph.node[i].input if x)
    return seen


def _descendants(graph, tensor: str) -> set[int]:
    consumers = defaultdict(list)
    for i, n in enumerate(graph.node):
        for t in n.input:
            if t:
                consumers[t].append(i)
    seen: set[int] = set()
    stack = [tensor]
    while stack:
        for i in consumers.get(stack.pop(), []):
            if i not in seen:
                seen.add(i)
                stack.extend(o for o in graph.node[i].output if o)
    return seen


# --- per-node typing plan ----------------------------------------------------------------------------


@dataclass
class _NodePlan:
    kind: str  # "float" (gets a precision), "shape" (reads shapes only), "other" (no float tensors)
    convertible_inputs: list[int] = field(default_factory=list)  # input slots that follow the precision
    convertible_outputs: list[int] = field(default_factory=list)
    float_inputs: list[str] = field(default_factory=list)
    float_outputs: list[str] = field(default_factory=list)
    fixed_reason: str | None = None  # set when the op cannot run in fp16 at all
    fp16: bool = True

    @staticmethod
    def of(node: onnx.NodeProto, opset: int, types: dict[str, int]) -> _NodePlan:
        if node.op_type in SHAPE_ONLY_OPS and node.domain in ("", "ai.onnx"):
            return _NodePlan("shape", fp16=False)
        float_in = [i for i, t in enumerate(node.input) if t and types.get(t) == FLOAT]
        float_out = [i for i, t in enumerate(node.output) if t and types.get(t) == FLOAT]
        if not float_in and not float_out:
            return _NodePlan("other", fp16=False)
        plan = _NodePlan("float", float_inputs=[node.input[i] for i in float_in], float_outputs=[node.output[i] for i in float_out])
        if node.op_type == "Cast" and node.domain in ("", "ai.onnx"):
            plan.convertible_outputs = float_out  # the input is read as it is; 'to' follows the precision
            return plan
        if node.op_type == "ConstantOfShape" and node.domain in ("", "ai.onnx"):
            plan.convertible_outputs = float_out  # the 'value' attribute follows the precision
            return plan
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
        except onnx.defs.SchemaError:
            plan.fixed_reason = "unknown op"
            return plan
        allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}

        def param(formals, i):
            if not formals:
                return None
            f = formals[i] if i < len(formals) else formals[-1]
            if i >= len(formals) and f.option != onnx.defs.OpSchema.FormalParameterOption.Variadic:
                return None
            return f.type_str

        input_params = [param(schema.inputs, i) for i in range(len(node.input))]
        for slots, formals, target in ((float_in, schema.inputs, plan.convertible_inputs), (float_out, schema.outputs, plan.convertible_outputs)):
            for i in slots:
                p = param(formals, i)
                if p in allowed:  # a type variable: follows the node's precision
                    if "tensor(float16)" not in allowed[p]:
                        plan.fixed_reason = "no fp16 in schema"
                    target.append(i)
                # else a fixed type such as Resize's tensor(float) scales: left as it is
        for i in plan.convertible_outputs:
            p = param(schema.outputs, i)
            if p not in input_params:
                plan.fixed_reason = plan.fixed_reason or "output type from attribute"
        if node.op_type == "LayerNormalization":
            # Mean / InvStdDev are typed by stash_type, not by the input type
            plan.convertible_outputs = [i for i in plan.convertible_outputs if i == 0]
        if not plan.convertible_inputs and not plan.convertible_outputs and plan.fixed_reason is None:
            return _NodePlan("other", fp16=False)  # e.g. a Cast from float to int: nothing to decide
        return plan


# --- graph rewrite -----------------------------------------------------------------------------------


def _rewrite(model: onnx.ModelProto, plans: list[_NodePlan], types: dict[str, int], fp16_io: set[str],
             base_dir: Path | None) -> tuple[onnx.ModelProto, int]:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    nodes = list(graph.node)
    initializers = {i.name: i for i in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    shapes = {v.name: v.type.tensor_type for v in list(graph.value_info) + list(graph.input) + list(graph.output)}

    # home type of every float tensor that a node or the graph input defines
    home: dict[str, int] = {}
    for value in graph.input:
        if value.type.tensor_type.elem_type == FLOAT:
            home[value.name] = FLOAT16 if value.name in fp16_io else FLOAT
    for node, plan in zip(nodes, plans):
        if plan.kind != "float":
            continue
        for i in plan.convertible_outputs:
            home[node.output[i]] = FLOAT16 if plan.fp16 else FLOAT
        if plan.fp16 and node.op_type == "Cast" and plan.convertible_outputs:
            _set_attr(node, "to", FLOAT16)
        if plan.fp16 and node.op_type == "ConstantOfShape" and plan.convertible_outputs:
            _convert_value_attr(node)
        if plan.fp16 and node.op_type in STASH_TYPE_OPS:
            _set_attr(node, "stash_type", FLOAT)

    # constants read by anything but an fp16 node's convertible slot keep an fp32 version
    fp32_readers = {
        t for node, plan in zip(nodes, plans) for i, t in enumerate(node.input)
        if t and (plan.kind != "float" or not plan.fp16 or i not in plan.convertible_inputs)
    }

    # what each consumer needs
    constant_needs: dict[str, set[int]] = defaultdict(set)
    cast_needed: dict[tuple[str, int], str] = {}
    renames: dict[tuple[int, int], str] = {}
    for index, (node, plan) in enumerate(zip(nodes, plans)):
        if plan.kind != "float":
            continue
        want = FLOAT16 if plan.fp16 else FLOAT
        for i in plan.convertible_inputs:
            name = node.input[i]
            if name in initializers and name not in graph_inputs:
                constant_needs[name].add(want)
                if want == FLOAT16:
                    renames[(index, i)] = f"{name}__fp16" if name in fp32_readers else name
            elif home.get(name, FLOAT) != want:
                renames[(index, i)] = cast_needed.setdefault((name, want), _cast_name(name, want))

    # constants: convert in place when only fp16 consumers read them, else add an fp16 copy
    for name, needs in constant_needs.items():
        if FLOAT16 not in needs:
            continue
        tensor = initializers[name]
        half = numpy_helper.from_array(numpy_helper.to_array(tensor, _dir(base_dir)).astype(np.float16), name)
        if name not in fp32_readers:
            tensor.CopyFrom(half)
        else:
            half.name = f"{name}__fp16"
            graph.initializer.append(half)
    for (index, i), new in renames.items():
        nodes[index].input[i] = new

    # graph outputs whose producer computes in the other precision: rename and cast
    output_casts = []
    producers = {o: (k, n) for k, n in enumerate(nodes) for o in n.output}
    for value in graph.output:
        if value.type.tensor_type.elem_type != FLOAT:
            continue
        want = FLOAT16 if value.name in fp16_io else FLOAT
        have = home.get(value.name, FLOAT)
        if have == want:
            continue
        internal = f"{value.name}__{'fp16' if have == FLOAT16 else 'fp32'}"
        if value.name not in producers:
            raise ValueError(f"graph output {value.name} is not produced by a node; cannot change its type")
        k, producer = producers[value.name]
        producer.output[list(producer.output).index(value.name)] = internal
        for n in nodes:
            for j, t in enumerate(n.input):
                if t == value.name:
                    n.input[j] = internal
        for (src, tgt), cast in list(cast_needed.items()):
            if src == value.name:
                del cast_needed[(src, tgt)]
                cast_needed[(internal, tgt)] = cast
        home[internal] = have
        shapes[internal] = shapes[value.name]
        output_casts.append((k, helper.make_node("Cast", [internal], [value.name], to=want, name=f"{value.name}__cast_out")))

    # Casts for dynamic tensors, placed right after their producer (graph inputs: first)
    cast_nodes: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for (src, want), name in cast_needed.items():
        cast_nodes[src].append(helper.make_node("Cast", [src], [name], to=want, name=f"{name}__node"))
    ordered = [c for t in graph.input for c in cast_nodes.get(t.name, [])]
    tail = defaultdict(list)
    for k, c in output_casts:
        tail[k].append(c)
    for k, node in enumerate(nodes):
        ordered.append(node)
        for o in node.output:
            ordered.extend(cast_nodes.get(o, []))
        ordered.extend(tail.get(k, []))
    _replace_nodes(graph, ordered)

    # types: graph I/O, then value_info for every intermediate tensor
    for value in graph.input:
        if value.name in fp16_io:
            value.type.tensor_type.elem_type = FLOAT16
    for value in graph.output:
        if value.name in fp16_io:
            value.type.tensor_type.elem_type = FLOAT16
    io_names = {v.name for v in list(graph.input) + list(graph.output)}
    final: dict[str, int] = {}
    for name, t in home.items():
        final[name] = t
    for (src, want), name in cast_needed.items():
        final[name] = want
    infos = {v.name: v for v in graph.value_info}
    for name, elem in final.items():
        if name in io_names:
            continue
        if name in infos:
            infos[name].type.tensor_type.elem_type = elem
        else:
            base = shapes.get(name) or shapes.get(_cast_source(name, cast_needed))
            vi = helper.make_tensor_value_info(name, elem, None)
            if base is not None and base.HasField("shape"):
                vi.type.tensor_type.shape.CopyFrom(base.shape)
            graph.value_info.append(vi)
            infos[name] = vi
    for tensor in graph.initializer:  # the exporter also declares initializers in value_info
        if tensor.name in infos:
            infos[tensor.name].type.tensor_type.elem_type = tensor.data_type
    for name, t in types.items():  # anything not float keeps the exporter's type
        if name in infos and name not in final and infos[name].type.tensor_type.elem_type == 0:
            infos[name].type.tensor_type.elem_type = t
    return out, len(cast_needed) + len(output_casts)


def _cast_name(name: str, want: int) -> str:
    return f"{name}__to_{'fp16' if want == FLOAT16 else 'fp32'}"


def _cast_source(name: str, cast_needed) -> str | None:
    for (src, _), cast in cast_needed.items():
        if cast == name:
            return src
    return None


def _set_attr(node: onnx.NodeProto, name: str, value: int) -> None:
    for a in node.attribute:
        if a.name == name:
            a.i = value
            return
    node.attribute.append(helper.make_attribute(name, value))


def _convert_value_attr(node: onnx.NodeProto) -> None:
    for a in node.attribute:
        if a.name == "value":
            array = numpy_helper.to_array(a.t).astype(np.float16)
            a.t.CopyFrom(numpy_helper.from_array(array, a.t.name))
            return
    node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float16))))


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    types.update({i.name: i.data_type for i in graph.initializer})
    missing = [o for n in graph.node for o in n.output if o and not types.get(o)]
    if missing:
        inferred = onnx.shape_inference.infer_shapes(model)
        for v in inferred.graph.value_info:
            if not types.get(v.name) and v.type.tensor_type.elem_type:
                types[v.name] = v.type.tensor_type.elem_type
        still = [o for o in missing if not types.get(o)]
        if still:
            raise ValueError(f"tensors without a type (export with value_info): {still[:5]}")
    return types


def _with_constants_as_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` where float Constant nodes of the main graph are initializers, so every
    float constant is handled in one place."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    keep = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1 and node.attribute[0].name == "value" and node.attribute[0].t.data_type == FLOAT:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            keep.append(node)
    if len(keep) != len(graph.node):
        _replace_nodes(graph, keep)
    return copy


def _replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Set the graph's node list (copies first: the list may hold the graph's own elements)."""
    copies = []
    for node in nodes:
        c = onnx.NodeProto()
        c.CopyFrom(node)
        copies.append(c)
    del graph.node[:]
    graph.node.extend(copies)
