"""How a config tree is read: strict YAML, dotted overrides, and type checking against the dataclass annotations.

Kept apart from the tree itself (``cacovid_rl.config``) so the schema reads as a list of documented fields; this
module knows nothing of the fields, only how to check any frozen dataclass tree against raw YAML data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the offending key."""


def to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def yaml_literal(value: Any) -> str:
    return yaml.safe_dump(to_plain(value), default_flow_style=True).strip().removesuffix("...").strip()


def _coerce_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"config key '{key}' must be true/false, got {value!r}")
    return value


def _coerce_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    return value


def _coerce_float(value: Any, key: str) -> float:
    if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    # NaN passes every `x > 0` check by failing none of the `<` ones, and inf makes a schedule or loss NaN later.
    if not math.isfinite(float(value)):
        raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
    return float(value)


def _coerce_str(value: Any, key: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    return str(value)


_SCALARS: dict[Any, Callable[[Any, str], Any]] = {
    bool: _coerce_bool,
    int: _coerce_int,
    float: _coerce_float,
    str: _coerce_str,
}


def _coerce_union(value: Any, tp: Any, key: str) -> Any:
    """The first member type ``value`` fits, in declaration order."""
    for arg in typing.get_args(tp):
        try:
            return _coerce(value, arg, key)
        except ConfigError:
            continue
    raise ConfigError(f"config key '{key}' has invalid value {value!r}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotated type, converting only where YAML is ambiguous."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {type(value).__name__}")
        return build_dataclass(tp, value, key + ".")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"config key '{key}' must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {type(value).__name__}")
        inner = typing.get_args(tp)[0]
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp, key)
    scalar = _SCALARS.get(tp)
    return scalar(value, key) if scalar is not None else value


def build_dataclass(cls: Any, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if not isinstance(k, str):  # YAML reads `1:` or `true:` as a non-string key
            raise ConfigError(f"config key {k!r} under '{prefix or '<root>'}' must be a name, got {type(k).__name__}")
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys under '{prefix or '<root>'}': {sorted(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in raw.items()}
    return cls(**kwargs)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a nested dict, in order."""
    raw = to_plain(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, text = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key given twice in one mapping.

    Plain YAML keeps the last of two ``learner:`` sections and silently drops the first, with every key in it.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            with contextlib.suppress(TypeError):  # an unhashable key: the base class reports it
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice (first {seen[key]})", key_node.start_mark
                    )
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """YAML as the config loader reads it: safe types only, duplicate keys rejected."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects
