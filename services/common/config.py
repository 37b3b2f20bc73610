"""Derive a service's CLI and config file from its one config dataclass.

Each field declares its help and bounds once, in `metadata={"help": ..., "min": ..., "max": ...}`;
the argparse options, the config-file keys and the validation all come from it:

    @dataclass(frozen=True)
    class DecodeConfig:
        server: ServerConfig = field(default_factory=ServerConfig)   # nested: --server-port, {server: {port: ...}}
        max_num_seqs: int = field(default=64, metadata={"help": "sequences per batch", "min": 1})

    config = parse_config(DecodeConfig, sys.argv[1:])   # defaults < --config file < flags

Supported field types: int, float, str, bool (`--flag/--no-flag`), Optional[...] (pass "none" to
unset), Literal[...] choices, tuple[T, ...] (space-separated values) and nested config dataclasses.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from stageserve.common.errors import InvalidArgumentError

T = TypeVar("T")
_NONE_WORDS = ("none", "null")


@dataclasses.dataclass(frozen=True)
class _FieldType:
    """What a field's annotation means for parsing: the scalar type, and how it is wrapped."""

    scalar: type  # int, float, str, bool, or a config dataclass
    optional: bool = False
    sequence: bool = False  # tuple[scalar, ...]
    choices: tuple[Any, ...] | None = None  # from Literal[...]


def _field_type(name: str, annotation: Any) -> _FieldType:
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"{name}: only Optional[X] unions are supported, got {annotation}")
        optional, annotation = True, args[0]
        origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        return _FieldType(type(choices[0]), optional, choices=choices)
    if origin is tuple:
        args = typing.get_args(annotation)
        if len(args) != 2 or args[1] is not Ellipsis or args[0] not in (int, float, str):
            raise TypeError(f"{name}: only tuple[int|float|str, ...] is supported, got {annotation}")
        return _FieldType(args[0], optional, sequence=True)
    if annotation in (int, float, str, bool) or dataclasses.is_dataclass(annotation):
        return _FieldType(annotation, optional)
    raise TypeError(f"{name}: unsupported config field type {annotation}")


def _fields(cls: type) -> list[tuple[dataclasses.Field, _FieldType]]:
    hints = typing.get_type_hints(cls)  # resolves string annotations (`from __future__ import annotations`)
    return [(f, _field_type(f"{cls.__name__}.{f.name}", hints[f.name])) for f in dataclasses.fields(cls) if f.init]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _cli_parser(ft: _FieldType, flag: str):
    def parse(text: str) -> Any:
        if ft.optional and text.lower() in _NONE_WORDS:
            return None
        try:
            return ft.scalar(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: expected {ft.scalar.__name__}, got {text!r}") from None

    parse.__name__ = ft.scalar.__name__  # argparse names the type in its error messages
    return parse


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one `--prefix-field-name` option per field of `cls` (nested dataclasses recurse).

    Options default to "not given" (argparse.SUPPRESS), so `dataclass_from_args` can tell a flag
    from a default and let flags override a config file; the help text shows the real default.
    """
    for f, ft in _fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(ft.scalar):
            add_dataclass_args(parser, ft.scalar, prefix=f"{name}-")
            continue
        flag = "--" + name.replace("_", "-")
        default = _default(f)
        help_text = str(f.metadata.get("help", "")).replace("%", "%%")
        if default is not dataclasses.MISSING:
            shown = " ".join(map(str, default)) if ft.sequence and default is not None else default
            help_text = f"{help_text} (default: {shown})".strip()
        kwargs: dict[str, Any] = {"dest": name.replace("-", "_"), "default": argparse.SUPPRESS, "help": help_text}
        if ft.scalar is bool and not ft.sequence:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _cli_parser(ft, flag)
            if ft.choices is not None:
                kwargs["choices"] = ft.choices + ((None,) if ft.optional else ())
                kwargs["metavar"] = "{" + ",".join(map(str, ft.choices)) + "}"
            if ft.sequence:
                kwargs["nargs"] = "*"
        parser.add_argument(flag, **kwargs)


def _coerce(name: str, ft: _FieldType, value: Any) -> Any:
    """Check a config-file value against the field's type; raise InvalidArgumentError naming the field."""
    if value is None:
        if ft.optional:
            return None
        raise InvalidArgumentError(name, "must not be null")
    if ft.sequence:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise InvalidArgumentError(name, f"expected a list, got {value!r}")
        item = dataclasses.replace(ft, sequence=False, optional=False)
        return tuple(_coerce(name, item, v) for v in value)
    ok = isinstance(value, ft.scalar) and not (ft.scalar is not bool and isinstance(value, bool))
    if ft.scalar is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise InvalidArgumentError(name, f"expected {ft.scalar.__name__}, got {value!r}")
    return value


def _build(cls: type[T], values: Mapping[str, Any], base: Any, path: str) -> T:
    """Make a `cls` from `base` (an instance or None) with `values` (nested dicts for nested configs)."""
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise InvalidArgumentError(f"{path}{sorted(unknown)[0]}", "unknown config option")
    kwargs: dict[str, Any] = {}
    for f, ft in _fields(cls):
        name = f"{path}{f.name}"
        current = getattr(base, f.name) if base is not None else _default(f)
        if dataclasses.is_dataclass(ft.scalar):
            sub = values.get(f.name, {})
            if not isinstance(sub, Mapping):
                raise InvalidArgumentError(name, f"expected a table of options, got {sub!r}")
            if sub or current is dataclasses.MISSING:
                base_sub = None if current is dataclasses.MISSING else current
                kwargs[f.name] = _build(ft.scalar, sub, base_sub, f"{name}.")
            continue
        if f.name in values:
            kwargs[f.name] = _coerce(name, ft, values[f.name])
        elif current is dataclasses.MISSING:
            raise InvalidArgumentError(name, "is required")
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def _namespace_values(cls: type, namespace: argparse.Namespace, prefix: str) -> dict[str, Any]:
    given = vars(namespace)
    values: dict[str, Any] = {}
    for f, ft in _fields(cls):
        dest = f"{prefix}{f.name}".replace("-", "_")
        if dataclasses.is_dataclass(ft.scalar):
            sub = _namespace_values(ft.scalar, namespace, f"{prefix}{f.name}-")
            if sub:
                values[f.name] = sub
        elif dest in given:
            values[f.name] = tuple(given[dest]) if ft.sequence and given[dest] is not None else given[dest]
    return values


def _merge(low: Mapping[str, Any], high: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(low)
    for key, value in high.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _normalize_keys(values: Mapping[str, Any]) -> dict[str, Any]:
    """Config files may spell keys `block-size` like the flags; fields are `block_size`."""
    return {
        str(k).replace("-", "_"): _normalize_keys(v) if isinstance(v, Mapping) else v for k, v in values.items()
    }


def dataclass_from_args(
    cls: type[T], namespace: argparse.Namespace, prefix: str = "", file_values: Mapping[str, Any] | None = None
) -> T:
    """Build `cls` from parsed flags over `file_values` over the field defaults, then check bounds."""
    values = _merge(_normalize_keys(file_values or {}), _namespace_values(cls, namespace, prefix))
    config = _build(cls, values, None, "")
    validate_bounds(config)
    return config


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml, .yml) or TOML (.toml) config file into a dict of option values."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        elif suffix == ".toml":
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        else:
            raise InvalidArgumentError("config", f"{path}: expected a .yaml, .yml or .toml file")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise InvalidArgumentError("config", f"{path}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidArgumentError("config", f"{path}: expected a mapping of options at the top level")
    return data


def validate_bounds(obj: Any, path: str = "") -> None:
    """Check every field's `min`/`max` metadata and Literal choices, recursing into nested configs."""
    for f, ft in _fields(type(obj)):
        name, value = f"{path}{f.name}", getattr(obj, f.name)
        if value is None:
            continue
        if dataclasses.is_dataclass(ft.scalar):
            validate_bounds(value, f"{name}.")
            continue
        for item in value if ft.sequence else (value,):
            if ft.choices is not None and item not in ft.choices:
                raise InvalidArgumentError(name, f"must be one of {list(ft.choices)}, got {item!r}")
            low, high = f.metadata.get("min"), f.metadata.get("max")
            if low is not None and item < low:
                raise InvalidArgumentError(name, f"must be >= {low}, got {item!r}")
            if high is not None and item > high:
                raise InvalidArgumentError(name, f"must be <= {high}, got {item!r}")


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    """Parse `argv` into a `cls`: field defaults, then `--config FILE`, then flags, each overriding the last."""
    parser = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip().split("\n")[0])
    parser.add_argument("--config", type=Path, default=None, help="YAML or TOML file of option values")
    add_dataclass_args(parser, cls)
    namespace = parser.parse_args(argv)
    file_values = load_config_file(namespace.config) if namespace.config else None
    return dataclass_from_args(cls, namespace, file_values=file_values)
