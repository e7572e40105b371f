"""Frozen-dataclass configs with typed ``key=value`` overrides.

Recipes describe their settings as a frozen dataclass. Overrides from the
command line are strings; they are converted with the field's annotated type
(int, float, bool, str, Literal[...], tuple[int, ...]) and any problem -- an
unknown key, a value of the wrong type, a value the recipe rejects -- raises a
:class:`ConfigError` whose message is one line naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

C = TypeVar("C")


class ConfigError(ValueError):
    """A bad configuration key or value (reported as a one-line CLI error)."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(key: str, text: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (Union, types.UnionType):
        if type(None) in args and (text is None or str(text).lower() in ("none", "null")):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, text, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot parse {text!r}")
    if origin is Literal:
        for a in args:
            if str(a) == str(text):
                return a
        raise ConfigError(f"{key} must be one of {list(args)}, got {text!r}")
    if origin is tuple:
        if isinstance(text, list | tuple):
            items = list(text)
        else:
            items = [s for s in str(text).replace("(", "").replace(")", "").split(",") if s.strip()]
        elem = args[0] if args else str
        return tuple(_coerce(key, s.strip() if isinstance(s, str) else s, elem) for s in items)
    if typ is bool:
        if isinstance(text, bool):
            return text
        s = str(text).lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
        raise ConfigError(f"{key} must be a boolean (true/false), got {text!r}")
    if typ is int:
        if isinstance(text, bool):
            raise ConfigError(f"{key} must be an integer, got {text!r}")
        if isinstance(text, int):
            return text
        try:
            f = float(str(text))
        except ValueError:
            raise ConfigError(f"{key} must be an integer, got {text!r}") from None
        if not f.is_integer():
            raise ConfigError(f"{key} must be an integer, got {text!r}")
        return int(f)
    if typ is float:
        try:
            return float(text)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {text!r}") from None
    if typ is str:
        return str(text)
    raise ConfigError(f"{key}: unsupported config type {typ!r}")


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def replace(cfg: C, updates: Mapping[str, Any], *, context: str = "config") -> C:
    """Returns ``cfg`` with ``updates`` applied (values converted to the fields' types).

    Raises:
      ConfigError: unknown key, ill-typed value, or a value the config rejects.
    """
    types_ = field_types(type(cfg))
    converted = {}
    for key, value in updates.items():
        if key not in types_:
            close = difflib.get_close_matches(key, list(types_), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown {context} key '{key}'{hint}")
        converted[key] = _coerce(key, value, types_[key])
    try:
        return dataclasses.replace(cfg, **converted)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """``["a=1", "b=x"] -> {"a": "1", "b": "x"}``; a malformed item is a ConfigError."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"expected key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def from_dict(cls: type[C], data: Mapping[str, Any], *, context: str = "config") -> C:
    return replace(cls(), data, context=context)


def check(condition: bool, message: str) -> None:
    """Config validation helper for ``__post_init__``."""
    if not condition:
        raise ConfigError(message)


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose errors are one-line :class:`ConfigError`s (the command
    line prints them as ``metaopt: error: ...`` and exits 2), for ``metaopt`` commands and
    recipe sub-commands."""

    def error(self, message):  # one line, exit 2
        raise ConfigError(message)
