"""Every TensorRT name engines/ uses, in one list, and the two checks that hold it to the truth.

``USED`` maps a TensorRT class (``""``: the module itself) to the members engines/ touches: a
``Call`` (a method, a constructor as ``__init__`` or a module function, called with exactly these
parameters, by position or by keyword), a ``Property`` (read, or also written) or an ``EnumMember``.
``Class`` marks a module attribute engines/ names directly (``trt.Builder``).

- ``problems_in(trt)`` checks the list against a real ``tensorrt`` module: every class, member and
  enum member exists, and every parameter list fits one of pybind11's signatures (the ``__doc__``
  lines ``name(self: C, a: T, b: T = default) -> R``). tests/test_tensorrt_bindings.py runs it on
  the real bindings wheels of TensorRT 10.x and 11.x.
- ``Restricted`` wraps the stand-in of tests/test_engines_fake.py: engines/ sees only the names of
  this list there and must call them with these parameters, so the stand-in cannot lend engines/ a
  name or an argument list that the real module lacks.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class Call:
    params: tuple[str, ...] = ()
    returns: str | None = None  # the TensorRT class of the result, where engines/ uses the result's members


@dataclass(frozen=True)
class Property:
    settable: bool = False


@dataclass(frozen=True)
class EnumMember:
    pass


@dataclass(frozen=True)
class Class:
    pass


Member = Call | Property | EnumMember | Class

USED: dict[str, dict[str, Member]] = {
    "": {
        "__version__": Property(),
        "nptype": Call(("trt_type",)),
        "Logger": Class(), "Builder": Class(), "OnnxParser": Class(), "Runtime": Class(),
        "NetworkDefinitionCreationFlag": Class(), "MemoryPoolType": Class(), "BuilderFlag": Class(), "TensorIOMode": Class(),
    },
    "Logger": {"__init__": Call(("min_severity",)), "WARNING": EnumMember()},
    "NetworkDefinitionCreationFlag": {"STRONGLY_TYPED": EnumMember()},
    "MemoryPoolType": {"WORKSPACE": EnumMember()},
    "BuilderFlag": {"TF32": EnumMember()},
    "TensorIOMode": {"INPUT": EnumMember()},
    "Builder": {
        "__init__": Call(("logger",)),
        "create_network": Call(("flags",), "INetworkDefinition"),
        "create_builder_config": Call((), "IBuilderConfig"),
        "create_optimization_profile": Call((), "IOptimizationProfile"),
        "build_serialized_network": Call(("network", "config")),
    },
    "IBuilderConfig": {
        "set_memory_pool_limit": Call(("pool", "pool_size")),
        "builder_optimization_level": Property(settable=True),
        "clear_flag": Call(("flag",)),
        "create_timing_cache": Call(("serialized_timing_cache",), "ITimingCache"),
        "set_timing_cache": Call(("cache", "ignore_mismatch")),
        "add_optimization_profile": Call(("profile",)),
    },
    "ITimingCache": {"serialize": Call(())},
    "IOptimizationProfile": {"set_shape": Call(("input", "min", "opt", "max"))},
    "INetworkDefinition": {"num_inputs": Property(), "get_input": Call(("index",), "ITensor")},
    "ITensor": {"name": Property(), "is_shape_tensor": Property()},
    "OnnxParser": {
        "__init__": Call(("network", "logger")),
        "parse_from_file": Call(("model",)),
        "num_errors": Property(),
        "get_error": Call(("index",)),
    },
    "Runtime": {"__init__": Call(("logger",)), "deserialize_cuda_engine": Call(("serialized_engine",), "ICudaEngine")},
    "ICudaEngine": {
        "num_io_tensors": Property(),
        "get_tensor_name": Call(("index",)),
        "get_tensor_mode": Call(("name",)),
        "get_tensor_dtype": Call(("name",)),
        "is_shape_inference_io": Call(("name",)),
        "num_optimization_profiles": Property(),
        "create_execution_context": Call((), "IExecutionContext"),
    },
    "IExecutionContext": {
        "set_optimization_profile_async": Call(("profile_index", "stream_handle")),
        "set_input_shape": Call(("name", "shape")),
        "get_tensor_shape": Call(("name",)),
        "set_tensor_address": Call(("name", "memory")),
        "execute_async_v3": Call(("stream_handle",)),
    },
}


# -- against the real module -----------------------------------------------------------------------


def split_top_level(text: str) -> list[str]:
    """'a: X[int, str], b: T = <E.V: 0>' -> ['a: X[int, str]', 'b: T = <E.V: 0>'] (commas inside brackets stay)."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "([{<":
            depth += 1
        elif char in ")]}>":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    if "".join(current).strip():
        parts.append("".join(current).strip())
    return parts


def pybind_signatures(function: Any, name: str) -> list[tuple[list[tuple[str, bool]], str]]:
    """Every overload of a pybind11 function from its docstring: ([(parameter, has_default)], return
    type), ``self`` left out."""
    pattern = re.compile(rf"^(?:\d+\. )?{re.escape(name)}\((.*)\) -> (.+)$")
    found = []
    for line in (function.__doc__ or "").splitlines():
        match = pattern.match(line.strip())
        if match is None:
            continue
        params = [(p.split(":")[0].split("=")[0].strip(), " = " in p) for p in split_top_level(match.group(1))]
        found.append(([p for p in params if p[0] != "self"], match.group(2).strip()))
    return found


def python_signature(function: Any) -> list[tuple[list[tuple[str, bool]], str]]:
    params = inspect.signature(function).parameters.values()
    return [([(p.name, p.default is not inspect.Parameter.empty) for p in params], "")]


def call_problem(owner: Any, owner_name: str, name: str, call: Call) -> str | None:
    """Why ``owner.name(*call.params)`` does not fit the real function, or None."""
    function = getattr(owner, name)
    shown = f"{owner_name + '.' if owner_name else ''}{name}"
    signatures = pybind_signatures(function, name)
    if not signatures and inspect.isfunction(function):
        signatures = python_signature(function)
    if not signatures:
        return f"{shown}: no signature found in its docstring"
    for params, returns in signatures:
        names = [p for p, _ in params]
        fits = names[: len(call.params)] == list(call.params) and all(default for _, default in params[len(call.params):])
        if fits and (call.returns is None or returns.split(".")[-1] == call.returns):
            return None
    listed = ", ".join(call.params)
    real = " | ".join(f"({', '.join(p for p, _ in params)}) -> {returns}" for params, returns in signatures)
    expected = f" -> {call.returns}" if call.returns else ""
    return f"{shown}({listed}){expected} fits none of the real signatures {real}"


def member_problem(owner: Any, owner_name: str, name: str, member: Member) -> str | None:
    shown = f"{owner_name + '.' if owner_name else ''}{name}"
    if not hasattr(owner, name):
        return f"{shown} does not exist"
    if isinstance(member, Call):
        return call_problem(owner, owner_name, name, member)
    if isinstance(member, Class):
        return None if isinstance(getattr(owner, name), type) else f"{shown} is not a class"
    if isinstance(member, EnumMember):
        value = getattr(owner, name)
        members = getattr(type(value), "__members__", {})
        return None if members.get(name) is value else f"{shown} is not an enum member"
    if owner_name == "":  # a module attribute (__version__)
        return None
    prop = inspect.getattr_static(owner, name)
    if not isinstance(prop, property):
        return f"{shown} is not a property"
    if member.settable and prop.fset is None:
        return f"{shown} is read-only"
    return None


def problems_in(trt: ModuleType, used: dict[str, dict[str, Member]] = USED) -> list[str]:
    """Every entry of ``used`` that the module ``trt`` lacks or that does not fit its signatures."""
    problems = []
    for class_name, members in used.items():
        if class_name and not isinstance(getattr(trt, class_name, None), type):
            problems.append(f"{class_name}: no such class")
            continue
        owner = getattr(trt, class_name) if class_name else trt
        problems.extend(p for name, member in members.items() if (p := member_problem(owner, class_name, name, member)))
    return problems


# -- around the stand-in ---------------------------------------------------------------------------


class Restricted:
    """A stand-in object seen as the TensorRT class ``kind`` (``""``: the module): only the members
    USED lists for it, calls bound to its parameter names, results of a listed class wrapped in turn.
    ``used`` records each (class, member) engines/ touched."""

    __slots__ = ("_target", "_kind", "_used")

    def __init__(self, target: Any, kind: str, used: set[tuple[str, str]]):
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_kind", kind)
        object.__setattr__(self, "_used", used)

    def _member(self, name: str) -> Member:
        member = USED.get(self._kind, {}).get(name)
        if member is None:
            shown = f"{self._kind}.{name}" if self._kind else f"tensorrt.{name}"
            raise AttributeError(f"{shown} is not in tests/tensorrt_api.py (which lists what the real TensorRT has)")
        self._used.add((self._kind, name))
        return member

    def __getattr__(self, name: str) -> Any:
        member = self._member(name)
        value = getattr(self._target, name)
        if isinstance(member, Class):
            return Restricted(value, name, self._used)
        if isinstance(member, Call):
            return lambda *args, **kwargs: self._call(value, f"{self._kind}.{name}", member, args, kwargs)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        member = self._member(name)
        if not (isinstance(member, Property) and member.settable):
            raise AttributeError(f"{self._kind}.{name} cannot be set")
        setattr(self._target, name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # a class: its constructor
        member = self._member("__init__")
        result = self._call(self._target, f"{self._kind}()", Call(member.params), args, kwargs)  # type: ignore[union-attr]
        return Restricted(result, self._kind, self._used)

    def _call(self, function: Any, shown: str, call: Call, args: tuple, kwargs: dict) -> Any:
        """Call ``function`` as engines/ called it, after checking the call against the listed
        parameters (every one given, once, by position or by its real name)."""
        by_position = dict(zip(call.params, args))
        if len(args) > len(call.params) or set(kwargs) & set(by_position) or set(by_position) | set(kwargs) != set(call.params):
            raise TypeError(f"{shown} called with {len(args)} positional and keywords {sorted(kwargs)}; "
                            f"tests/tensorrt_api.py lists ({', '.join(call.params)})")
        given = {**by_position, **kwargs}
        result = function(*[unwrap(given[p]) for p in call.params])
        return Restricted(result, call.returns, self._used) if call.returns and result is not None else result


def unwrap(value: Any) -> Any:
    """The stand-in object behind a Restricted one (for a test's own checks)."""
    return object.__getattribute__(value, "_target") if isinstance(value, Restricted) else value
