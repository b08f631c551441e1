"""Build TensorRT engines from a bundle's graphs: ``taming-deploy build``.

Precision lives in the graphs (DESIGN.md): the fp16 graphs are already strongly typed, so the
network is created strongly typed (NetworkDefinitionCreationFlag.STRONGLY_TYPED on 10.x; 11.x has
only strong typing) and no precision flag is set - TensorRT 11 removed BuilderFlag.FP16 and the other
weak-typing flags. The one flag touched is TF32, cleared for --precision fp32 so an fp32 engine
computes in fp32 and its tokens can be compared exactly with ONNX Runtime's.
All engines, engines.json and the timing cache are written to a temporary directory that replaces
BUNDLE/engines only when every engine has been built.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from taming_deploy.engines import cuda, deps
from taming_deploy.engines.engine_manifest import (
    ENGINES_MANIFEST,
    TIMING_CACHE,
    EngineEntry,
    EngineManifest,
    Environment,
    engines_dir,
    environment_difference,
    read_engine_manifest,
    required_graphs,
)
from taming_deploy.engines.profiles import Limits, Profile, graph_profiles, transformer_io_problem
from taming_deploy.bundle import PRECISIONS, Bundle
from taming_deploy.errors import UserError
from taming_deploy.fileutil import atomic_directory

OPT_LEVELS = range(0, 6)  # IBuilderConfig.builder_optimization_level: 0 (fast build) .. 5 (slowest, best)


def reusable_timing_cache(bundle_dir: Path, current: Environment) -> bytes:
    """The timing cache of the previous build, when it was made by this TensorRT on this GPU;
    otherwise empty (a cache from elsewhere holds timings that do not apply here)."""
    directory = engines_dir(bundle_dir)
    path = directory / TIMING_CACHE
    if not path.is_file():
        return b""
    try:
        previous = read_engine_manifest(bundle_dir)
    except UserError:
        return b""
    if environment_difference(previous.environment, current) is not None:
        return b""
    return path.read_bytes()


def check_options(precision: str | None, workspace_gib: float, opt_level: int) -> None:
    if precision is not None and precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not workspace_gib > 0:
        raise UserError(f"--workspace must be > 0 GiB, got {workspace_gib}")
    if opt_level not in OPT_LEVELS:
        raise UserError(f"--opt-level must be 0..5, got {opt_level}")


def network_flags(trt: ModuleType) -> int:
    """STRONGLY_TYPED on 10.x. On 11.x networks are always strongly typed: the enum keeps the flag,
    documented as deprecated and ignored, so it is not set there."""
    if deps.parse_version(trt.__version__)[0] >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


class _Builder:
    """One TensorRT builder, logger and timing cache shared by the engines of one build."""

    def __init__(self, trt: ModuleType, timing_cache: bytes, precision: str, workspace_gib: float, opt_level: int):
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.builder = trt.Builder(self.logger)
        if self.builder is None:
            raise UserError("TensorRT could not create a builder (is the NVIDIA driver working?)")
        self.timing_data = timing_cache
        self.timing_cache: Any = None
        self.precision = precision
        self.workspace_bytes = int(workspace_gib * (1 << 30))
        self.opt_level = opt_level

    def _config(self, profiles: list[Profile]) -> Any:
        trt, config = self.trt, self.builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        config.builder_optimization_level = self.opt_level
        if self.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)
        if self.timing_cache is None:
            self.timing_cache = config.create_timing_cache(self.timing_data)
        if not config.set_timing_cache(self.timing_cache, False):
            # an unusable previous cache (other version or device): start an empty one
            self.timing_cache = config.create_timing_cache(b"")
            if not config.set_timing_cache(self.timing_cache, False):
                raise UserError("TensorRT refused a fresh timing cache")
        for profile in profiles:
            trt_profile = self.builder.create_optimization_profile()
            for name, rng in profile.shapes.items():
                trt_profile.set_shape(name, rng.min, rng.opt, rng.max)
            if config.add_optimization_profile(trt_profile) < 0:
                raise UserError(f"TensorRT rejected the optimisation profile {profile.to_dict()}")
        return config

    def build(self, graph_path: Path, profiles: list[Profile]) -> bytes:
        """parse_from_file, not parse(bytes): only the file's path lets the parser find the graph's
        external-data file (TensorRT resolves its location relative to the model path)."""
        trt = self.trt
        network = self.builder.create_network(network_flags(trt))
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(graph_path)):
            errors = "; ".join(" ".join(str(parser.get_error(i)).split()) for i in range(parser.num_errors))
            raise UserError(f"{graph_path}: TensorRT {trt.__version__}'s ONNX parser rejected the graph: {errors}")
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            if tensor.is_shape_tensor:
                # the runtime binds every input in device memory; a shape-tensor input would need host memory
                raise UserError(
                    f"{graph_path}: input {tensor.name!r} is used as a shape tensor by TensorRT; the graph "
                    "must use it only as data (export the bundle again with a current taming-deploy)"
                )
        plan = self.builder.build_serialized_network(network, self._config(profiles))
        if plan is None:
            raise UserError(f"{graph_path}: TensorRT could not build an engine (its log above says why)")
        return bytes(plan)

    def serialized_timing_cache(self) -> bytes:
        return bytes(self.timing_cache.serialize()) if self.timing_cache is not None else b""


def default_precision(bundle: Bundle) -> str:
    """fp16 when the bundle has fp16 graphs, else fp32 (the embedded model ships fp32 graphs only)."""
    return "fp16" if required_graphs(bundle.manifest, "fp16") else "fp32"


def parser_input(bundle: Bundle, name: str, precision: str, scratch: Path, log: Callable[[str], None]) -> Path:
    """The graph file TensorRT parses: the bundle's own, or for int8-weight storage a copy in
    ``scratch`` (same file name) whose weights are dequantized to fp32 (engines/dequantize.py)."""
    graph, path = bundle.graph(name, precision), bundle.graph_path(name, precision)
    if graph.weight_storage == "float":
        return path
    try:
        import onnx

        from taming_deploy.engines.dequantize import fold_weight_dequantization
        from taming_deploy.export.graph_files import save_graph
    except ImportError:
        raise UserError(f"{bundle.path}: its graphs store weights as int8; building engines from them needs the "
                        "onnx package to turn them into fp32 weights: pip install 'taming-deploy[gpu]'") from None
    model, folded = fold_weight_dequantization(onnx.load(str(path)))
    target = scratch / graph.file
    save_graph(model, target)  # fp32 weights are 4x the int8 ones: past the threshold they go to external data
    log(f"{graph.file}: {folded} int8 weights dequantized to fp32 for TensorRT")
    return target


def build_engines(
    bundle_dir: Path,
    precision: str | None = None,
    max_size: tuple[int, int] = (1024, 1024),
    max_batch: int = 4,
    workspace_gib: float = 4.0,
    opt_level: int = 3,
    log: Callable[[str], None] = lambda message: None,
    force: bool = False,
) -> Path:
    """Build one engine per graph of ``precision`` (None: :func:`default_precision`) into the bundle's
    engines folder (``engine_manifest.engines_dir``: BUNDLE/engines, or the user's cache for the
    embedded model) and return that directory. int8-weight graphs are built with their weights
    dequantized to fp32 (:func:`parser_input`).

    ``max_size`` = (width, height) in pixels and ``max_batch`` bound the shapes the engines accept.
    Raises UserError (one line) for a missing TensorRT/cuda-python/GPU, a bad option or bundle, or
    a graph TensorRT cannot parse or build. ``force``: an engines folder holding other files is written
    into, keeping them.
    """
    bundle_dir = Path(bundle_dir)
    check_options(precision, workspace_gib, opt_level)
    bundle = Bundle(bundle_dir)
    limits = Limits((int(max_size[0]), int(max_size[1])), int(max_batch))
    limits.validate(bundle.spec)
    if precision is None:
        precision = default_precision(bundle)
        log(f"precision {precision}" + ("" if precision == "fp16" else ": the bundle has no fp16 graphs"))
    names = required_graphs(bundle.manifest, precision)
    if not names:
        raise UserError(f"{bundle_dir}: the bundle has no {precision} graphs; export them or choose another --precision")
    if "transformer" in names and (reason := transformer_io_problem(bundle.graph("transformer", precision), bundle.spec)):
        # checked before any build: the runtime could not drive such an engine (a bundle of an older export)
        raise UserError(f"{bundle_dir}: {reason}; export the bundle again with this taming-deploy")
    if unknown := {bundle.graph(name, precision).weight_storage for name in names} - {"float", "int8"}:
        raise UserError(f"{bundle_dir}: unknown weight storage {', '.join(sorted(unknown))}; export the bundle again")
    trt = deps.tensorrt()
    gpu = cuda.device_info()
    environment = Environment(trt.__version__, gpu.name, gpu.compute_capability)
    builder = _Builder(trt, reusable_timing_cache(bundle_dir, environment), precision, workspace_gib, opt_level)
    target = engines_dir(bundle_dir)
    entries: dict[str, EngineEntry] = {}
    with atomic_directory(target, force=force) as tmp, tempfile.TemporaryDirectory(prefix="taming-deploy-build-") as scratch:
        for name in names:
            graph = bundle.graph(name, precision)
            profiles = graph_profiles(name, graph, bundle.spec, limits)
            log(f"building the {name} engine from {graph.file} (TensorRT {trt.__version__}, {gpu.name})")
            plan = builder.build(parser_input(bundle, name, precision, Path(scratch), log), profiles)
            plan_file = f"{name}.plan"
            (tmp / plan_file).write_bytes(plan)
            entries[name] = EngineEntry(plan_file, hashlib.sha256(plan).hexdigest(), graph.file, graph.sha256, tuple(profiles))
        (tmp / TIMING_CACHE).write_bytes(builder.serialized_timing_cache())
        manifest = EngineManifest(
            environment=environment,
            precision=precision,
            engines=entries,
            build={
                "max_size": list(limits.max_size),
                "max_batch": limits.max_batch,
                "workspace_gib": workspace_gib,
                "opt_level": opt_level,
                "tf32": precision != "fp32",
            },
        )
        (tmp / ENGINES_MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=1) + "\n")
    log(f"wrote {len(entries)} engines to {target}")
    return target
