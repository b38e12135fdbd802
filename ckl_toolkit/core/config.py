"""Typed recipes: YAML is only the serialisation of dataclasses (OLMo-core style).

- ``load_recipe(cls, path, overrides)`` reads YAML, applies ``a.b=value`` overrides, and builds the
  dataclass tree. Unknown keys and wrong types fail with the file, line and dotted field name.
- Each dataclass validates itself in ``__post_init__`` by raising :class:`ConfigError` naming the field.
- A dataclass may list renamed fields in a ``moved`` class variable (old name -> new dotted path): an
  old recipe then fails with a message naming the new field instead of "unknown field".
- Field help comes from ``field(metadata={"help": ...})``; ``describe(cls)`` lists it for ``--help``
  and ``ckl validate``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe problem; the message names the file, line and field where known."""


def fld(default: Any = dataclasses.MISSING, help: str = "", choices: tuple | None = None, **kw) -> Any:
    """A dataclass field with help text (and allowed values) in its metadata."""
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    if default is not dataclasses.MISSING and isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def check_choices(obj: Any, prefix: str = "") -> None:
    """Validate every field that declares ``choices``; call from ``__post_init__``."""
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        if choices and getattr(obj, f.name) not in choices:
            raise ConfigError(f"{prefix}{f.name}={getattr(obj, f.name)!r}: must be one of {list(choices)}")


def require(cond: bool, field_name: str, message: str) -> None:
    """Raise ConfigError naming the field when ``cond`` is false."""
    if not cond:
        raise ConfigError(f"{field_name}: {message}")


# ---------------------------------------------------------------------------------------------
# YAML with line numbers


def _yaml_lines(text: str) -> dict[str, int]:
    """Map dotted key paths of a YAML mapping to their 1-based line numbers."""
    lines: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, "")
    return lines


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = data
    for k in keys[:-1]:
        if cur.get(k) is None:
            cur[k] = {}
        if not isinstance(cur[k], dict):
            raise ConfigError(f"override {dotted}: '{k}' is not a section")
        cur = cur[k]
    cur[keys[-1]] = value


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> list[tuple[str, Any]]:
    """``["a.b=3", "c=[1,2]"]`` -> ``[("a.b", 3), ("c", [1, 2])]`` (values parsed as YAML)."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


# ---------------------------------------------------------------------------------------------
# dict -> dataclass with type checks


def _where(source: str | None, lines: dict[str, int], key: str) -> str:
    if source is None:
        return ""
    line = lines.get(key)
    return f"{source}:{line}: " if line else f"{source}: "


def _coerce(tp: Any, value: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}{key}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{key}: expected a mapping, got {value!r}")
        return value  # handled by the caller (needs line info)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}{key}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict | None, source: str | None = None, lines=None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict, naming file:line and the dotted key on errors."""
    lines = lines or {}
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    moved = getattr(cls, "moved", {})  # renamed fields: old name -> new dotted path, for old recipes
    for key in data:
        if key in moved and key not in names:
            raise ConfigError(
                f"{_where(source, lines, prefix + key)}{prefix}{key}: this field is now '{moved[key]}' "
                "(one spelling for the update and eval recipes); rename it in the recipe"
            )
        if key not in names:
            close = [n for n in names if n.startswith(key[:3])]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{_where(source, lines, prefix + key)}{prefix}{key}: unknown field{hint}; "
                f"known: {sorted(names)}"
            )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key = prefix + f.name
        tp = hints[f.name]
        sub = _dataclass_in(tp)
        value = data[f.name]
        if sub is not None and isinstance(value, dict):
            kwargs[f.name] = from_dict(sub, value, source, lines, key + ".")
        else:
            kwargs[f.name] = _coerce(tp, value, key, _where(source, lines, key))
    try:
        return cls(**kwargs)
    except ValueError as e:  # ConfigError, or a ValueError from a library dataclass's validation
        msg = str(e)
        field_name = msg.split(":", 1)[0].split("=", 1)[0]
        raise ConfigError(f"{_where(source, lines, prefix + field_name)}{prefix}{msg}") from None


def _dataclass_in(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    for a in typing.get_args(tp):
        if dataclasses.is_dataclass(a):
            return a
    return None


def load_recipe(cls: type[T], path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Load a YAML recipe (or only defaults when path is None) and apply key=value overrides."""
    data: dict = {}
    lines: dict[str, int] = {}
    source = None
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: recipe file not found")
        text = path.read_text(encoding="utf-8")
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f"{mark.line + 1}" if mark else "?"
            raise ConfigError(f"{path}:{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}:1: a recipe must be a YAML mapping")
        lines = _yaml_lines(text)
        source = str(path)
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
        lines.pop(key, None)  # an override has no line in the file
    return from_dict(cls, data, source, lines)


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dict (tuples become lists) for YAML/JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def recipe_hash(obj: Any) -> str:
    """A short stable hash of the resolved recipe (stored in checkpoints and sidecars)."""
    return hashlib.sha256(json.dumps(to_dict(obj), sort_keys=True).encode()).hexdigest()[:16]


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, help) for every field, recursively: the recipe documentation."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sub = _dataclass_in(hints[f.name])
        if sub is not None:
            rows.extend(describe(sub, prefix + f.name + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = "(required)"
        help_text = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            help_text += f" One of {list(f.metadata['choices'])}."
        rows.append((prefix + f.name, default, help_text))
    return rows
