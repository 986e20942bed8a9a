"""Typed, strict configs: YAML (``yaml.safe_load`` only) -> nested ``@dataclass(kw_only=True)``.

* Every component owns a dataclass and receives only its own section.
* Unknown keys are errors naming the key, the file and the closest valid key.
* Values are checked against the declared field type (int, float, bool, str, Optional, list,
  dict, Literal, Enum, nested dataclasses); overrides ``a.b=value`` are parsed by that type.
* A file may extend others with ``base: [a.yaml, b.yaml]``, deep-merged in order, then itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import hashlib
import importlib.resources
import json
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")

_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A bad config: unknown key, wrong type, missing file or missing value. CLI exit code 2."""


# --------------------------------------------------------------------------- type helpers


def _hints(cls: type) -> dict[str, Any]:
    """Resolved field annotations of a dataclass (works with postponed annotations)."""
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) < len(get_args(tp)):
            return True, args[0] if len(args) == 1 else Union[tuple(args)]
    return False, tp


def type_name(tp: Any) -> str:
    """Human-readable name of a declared type, for error messages."""
    opt, inner = _is_optional(tp)
    if opt:
        return f"{type_name(inner)} or null"
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        k, v = get_args(tp) or (str, Any)
        return f"mapping of {type_name(k)} to {type_name(v)}"
    if _is_dataclass_type(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


# Scalar types: how a YAML value is accepted (bool is not an int here, and an int is a valid float).
_SCALARS: dict[type, Callable[[Any], bool]] = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}


def _check(value: Any, tp: Any, key: str, source: str) -> Any:
    """Validate/coerce a YAML value against a declared type; raise ConfigError naming the key."""
    if tp is Any:
        return value
    opt, inner = _is_optional(tp)
    if value is None:
        if opt:
            return None
        raise ConfigError(f"{source}: key '{key}' must be {type_name(tp)}, got null")
    tp = inner
    origin = get_origin(tp)

    def bad() -> ConfigError:
        return ConfigError(
            f"{source}: key '{key}' expects {type_name(tp)}, got {type(value).__name__} {value!r}"
        )

    if tp in _SCALARS:
        if not _SCALARS[tp](value):
            raise bad()
        return float(value) if tp is float else value
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise bad()
        return _build(tp, value, key, source)
    if origin is Literal:
        if value not in get_args(tp):
            raise bad()
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return value if isinstance(value, tp) else tp(value)
        except ValueError:
            raise bad() from None
    if origin in (list, tuple, dict):
        return _check_container(value, tp, origin, key, source, bad)
    if origin in (Union, types.UnionType):
        tagged = _tagged_members(tp)
        if tagged:
            return _check(value, _pick_member(tagged, value, key, source), key, source)
        for alt in get_args(tp):
            try:
                return _check(value, alt, key, source)
            except ConfigError:
                continue
        raise bad()
    if isinstance(tp, type) and not isinstance(value, tp):
        raise bad()
    return value


def _check_container(value: Any, tp: Any, origin: Any, key: str, source: str, bad) -> Any:
    """A list/tuple or dict value, each element checked against its declared type."""
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        kt, vt = get_args(tp) or (Any, Any)
        return {_check(k, kt, f"{key}.{k}", source): _check(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    if not isinstance(value, (list, tuple)):
        raise bad()
    (et,) = get_args(tp)[:1] or (Any,)
    out = [_check(v, et, f"{key}[{i}]", source) for i, v in enumerate(value)]
    return out if origin is list else tuple(out)


def _tagged_members(tp: Any) -> dict[str, type]:
    """For a union of config dataclasses each with ``name: Literal[...]``, map name -> member."""
    out: dict[str, type] = {}
    for m in get_args(tp):
        if not _is_dataclass_type(m):
            return {}
        name_tp = _hints(m).get("name")
        if get_origin(name_tp) is not Literal:
            return {}
        for v in get_args(name_tp):
            out[v] = m
    return out


def _pick_member(tagged: dict[str, type], value: Any, key: str, source: str) -> type:
    """Choose the union member named by ``value['name']`` (default: the first member)."""
    if isinstance(value, dict) and "name" in value:
        name = value["name"]
        if name not in tagged:
            close = difflib.get_close_matches(str(name), list(tagged), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: key '{key}.name' must be one of {', '.join(map(repr, tagged))}, "
                              f"got {name!r}{hint}")
        return tagged[name]
    if dataclasses.is_dataclass(value):
        return type(value)
    return next(iter(tagged.values()))


def _unknown_key(cls: type, key: str, prefix: str, source: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    full = f"{prefix}{key}"
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f" (valid keys: {', '.join(names)})"
    moved = getattr(cls, "moved_key", None)  # a class that renamed or moved keys says where they went
    if callable(moved) and moved(key):
        hint = f": {moved(key)}"
    return ConfigError(f"{source}: unknown key '{full}' in {cls.__name__}{hint}")


def _build(cls: type[T], data: dict, key: str, source: str) -> T:
    prefix = f"{key}." if key else ""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in fields:
            raise _unknown_key(cls, str(k), prefix, source)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            value = _onto_factory_default(f, hints[name], data[name])
            kwargs[name] = _check(value, hints[name], f"{prefix}{name}", source)
        elif f.default is _MISSING and f.default_factory is _MISSING:  # type: ignore[misc]
            raise ConfigError(f"{source}: missing required key '{prefix}{name}' ({type_name(hints[name])})")
        elif f.default_factory is not _MISSING and _is_dataclass_type(f.default_factory):  # type: ignore[misc]
            # An absent section built from its class: build it here, so that a required key inside it is
            # reported by its dotted name (not as the constructor's TypeError).
            kwargs[name] = _build(f.default_factory, {}, f"{prefix}{name}", source)  # type: ignore[misc]
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # __post_init__ validation
        raise ConfigError(f"{source}: {key or cls.__name__}: {e}") from None


def _onto_factory_default(f: dataclasses.Field, tp: Any, value: Any) -> Any:
    """A partial section laid over what its field's ``default_factory`` chose.

    A parent may give a section defaults of its own (fine-tuning's ``DeepSpeedConfig(reduce_bucket_size=1M)``);
    ``deepspeed: {stage: 2}`` in a file must then change the stage only, not reset the bucket to the section
    class's own default. Only the values where the factory differs from the class's defaults are carried."""
    _, inner = _is_optional(tp)
    if not isinstance(value, dict) or f.default_factory is _MISSING or not _is_dataclass_type(inner):  # type: ignore[misc]
        return value
    try:
        made = f.default_factory()  # type: ignore[misc]
    except (TypeError, ValueError):  # a factory that needs the required keys the file gives
        return value
    if type(made) is not inner or ("name" in value and getattr(made, "name", value["name"]) != value["name"]):
        return value
    chosen = to_dict(made)
    try:
        plain = to_dict(inner())
    except (TypeError, ValueError):  # no defaults of its own: everything the factory set is its choice
        plain = {}
    return deep_merge({k: v for k, v in chosen.items() if plain.get(k, _MISSING) != v}, value)


def validate_keys(cls: type, data: dict, source: str, key: str = "") -> None:
    """Check that a (possibly partial) mapping uses only keys that ``cls`` declares."""
    prefix = f"{key}." if key else ""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k, v in data.items():
        if k not in names:
            raise _unknown_key(cls, str(k), prefix, source)
        _, inner = _is_optional(hints[k])
        if isinstance(v, dict) and _tagged_members(inner):
            inner = _pick_member(_tagged_members(inner), v, f"{prefix}{k}", source)
        if _is_dataclass_type(inner) and isinstance(v, dict):
            validate_keys(inner, v, source, f"{prefix}{k}")


# --------------------------------------------------------------------------- YAML files


def deep_merge(a: dict, b: dict) -> dict:
    """Return ``a`` updated by ``b``; mappings merge recursively, anything else is replaced."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def shipped_configs() -> Path:
    """The directory of the configs shipped with the package (``configs/`` in the repository)."""
    return Path(str(importlib.resources.files("tessera.configs")))


def resolve_config_path(path: str | Path) -> Path:
    """``path`` itself when it exists; else the shipped config of that name, so that
    ``--config configs/train/tiny_dit.yaml`` also works from a non-editable install outside the repository."""
    path = Path(path)
    if path.is_file() or path.is_absolute():
        return path
    parts = path.parts[1:] if path.parts and path.parts[0] == "configs" else path.parts
    shipped = shipped_configs().joinpath(*parts)
    return shipped if parts and shipped.is_file() else path


def read_yaml(path: str | Path, cls: type | None = None, _seen: tuple = ()) -> dict:
    """Load a YAML config file with its ``base:`` chain merged; keys are checked per file."""
    path = resolve_config_path(path) if not _seen else Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    resolved = path.resolve()
    if resolved in _seen:
        raise ConfigError(f"{path}: circular 'base' chain: {' -> '.join(map(str, _seen + (resolved,)))}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("base", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: key 'base' expects a list of file paths")
    if cls is not None:
        validate_keys(cls, data, str(path))
    merged: dict = {}
    for b in bases:
        merged = deep_merge(merged, read_yaml(path.parent / b, cls, _seen + (resolved,)))
    return deep_merge(merged, data)


# --------------------------------------------------------------------------- overrides


def _field_type(cls: type, dotted: str, source: str, data: dict | None = None) -> Any:
    tp: Any = cls
    node: Any = data or {}
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        _, inner = _is_optional(tp)
        tagged = _tagged_members(inner)
        if tagged and part == "name" and i == len(parts) - 1:
            return Literal[tuple(tagged)]  # type: ignore[misc]
        if tagged:
            if isinstance(node, dict) and "name" in node:
                inner = _pick_member(tagged, node, ".".join(parts[:i]), source)
            else:
                inner = next((m for m in tagged.values() if part in {f.name for f in dataclasses.fields(m)}),
                             next(iter(tagged.values())))
        node = node.get(part, {}) if isinstance(node, dict) else {}
        if _is_dataclass_type(inner):
            names = {f.name for f in dataclasses.fields(inner)}
            if part not in names:
                raise _unknown_key(inner, part, ".".join(parts[:i]) + ("." if i else ""), source)
            tp = _hints(inner)[part]
        elif get_origin(inner) is dict:
            tp = get_args(inner)[1] if get_args(inner) else Any
        elif inner is Any:  # free-form mappings (deepspeed.extra): any depth, values taken as YAML
            return Any
        else:
            raise ConfigError(f"{source}: key '{dotted}': '{'.'.join(parts[:i])}' is not a section")
    return tp


def parse_value(text: str, tp: Any, key: str, source: str = "override") -> Any:
    """Parse an override string by the declared type of its field."""
    opt, inner = _is_optional(tp)
    if opt and text.strip().lower() in ("null", "none", "~"):
        return None
    tp = inner
    origin = get_origin(tp)
    err = ConfigError(f"{source}: key '{key}' expects {type_name(tp)}, got {text!r}")
    if tp is str:
        return text
    if tp is bool:
        low = text.strip().lower()
        if low in ("true", "yes", "on", "1"):
            return True
        if low in ("false", "no", "off", "0"):
            return False
        raise err
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise err from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise err from None
    if origin is Literal or (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        choices = get_args(tp) if origin is Literal else [m.value for m in tp]
        for c in choices:
            if str(c) == text:
                return c
        raise err
    # Lists, dicts, dataclass sections, unions: YAML flow syntax ("[1, 2]", "{a: 1}");
    # a bare "a,b" is accepted for lists.
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise err from None
    if origin in (list, tuple) and not isinstance(value, (list, dict)):
        value = [yaml.safe_load(p) for p in text.split(",")] if text else []
    return _check(value, tp, key, source)


def apply_overrides(cls: type, data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides to a raw mapping, each parsed by its field's type."""
    out = dict(data)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected key=value")
        key, text = ov.split("=", 1)
        key = key.strip()
        tp = _field_type(cls, key, "override", out)
        value = parse_value(text, tp, key)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            child = node.get(p)
            node[p] = dict(child) if isinstance(child, dict) else {}
            node = node[p]
        node[parts[-1]] = value
    return out


# --------------------------------------------------------------------------- public API


def from_dict(cls: type[T], data: dict | None, source: str = "<dict>") -> T:
    """Build a config strictly from a mapping."""
    return _build(cls, data or {}, "", source)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from a YAML file (with ``base:`` chain) plus dotted overrides."""
    data = read_yaml(path, cls) if path is not None else {}
    data = apply_overrides(cls, data, list(overrides or []))
    return from_dict(cls, data, str(path) if path is not None else "<defaults>")


def to_dict(cfg: Any) -> Any:
    """Plain-data form of a config (enums by value), suitable for YAML/JSON."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, enum.Enum):
        return cfg.value
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def config_hash(cfg: Any) -> str:
    """sha256 of the canonical JSON form of a config."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML text, headed by its content hash."""
    body = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
    return f"# config_hash: {config_hash(cfg)}\n{body}"
