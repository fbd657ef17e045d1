"""The root run configuration and its strict loader.

Order of precedence, lowest first: dataclass defaults < YAML < `--set key=value` overrides.
Unknown keys and wrong types are errors that name the key path and the valid choices.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from ablate.data import DataConfig
from ablate.train_config import OptimConfig, TrainConfig
from model import GPTConfig


class ConfigError(ValueError):
    """A user mistake in a configuration: `key` is the dotted key path, `message` says how to fix it."""

    def __init__(self, key: str, message: str, source: str | None = None):
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
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise ConfigError(key_path, f"unknown key; valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(hints[key], value, key_path)
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise ConfigError(path or cls.__name__, str(err)) from None


def _coerce(tp: Any, value: Any, key_path: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key_path)
    try:
        return TypeAdapter(tp).validate_python(value)
    except ValidationError:
        raise ConfigError(key_path, f"expected {_type_name(tp)}, got {value!r}") from None


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
        set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def load_yaml(path: Path) -> dict:
    """Read a YAML mapping; a missing file or bad YAML is a ConfigError naming the file."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError("", f"cannot read {path}: {err.strerror}", source=str(path)) from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError("", f"not valid YAML: {err}", source=str(path)) from None
    if not isinstance(tree, dict):
        raise ConfigError("", "the top level must be a mapping of keys", source=str(path))
    return tree


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
