"""Typed job configs: a frozen dataclass, loaded from YAML, overridden by `key=value` flags.

Every job has one config class. `load_config(Config, "configs/job/name.yaml", ["k=v", ...])`
reads the file, applies the overrides (values parsed as YAML scalars, so `epochs=10` is an int
and `address=null` is None, but dates stay strings: `run_id=2026-11-21` is the run id a nightly
job passes, not a date; nested fields as `schedule.lr=0.05`), rejects unknown keys and wrong
types with the key's name in the message, and builds the dataclass, whose `__post_init__` does the
job-specific validation. The resolved config is saved next to the outputs with `config_to_yaml`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = ["ConfigError", "load_config", "config_from_dict", "config_to_dict", "config_to_yaml", "parse_overrides"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the job's config class."""


class _ConfigLoader(yaml.SafeLoader):
    """Safe YAML without implicit timestamps: no config field is a date, while run ids and
    names often look like one (`run_id=$(date -u +%F)`), and must stay the strings they are."""


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506  (a SafeLoader subclass)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """['a=1', 'b.c=x'] -> {'a': 1, 'b': {'c': 'x'}}; values are YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} sets a field inside {part!r}, which is not a section")
        node[leaf] = _load_yaml(raw) if raw != "" else ""
    return tree


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{where}: got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
        return config_from_dict(annotation, value, prefix=f"{where}.")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if (isinstance(value, bool) and annotation is not bool) or not isinstance(value, annotation):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
        return value
    return value


def config_from_dict(cls: type[T], values: Mapping[str, Any], prefix: str = "") -> T:
    """Build `cls` from a mapping, checking keys and types.

    Raises:
        ConfigError: unknown key, wrong type, or the dataclass's own validation failed.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + u for u in unknown)}; valid keys: {', '.join(prefix + k for k in fields)}")
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{prefix or 'config'}: {error}") from error


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load `cls` from an optional YAML file plus `key=value` overrides.

    Args:
        cls: the job's frozen config dataclass.
        path: YAML mapping, or None for the class defaults.
        overrides: strings like "batch_size=64" or "schedule.lr=0.05".

    Returns:
        The validated config.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type, invalid value.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = _load_yaml(Path(path).read_text())
        except OSError as error:
            raise ConfigError(f"cannot read config file {path}: {error.strerror}") from error
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping, got {type(loaded).__name__}")
        values = loaded or {}
    return config_from_dict(cls, _merge(values, parse_overrides(overrides)))


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain dict (tuples as lists) for YAML/JSON output."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def config_to_yaml(config: Any) -> str:
    """The resolved config as YAML, in field order."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
