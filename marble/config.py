"""Every dataclass config to a plain dict (JSON, TOML, safetensors metadata) and back, one way.

`config_to_dict` writes every field, nested configs as dicts and tuples as lists. `config_from_dict`
reads one back by the field types: nested dataclasses, tuples, lists and `X | None` are rebuilt,
fields left out take their defaults (so a file written before a field existed still reads), and an
unknown key or a missing required one is a ConfigError naming the keys and where they are.
A config class that carries a class attribute `kind` (not a field), such as the text encoder
configs, writes it as the "kind" key, and reading accepts that key when it matches.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

from marble.errors import ConfigError

T = TypeVar("T")


def _tag(cls: type) -> str | None:
    """The class's `kind` tag, when it is a class attribute rather than a field."""
    if any(f.name == "kind" for f in dataclasses.fields(cls)):
        return None
    tag = getattr(cls, "kind", None)
    return tag if isinstance(tag, str) else None


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_to_dict(config: Any) -> dict:
    """A dataclass config as plain data: dicts, lists, str, numbers, bool, None."""
    tag = _tag(type(config))
    d = {"kind": tag} if tag is not None else {}
    d.update({f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)})
    return d


def _typed(hint: Any, value: Any, where: str) -> Any:
    """`value` (plain data) as the type `hint` names, for the shapes configs use."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) > 1 and all(dataclasses.is_dataclass(a) for a in rest):
            return _one_of(rest, value, where)
        return _typed(rest[0], value, where) if len(rest) == 1 else value
    if dataclasses.is_dataclass(hint):
        return config_from_dict(hint, value, where)
    if origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_typed(args[0], v, where) for v in value)
        return tuple(value)
    if origin is list and isinstance(value, (list, tuple)):
        return [_typed(args[0], v, where) for v in value] if args else list(value)
    return value


def _one_of(classes: list, value: Any, where: str) -> Any:
    """A union of configs (e.g. the denoising network: U-Net or MMDiT) read by its `kind` tag; a
    table without one is the untagged class, so files written before the union still read."""
    for cls in classes:
        if isinstance(value, cls):
            return value
    kind = value.get("kind") if isinstance(value, dict) else None
    for cls in classes:
        if _tag(cls) == kind:
            return config_from_dict(cls, value, where)
    known = ", ".join(repr(t) for t in (_tag(c) for c in classes) if t)
    raise ConfigError(f"{where} has kind {kind!r}; expected one of {known} or none")


def config_from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """The `cls` config that `data` (as config_to_dict writes it, or a subset) describes.
    `where` names it in errors ("config.unet"). Raises ConfigError for a non-table, unknown keys,
    missing required keys and a wrong kind tag; the config's own checks raise ValueError."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table, not {type(data).__name__}")
    data = dict(data)
    tag = _tag(cls)
    if tag is not None and "kind" in data and data.pop("kind") != tag:
        raise ConfigError(f"{where} is not a {tag!r} config")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown keys in {where}: {', '.join(unknown)}")
    missing = sorted(name for name, f in fields.items() if name not in data
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ConfigError(f"missing keys in {where}: {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _typed(hints[k], v, f"{where}.{k}") for k, v in data.items()})


def config_to_json(config: Any) -> str:
    """config_to_dict as one line of JSON, keys sorted (what files store in their metadata)."""
    return json.dumps(config_to_dict(config), sort_keys=True)


def config_from_json(cls: type[T], text: str, where: str = "config") -> T:
    try:
        data = json.loads(text)
    except (TypeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{where} is not JSON ({e})") from None
    return config_from_dict(cls, data, where)
