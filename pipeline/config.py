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
import difflib
import inspect
import io
import re
import tokenize
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = [
    "ConfigError",
    "ConfigField",
    "config_fields",
    "config_from_dict",
    "config_help",
    "config_to_dict",
    "config_to_yaml",
    "default_config_yaml",
    "load_config",
    "parse_overrides",
]

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
        hints_text = "".join(
            f"; did you mean {prefix + close[0]}?"
            for u in unknown
            if (close := difflib.get_close_matches(str(u), list(fields), n=1, cutoff=0.6))
        )
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + str(u) for u in unknown)}{hints_text} "
            f"(valid keys: {', '.join(prefix + k for k in fields)}; `lplgrad JOB --help` describes them)"
        )
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


# -- describing a config: --help and `lplgrad config show` ----------------------------------------

# Meanings of keys that several jobs share, used where the field itself carries no comment.
COMMON_MEANINGS = {
    "address": "Ray cluster address (auto, ray://HOST:10001); default: RAY_ADDRESS, else a new local Ray",
    "seed": "random seed (initial sets, shuffles, subsets, stochastic acquisition)",
    "storage_options": "fsspec options for every URI, e.g. {endpoint_url: http://HOST:9000}",
    "pool": "URI of the pool (WebDataset shards, local path or s3://...)",
    "labeled": "URI of the labeled pool to train on",
    "holdout": "a labeled pool to report held-out accuracy on",
    "test_pool": "a labeled pool to report test accuracy on",
    "checkpoint": "URI of a training checkpoint directory",
    "model": "model name in the registry (pipeline.models)",
    "out": "output root (local path or s3://...)",
    "epochs": "training epochs",
    "batch_size": "rows per batch",
    "num_workers": "Ray Train workers",
    "cpus_per_worker": "CPUs each training worker reserves",
    "use_gpu": "train on GPUs (one per worker)",
    "gpus": "use GPUs for training and scoring",
    "actors": "scoring actors (each loads the model once)",
    "cpus_per_actor": "CPUs each scoring actor reserves",
    "gpus_per_actor": "GPUs each scoring actor reserves (fractions share a GPU)",
    "strategy": "acquisition strategy (pipeline.acquisition registry name)",
    "k": "samples to select",
    "initial": "size of the random initial labeled set",
    "per_cycle": "samples selected and labeled per cycle",
    "num_classes": "number of classes",
    "in_channels": "image channels the model takes",
    "name": "run name under storage_path (default: a timestamp)",
    "storage_path": "where runs and checkpoints are written",
    "lr": "learning rate",
    "hidden": "hidden width",
    "lossnet_hidden": "LossNet hidden width",
    "incremental": "reuse unchanged shards' results from the previous run",
    "force": "do it even when the policy says it is not due",
    "resume": "continue the run `name` from its last checkpoint",
    "warm_start": "start from this checkpoint's weights",
    "weights": "a local weights file for `model`",
    "max_failures": "worker failures Ray Train recovers from",
    "keep_checkpoints": "checkpoints kept per run",
    "checkpoint_every": "save a checkpoint every N epochs (and at the last)",
    "test_samples": "size of the synthetic test pool",
    "samples": "size of the synthetic pool",
    "probe_epochs": "epochs of the linear probe (LP-FT)",
    "lp_ft_below": "auto: LP-FT below this many labels, FT above",
    "kind": "linear | mlp",
    "tap_layers": "layers LossNet reads (default: the model's own list)",
    "beta": "stochastic acquisition temperature/exponent",
    "norm": "how per-parameter gradient norms combine (pipeline.scoring.NORMS)",
    "strategies": "acquisition strategies to compare",
    "seeds": "one simulated run per seed (and strategy)",
    "proxy_kind": "proxy head: linear | mlp",
    "proxy_epochs": "proxy head training epochs",
    "run_id": "run directory name under out (default: a UTC timestamp)",
}


@dataclasses.dataclass(frozen=True)
class ConfigField:
    """One key of a job config, as `--help` and `config show` describe it.

    Attributes:
        key: Dotted name as an override spells it (`schedule.lr`).
        type: The annotation as written in the dataclass (`int | None`).
        default: The default value as plain YAML data (tuples as lists, a nested dataclass as a dict).
        meaning: One line: the field's metadata["help"], its trailing comment, its docstring
            `Attributes:` entry, or the shared meaning of a common key; "" when none.
        section: Dotted name of the section holding the key ("" for the top level).
    """

    key: str
    type: str
    default: Any
    meaning: str
    section: str = ""


def _comments(cls: type) -> dict[str, str]:
    """field name -> trailing comment on its line in the class source ({} when not readable)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                comments[token.start[0]] = token.string.lstrip("#").strip()
    except (tokenize.TokenError, SyntaxError):
        return {}
    found: dict[str, str] = {}
    for row, line in enumerate(source.splitlines(), start=1):
        match = re.match(r"\s+(\w+)\s*:", line)
        if match and row in comments and match.group(1) not in found:
            found[match.group(1)] = comments[row]
    return found


def _docstring_attributes(cls: type) -> dict[str, str]:
    """field name -> first line of its entry in the class docstring's `Attributes:` section."""
    found: dict[str, str] = {}
    in_section = False
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        if line.strip() == "Attributes:":
            in_section = True
        elif in_section and line and not line.startswith(" "):
            in_section = False
        elif in_section and (match := re.match(r"\s{2,}(\w+)(?: \(.*?\))?:\s*(.*)", line)):
            found[match.group(1)] = match.group(2).strip()
    return found


def _plain_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, (list, tuple)):
        return [list(v) if isinstance(v, tuple) else v for v in value]
    return value


def _section_class(annotation: Any) -> type | None:
    """The dataclass a field holds (`TrainSchedule | None` -> TrainSchedule), else None."""
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(inner) == 1:
            return _section_class(inner[0])
    return None


def config_fields(cls: type, prefix: str = "") -> list[ConfigField]:
    """Every key of a config class in field order, nested sections' keys after their section's line.

    Args:
        cls: A config dataclass.
        prefix: Dotted prefix of nested keys (used when recursing).

    Returns:
        One `ConfigField` per key; a nested dataclass gives one entry for the section itself
        (its default, e.g. null) and one per field inside it, `section` set to its dotted name.
    """
    hints = typing.get_type_hints(cls)
    comments, attributes = _comments(cls), _docstring_attributes(cls)
    described: list[ConfigField] = []
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        meaning = _meaning(
            field.metadata.get("help") or comments.get(field.name) or attributes.get(field.name) or "",
            COMMON_MEANINGS.get(field.name, ""),
        )
        written = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
        described.append(ConfigField(prefix + field.name, written, _plain_default(field), meaning, prefix.rstrip(".")))
        section = _section_class(hints[field.name])
        if section is not None:
            described.extend(config_fields(section, f"{prefix}{field.name}."))
    return described


def _meaning(own: str, common: str) -> str:
    # A comment that only qualifies the key ("per worker", "default: ...") reads after the shared meaning.
    if own and common and re.match(r"(default|per |with |fractional|\.\.\.)", own):
        return f"{common}; {own}"
    return own or common


def _flow(value: Any) -> str:
    """A value as one line of YAML (what a key=value override or a config file would hold)."""
    return (
        yaml.safe_dump(value, default_flow_style=True, width=10_000)
        .strip()
        .removesuffix("\n...")
        .removesuffix("...")
        .strip()
    )


def config_help(cls: type) -> str:
    """The keys of a config class for `--help`: key, type, default and meaning, grouped by section.

    Args:
        cls: A config dataclass.

    Returns:
        Aligned text; a nested section gets its own heading.
    """
    described = config_fields(cls)
    section_keys = {f.section for f in described}
    fields = [f for f in described if f.key not in section_keys]
    widths = [
        max(len(text) for text in column)
        for column in zip(*[(f.key, f.type, _flow(f.default)) for f in fields], ("key", "type", "default"))
    ]
    widths[2] = min(widths[2], 24)  # a long default (a list of strategies) overflows its column

    def row(key: str, kind: str, default: str, meaning: str) -> str:
        return f"  {key.ljust(widths[0])}  {kind.ljust(widths[1])}  {default.ljust(widths[2])}  {meaning}".rstrip()

    lines = [
        f"config keys ({cls.__name__}): set as key=value, section.key=value, or in --config FILE",
        row("key", "type", "default", "meaning"),
    ]
    lines.extend(row(f.key, f.type, _flow(f.default), f.meaning) for f in fields if not f.section)
    for section in (f for f in described if f.key in section_keys):
        note = f"; {section.meaning}" if section.meaning else ""
        lines.append(f"\nsection {section.key} ({section.type}, default {_flow(section.default)}{note}):")
        lines.extend(row(f.key, f.type, _flow(f.default), f.meaning) for f in fields if f.section == section.key)
    return "\n".join(lines)


def default_config_yaml(cls: type, header: str = "") -> str:
    """A config file holding every key at its default, each with its meaning as a comment.

    Loads back with `load_config(cls, path)` to the defaults (plus whatever required keys the
    defaults leave empty, which `header` can name).

    Args:
        cls: A config dataclass.
        header: Comment lines to put first (without `#`).

    Returns:
        YAML text.
    """
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    all_fields = config_fields(cls)
    sections = {f.section for f in all_fields} - {""}
    for field in all_fields:
        depth = field.key.count(".")
        indent = "  " * depth
        name = field.key.rsplit(".", 1)[-1]
        comment = f"  # {field.meaning}" if field.meaning else ""
        if field.key in sections and field.default is None:
            # An optional section left null: show its keys commented out, so uncommenting them sets it.
            lines.append(f"{indent}{name}: null{comment}")
            lines.append(f"{indent}# to set {field.key}, replace null with these keys (defaults shown):")
            lines.extend(
                f"{indent}# {'  ' * (f.key.count('.') - depth - 1)}  {f.key.rsplit('.', 1)[-1]}: {_flow(f.default)}"
                for f in all_fields
                if f.key.startswith(field.key + ".")
            )
            continue
        if any(field.key.startswith(s + ".") for s in sections if _default_of(all_fields, s) is None):
            continue
        if field.key in sections:
            lines.append(f"{indent}{name}:{comment}")
        else:
            lines.append(f"{indent}{name}: {_flow(field.default)}{comment}")
    return "\n".join(lines) + "\n"


def _default_of(fields: list[ConfigField], key: str) -> Any:
    return next(f.default for f in fields if f.key == key)
