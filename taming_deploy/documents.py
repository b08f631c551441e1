"""Reading the documents taming-deploy loads (JSON manifests and configs, YAML, safetensors headers) with
one schema check each: bounded size, UTF-8, a mapping at the top, and typed, ranged fields.

Every failure is a UserError of one bounded line naming the file and the field
(``manifest.json: model.block_size: expected an integer in 1..65536, got 1000000000000``).
"""
from __future__ import annotations

import json
import math
import os
import stat
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from taming_deploy.errors import UserError

MAX_DOCUMENT_BYTES = 16 << 20  # manifests and configs are kilobytes; a bigger file is not one of ours
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors library's own limit
MAX_SHOWN = 60  # characters of a bad value shown in a message
T = TypeVar("T")


def shown(value: Any) -> str:
    """A value for a message, cut to MAX_SHOWN characters."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def first_line(text: object, limit: int = 200) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


class Doc:
    """A mapping from a document, with the file and the field path for messages."""

    def __init__(self, data: Any, source: str, where: str = ""):
        if not isinstance(data, dict):
            raise UserError(f"{source}: {where or 'the document'}: expected a mapping, got {type(data).__name__} {shown(data)}")
        self.data, self.source, self.where = data, source, where

    def field(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, expected: str, value: Any) -> UserError:
        return UserError(f"{self.source}: {self.field(key)}: expected {expected}, got {shown(value)}")

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def keys(self) -> list[str]:
        return [str(k) for k in self.data]

    def raw(self, key: str, default: Any = ...) -> Any:
        if key not in self.data:
            if default is ...:
                raise UserError(f"{self.source}: {self.field(key)}: missing")
            return default
        return self.data[key]

    def int(self, key: str, low: int = 0, high: int = 1 << 31, default: Any = ...) -> int:
        value = self.raw(key, default)
        if value is default and default is not ...:
            return value
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(key, f"an integer in {low}..{high}", value)
        return value

    def float(self, key: str, low: float = -math.inf, high: float = math.inf, default: Any = ...) -> float:
        value = self.raw(key, default)
        if value is default and default is not ...:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and low <= value <= high):
            raise self.fail(key, f"a finite number in [{low}, {high}]", value)
        return float(value)

    def str(self, key: str, choices: tuple[str, ...] | None = None, default: Any = ..., max_length: int = 4096) -> str:
        value = self.raw(key, default)
        if value is default and default is not ...:
            return value
        if not isinstance(value, str) or len(value) > max_length:
            raise self.fail(key, "a string", value)
        if choices is not None and value not in choices:
            raise self.fail(key, "one of " + ", ".join(choices), value)
        return value

    def bool(self, key: str, default: Any = ...) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, "true or false", value)
        return value

    def doc(self, key: str, default: Any = ...) -> "Doc":
        value = self.raw(key, {} if default is not ... else default)
        return Doc(value, self.source, self.field(key))

    def list(self, key: str, item: Callable[[Any, str], T], max_items: int = 1 << 16, default: Any = ...,
             length: int | None = None) -> list[T]:
        """A list whose items ``item(value, field)`` checks and converts."""
        value = self.raw(key, default)
        if value is default and default is not ...:
            return value
        return item_list(item, self.source, max_items, length)(value, self.field(key))

    def items(self, key: str) -> Iterator[tuple[str, "Doc"]]:
        """(name, sub-document) for a mapping of mappings."""
        sub = self.doc(key)
        for name, value in sub.data.items():
            yield str(name), Doc(value, self.source, sub.field(str(name)))


def item_list(item: Callable[[Any, str], T], source: str, max_items: int = 1 << 16,
              length: int | None = None) -> Callable[[Any, str], list[T]]:
    def check(value: Any, where: str) -> list[T]:
        if not isinstance(value, list) or len(value) > max_items or (length is not None and len(value) != length):
            expected = "a list" + (f" of {length} items" if length is not None else f" of at most {max_items} items")
            raise UserError(f"{source}: {where}: expected {expected}, got {shown(value)}")
        return [item(v, f"{where}[{k}]") for k, v in enumerate(value)]
    return check


def item_int(low: int = 0, high: int = 1 << 31, source: str = "") -> Callable[[Any, str], int]:
    def check(value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise UserError(f"{source}: {where}: expected an integer in {low}..{high}, got {shown(value)}")
        return value
    return check


def item_str(source: str = "", max_length: int = 4096) -> Callable[[Any, str], str]:
    def check(value: Any, where: str) -> str:
        if not isinstance(value, str) or len(value) > max_length:
            raise UserError(f"{source}: {where}: expected a string, got {shown(value)}")
        return value
    return check


def check_regular_file(path: Path, what: str) -> os.stat_result:
    """``path`` (links followed) is a regular file: opening a FIFO blocks, and /dev/zero never ends."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; the {what} must be a file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the {what} ({first_line(exc.strerror or exc)})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file (a device, pipe or socket)"
        raise UserError(f"{path}: {kind}; the {what} must be a file")
    return info


def read_text(path: Path, what: str, max_bytes: int = MAX_DOCUMENT_BYTES) -> str:
    """A document's text: bounded in size and valid UTF-8."""
    path = Path(path)
    info = check_regular_file(path, what)
    try:
        if info.st_size > max_bytes:
            raise UserError(f"{path}: {info.st_size} bytes is too large for a {what} (at most {max_bytes})")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # bounded even if the file grows meanwhile
        if len(data) > max_bytes:
            raise UserError(f"{path}: the {what} grew past {max_bytes} bytes while it was read")
    except OSError as exc:
        raise UserError(f"{path}: cannot read the {what} ({first_line(exc.strerror or exc)})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: the {what} is not UTF-8 text (byte {exc.start})") from None


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's members, refusing a key given twice (json.loads would keep the last one silently)."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise ValueError(f"the key {shown(key)} appears more than once in one object")
        data[key] = value
    return data


def parse_json(text: str, source: str, what: str) -> Doc:
    try:
        data = json.loads(text, object_pairs_hook=unique_keys)
    except (ValueError, RecursionError) as exc:
        raise UserError(f"{source}: the {what} is not valid JSON ({first_line(exc, 120)})") from None
    return Doc(data, source)


def read_json(path: Path, what: str) -> Doc:
    return parse_json(read_text(path, what), str(path), what)


MAX_YAML_NODES = 1_000_000  # after expanding aliases; a project.yaml has a few hundred


def expanded_nodes(data: Any, memo: dict[int, int], open_ids: set[int]) -> int:
    """How many nodes ``data`` has with every alias expanded (shared nodes counted each time they are used,
    computed once each); a structure that contains itself is refused."""
    if not isinstance(data, (dict, list)):
        return 1
    key = id(data)
    if key in memo:
        return memo[key]
    if key in open_ids:
        raise UserError("the document refers to itself through a YAML alias")
    open_ids.add(key)
    children = [*data.keys(), *data.values()] if isinstance(data, dict) else data
    total = 1
    for child in children:
        total += expanded_nodes(child, memo, open_ids)
        if total > MAX_YAML_NODES:
            break
    open_ids.discard(key)
    memo[key] = total
    return total


def read_yaml(path: Path, what: str) -> Doc:
    """Safe YAML whose aliases expand to at most MAX_YAML_NODES nodes: a few lines of nested aliases
    (an alias bomb) would otherwise expand into gigabytes when the document is walked or copied.
    (yaml is a training-side dependency, imported here.)"""
    import yaml

    text = read_text(path, what)
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        raise UserError(f"{path}: the {what} is not valid YAML ({first_line(exc, 160)})") from None
    try:
        nodes = expanded_nodes(data, {}, set())
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    except RecursionError:
        raise UserError(f"{path}: the {what} is nested too deeply") from None
    if nodes > MAX_YAML_NODES:
        raise UserError(f"{path}: the {what}'s YAML aliases expand to more than {MAX_YAML_NODES:,} values (an alias bomb?)")
    return Doc({} if data is None else data, str(path))


SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                      "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The header of a safetensors file, checked: bounded length, UTF-8 JSON mapping, known dtypes,
    non-negative shapes, and data offsets that fit the file and the shape."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise UserError(f"{path}: not a safetensors file ({size} bytes)")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_SAFETENSORS_HEADER, size - 8):
                raise UserError(f"{path}: not a safetensors file (header length {length} for a {size}-byte file)")
            raw = f.read(length)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({first_line(exc.strerror or exc)})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a safetensors file (its header is not UTF-8)") from None
    header = parse_json(text, str(path), "safetensors header")
    data_bytes = size - 8 - length
    tensors: dict[str, dict] = {}
    for name, entry in header.data.items():
        if name == "__metadata__":
            continue
        tensor = Doc(entry, str(path), name)
        dtype = tensor.str("dtype", tuple(SAFETENSORS_DTYPES))
        shape = tensor.list("shape", item_int(0, 1 << 40, str(path)), max_items=16)
        begin, end = tensor.list("data_offsets", item_int(0, data_bytes, str(path)), length=2)
        if end - begin != math.prod(shape) * SAFETENSORS_DTYPES[dtype]:
            raise UserError(f"{path}: {name}: data_offsets {begin}..{end} do not hold a {dtype} tensor of shape {shape}")
        tensors[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
    return tensors
