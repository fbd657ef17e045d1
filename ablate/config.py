"""The root run configuration and its strict loader.

Order of precedence, lowest first: dataclass defaults < YAML < `--set key=value` overrides.
Unknown keys and wrong types are errors that name the key path and the valid choices.
"""

from __future__ import annotations

import dataclasses
import functools
import reprlib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from ablate.data_config import DataConfig
from ablate.train_config import OptimConfig, TrainConfig
from model import GPTConfig

MAX_FILE_BYTES = 1_000_000  # a study or run config is a few kB; anything larger is a mistake
MAX_MESSAGE_CHARS = 2000  # an error message is read, not scrolled
MAX_YAML_NODES = 100_000  # values after expanding YAML aliases (an alias bomb expands exponentially)
_BRIEF = reprlib.Repr()
_BRIEF.maxstring = _BRIEF.maxother = 80
_BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxdict = _BRIEF.maxset = 6
_BRIEF.maxlevel = 3


def brief(value: Any) -> str:
    """repr() cut to a line: error messages never echo unbounded input."""
    return _BRIEF.repr(value)


class ConfigError(ValueError):
    """A user mistake in a configuration: `key` is the dotted key path, `message` says how to fix it."""

    def __init__(self, key: str, message: str, source: str | None = None):
        message = message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 3] + "..."
        self.key, self.message, self.source = key, message, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {message}" if key else f"{where}{message}")


@dataclass(kw_only=True)
class RunConfig:
    """One trial: model, data, optimiser, loop, and the two seeds (init and data order)."""

    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0  # model initialisation
    data_seed: int | None = None  # data order; None: the same as seed

    @property
    def resolved_data_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping, strictly: unknown keys and bad types raise ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError(path or cls.__name__, f"expected a mapping of keys, got {type(data).__name__}")
    hints, names = _schema(cls)
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise ConfigError(key_path, f"unknown key; valid keys here: {', '.join(names)}")
        _check_scalars(hints[key], value, key_path)
        kwargs[key] = _coerce(hints[key], value, key_path)
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise ConfigError(_field_path(cls, names, path, str(err)), str(err)) from None


def _field_path(cls: type, names: list[str], path: str, message: str) -> str:
    """The key path of a dataclass's check: its section, plus the field its message starts with."""
    first = message.split(maxsplit=1)[0] if message.strip() else ""
    field_name = first.removeprefix(cls.__name__ + ".").split("=")[0].rstrip(":")
    section = path or cls.__name__
    return f"{path}.{field_name}" if path and field_name in names else section


def _coerce(tp: Any, value: Any, key_path: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key_path)
    try:
        return _adapter(tp).validate_python(value)
    except ValidationError:
        raise ConfigError(key_path, f"expected {_type_name(tp)}, got {brief(value)}") from None


@functools.cache
def _schema(cls: type) -> tuple[dict[str, Any], list[str]]:
    """A dataclass's resolved type hints and init field names (resolving them is the slow part)."""
    return typing.get_type_hints(cls), [f.name for f in dataclasses.fields(cls) if f.init]


@functools.cache
def _adapter(tp: Any) -> TypeAdapter:
    return TypeAdapter(tp)  # building one costs far more than validating with it (README, Layout)


def _check_scalars(tp: Any, value: Any, key_path: str) -> None:
    """No silent coercion of true/false to a number (text that reads as a number is accepted: YAML reads
    1e-4 as text)."""
    if dataclasses.is_dataclass(tp):
        return
    if isinstance(value, bool) and not _admits(tp, bool):
        raise ConfigError(key_path, f"expected {_type_name(tp)}, got {str(value).lower()} (true/false)")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        items = [a for a in args if a is not type(None)]
        if len(items) == 1:
            _check_scalars(items[0], value, key_path)
    elif origin in (tuple, list) and isinstance(value, list | tuple):
        element_types = [a for a in args if a is not Ellipsis]
        for i, item in enumerate(value):
            element = element_types[min(i, len(element_types) - 1)] if element_types else Any
            _check_scalars(element, item, f"{key_path}[{i}]")


def _admits(tp: Any, kind: type) -> bool:
    """Whether type hint `tp` accepts values of `kind` as they are."""
    if tp is Any or tp is kind:
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_admits(a, kind) for a in args)
    if origin is typing.Literal:
        return any(isinstance(a, kind) for a in args)
    return False


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set tree[a][b][c] = value for dotted 'a.b.c', creating mappings on the way."""
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(dotted, f"{part!r} is a value, not a section")
        node = child
    node[leaf] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply `key.path=value` overrides (values parsed as YAML scalars) to a config mapping."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(item, "an override must look like key.path=value, e.g. model.metric=rbf")
        try:
            value = parse_yaml(raw)
        except (yaml.YAMLError, ValueError) as err:
            raise ConfigError(key.strip(), f"cannot read the value {brief(raw)}: {err}") from None
        set_dotted(tree, key.strip(), value)
    return tree


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                line = seen[key].start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {brief(key)} is given twice in one mapping (first on line {line}); "
                    "keep one (YAML would silently drop the first)",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many values `node` stands for once every alias is expanded (linear in the document)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a recursive alias counts once
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[id(node)] = size = min(size, MAX_YAML_NODES + 1)
    return size


def parse_yaml(text: str) -> Any:
    """Parse one YAML document strictly: no duplicate keys, a bounded size after expanding aliases."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise ValueError(
                f"expands to more than {MAX_YAML_NODES:,} values (YAML aliases repeated over and over?)"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_text(path: Path) -> str:
    """A config file's text (UTF-8, bounded size); any problem is a ConfigError naming the file."""
    source = str(path)
    try:
        size = Path(path).stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError("", f"{size:,} bytes; a config file is at most {MAX_FILE_BYTES:,}", source)
        return Path(path).read_bytes().decode("utf-8-sig")
    except OSError as err:
        raise ConfigError("", f"cannot read {path}: {err.strerror}", source=source) from None
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        message = f"not UTF-8 text: byte 0x{err.object[err.start]:02x} on line {line}; save the file as UTF-8"
        raise ConfigError("", message, source=source) from None


def load_yaml(path: Path) -> dict:
    """Read a YAML mapping; a missing file, bad bytes or bad YAML is a ConfigError naming the file."""
    text = read_text(path)
    try:
        tree = parse_yaml(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError("", f"not valid YAML: {_yaml_error(err)}", source=str(path)) from None
    except ValueError as err:
        raise ConfigError("", str(err), source=str(path)) from None
    except RecursionError:
        raise ConfigError("", "nested too deeply to be a config", source=str(path)) from None
    if not isinstance(tree, dict):
        raise ConfigError("", "the top level must be a mapping of keys", source=str(path))
    return tree


def _yaml_error(err: yaml.YAMLError) -> str:
    """PyYAML's message in one bounded line: where, then what (it would quote the offending text)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    text = " ".join(f"{where}{problem}".split())
    return text if len(text) <= 300 else text[:297] + "..."


def load_run_config(path: Path | None, overrides: list[str] = ()) -> RunConfig:
    """Defaults < YAML file < overrides, validated into a RunConfig."""
    tree = load_yaml(path) if path is not None else {}
    tree = apply_overrides(tree, list(overrides))
    try:
        return from_dict(RunConfig, tree)
    except ConfigError as err:
        err.source = str(path) if path else None
        raise ConfigError(err.key, err.message, err.source) from None


def to_flat_dict(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """A dataclass as {'model.metric': 'rbf', ...} (for tracking params)."""
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            flat.update(to_flat_dict(value, key + "."))
        else:
            flat[key] = value
    return flat
