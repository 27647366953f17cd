"""Typed dataclass configs: YAML plus dotted ``key=value`` overrides, every problem reported at once.

A config is a (nested) dataclass. ``load_config(Cls, path, overrides)`` reads the YAML file,
applies overrides such as ``train.max_steps=20``, converts values to the annotated types and
builds the dataclass. Unknown keys, values of the wrong type and failed ``__post_init__``
checks are collected across the whole tree and raised together as one ``ConfigError``.

Dataclasses check themselves in ``__post_init__`` with ``require``::

    def __post_init__(self):
        problems = []
        require(problems, self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        raise_if(problems)
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import types
import typing
from typing import Any, Literal, Union

import yaml

from sparktune.errors import ConfigError, bounded

__all__ = [
    "load_config",
    "parse_overrides",
    "config_to_dict",
    "flatten_config",
    "deep_merge",
    "require",
    "raise_if",
]


def require(problems: list, ok: bool, key: str, message: str) -> None:
    """Record ``key: message`` in ``problems`` unless ``ok``."""
    if not ok:
        problems.append(f"{key}: {message}")


def raise_if(problems: list) -> None:
    if problems:
        raise ConfigError(problems)


def parse_overrides(overrides) -> dict:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict; values are parsed as YAML scalars."""
    nested: dict = {}
    problems = []
    for item in overrides or ():
        if "=" not in item:
            problems.append(f"override {item!r}: expected KEY=VALUE (e.g. train.max_steps=20)")
            continue
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            problems.append(f"override {item!r}: the key is empty or has an empty part")
            continue
        try:
            value = yaml.load(raw, Loader=_BoundedLoader) if raw.strip() else ""  # noqa: S506 - a SafeLoader
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"override {item!r}: {part!r} is set both as a value and as a section")
                break
            node = child
        else:
            node[parts[-1]] = value
    raise_if(problems)
    return nested


def deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# A config is a few hundred lines; these bounds refuse a hostile file (a "billion laughs" of
# nested aliases expands to billions of values from a few lines) before anything walks it.
MAX_CONFIG_BYTES = 1 << 20
MAX_ALIASES = 100
MAX_VALUES = 100_000


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses more than ``MAX_ALIASES`` aliases (``*name``)."""

    aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_ALIASES} aliases (*name): refused as a possible alias bomb")
        return super().compose_node(parent, index)


def _count_values(value, budget: int) -> int:
    """Values in ``value`` counting every alias expansion, stopping once past ``budget``."""
    seen = 0
    stack = [value]
    while stack and seen <= budget:
        item = stack.pop()
        seen += 1
        if isinstance(item, dict):
            stack.extend(item.values())
            seen += len(item)
        elif isinstance(item, list):
            stack.extend(item)
    return seen


def _read_yaml(path) -> object:
    size = os.path.getsize(path)
    if size > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: the file is {size:,} bytes; a config is expected to be under "
                           f"{MAX_CONFIG_BYTES:,} bytes: pass the YAML config, not a data file"])
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start}); save the config as UTF-8"]) from None
    loader = _BoundedLoader(text)
    try:
        loaded = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path} is not valid YAML: {bounded(str(exc), 500)}"]) from None
    finally:
        loader.dispose()
    if _count_values(loaded, MAX_VALUES) > MAX_VALUES:
        raise ConfigError([f"{path}: expands to more than {MAX_VALUES:,} values (through aliases); "
                           "a config is a few hundred: write the values out or use fewer nested aliases"])
    return loaded


def load_config(cls, path: str | os.PathLike | None = None, overrides=(), data: dict | None = None):
    """Build ``cls`` from a YAML file (optional), a dict (optional) and dotted overrides."""
    raw: dict = {}
    source = None
    if path is not None:
        source = str(path)
        if not os.path.exists(path):
            raise ConfigError([f"config file {path} does not exist: pass an existing YAML file to --config"])
        if os.path.isdir(path):
            raise ConfigError([f"config file {path} is a folder: pass a YAML file to --config"])
        loaded = _read_yaml(path)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError([f"{path}: expected a mapping of keys at the top level, found {type(loaded).__name__}"])
        raw = loaded
    if data:
        raw = deep_merge(raw, data)
    raw = deep_merge(raw, parse_overrides(overrides))
    problems: list[str] = []
    cfg = _build(cls, raw, "", problems)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def _build(cls, raw, prefix: str, problems: list):
    if not isinstance(raw, dict):
        problems.append(f"{prefix or '<top>'}: expected a mapping for section {cls.__name__}, found {bounded(raw)}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        if not isinstance(key, str):
            problems.append(f"{prefix}{bounded(key)}: expected a key name (text), found the "
                            f"{type(key).__name__} {bounded(key)}; quote it or use the key's name")
            continue
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(sorted(fields))}"
            problems.append(f"{prefix}{key}: unknown key{hint}")
    kwargs = {}
    n_before = len(problems)
    for name, field in fields.items():
        if name not in raw:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                if dataclasses.is_dataclass(hints[name]):
                    kwargs[name] = _build(hints[name], {}, f"{prefix}{name}.", problems)
                else:
                    problems.append(f"{prefix}{name}: required, not set")
            continue
        kwargs[name] = _coerce(raw[name], hints[name], f"{prefix}{name}", problems)
    if len(problems) > n_before:
        return None
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        problems.extend(f"{prefix}{p}" for p in exc.problems)
        return None


_MISSING = object()


def _coerce(value, tp, key: str, problems: list):
    """``value`` converted to the type hint ``tp``; a mismatch appends a problem naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            problems.append(f"{key}: expected a section, found null")
            return None
        return _build(tp, value, key + ".", problems)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, args, key, problems)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _coerce_enum(value, tp, key, problems)
    if origin is Literal:
        if value not in args:
            problems.append(f"{key}: expected one of {list(args)}, found {bounded(value)}")
        return value
    if origin in (list, tuple):
        return _coerce_list(value, args[0] if args else Any, key, problems)
    if origin is dict:
        return _coerce_dict(value, args[1] if len(args) == 2 else Any, key, problems)
    for scalar_tp, convert in _SCALARS:
        if tp is scalar_tp:
            return convert(value, key, problems)
    return value


def _coerce_union(value, args: tuple, key: str, problems: list):
    """``Optional[X]`` is X or null; a wider union takes the first member that converts cleanly."""
    if value is None and type(None) in args:
        return None
    inner = [a for a in args if a is not type(None)]
    if len(inner) == 1:
        return _coerce(value, inner[0], key, problems)
    for candidate in inner:
        trial: list = []
        result = _coerce(value, candidate, key, trial)
        if not trial:
            return result
    names = [getattr(a, "__name__", str(a)) for a in inner]
    problems.append(f"{key}: expected one of {names}, found {bounded(value)}")
    return None


def _coerce_enum(value, tp: type[enum.Enum], key: str, problems: list):
    """A member of ``tp``, through its ``parse(value, key)`` classmethod when it has one."""
    parse = getattr(tp, "parse", None)
    try:
        return parse(value, key) if parse else tp(value)
    except (ConfigError, ValueError):
        problems.append(f"{key}: expected one of {[m.value for m in tp]}, found {bounded(value)}")
        return None


def _coerce_list(value, item_tp, key: str, problems: list):
    """A list of ``item_tp``; a string is read as comma-separated items."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        problems.append(f"{key}: expected a list, found {bounded(value)}")
        return None
    return [_coerce(v, item_tp, f"{key}[{i}]", problems) for i, v in enumerate(value)]


def _coerce_dict(value, val_tp, key: str, problems: list):
    """A mapping with string keys and ``val_tp`` values."""
    if not isinstance(value, dict):
        problems.append(f"{key}: expected a mapping, found {bounded(value)}")
        return None
    return {str(k): _coerce(v, val_tp, f"{key}.{k}", problems) for k, v in value.items()}


def _coerce_bool(value, key: str, problems: list):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    problems.append(f"{key}: expected true or false, found {bounded(value)}")
    return None


def _coerce_int(value, key: str, problems: list):
    """An integer; a whole float or numeric string is accepted, a bool is not."""
    if isinstance(value, bool) or not isinstance(value, (int, str, float)):
        problems.append(f"{key}: expected an integer, found {bounded(value)}")
        return None
    try:
        as_float = float(value)
        if as_float != int(as_float):
            raise ValueError
        return int(as_float)
    except (ValueError, OverflowError):
        problems.append(f"{key}: expected an integer, found {bounded(value)}")
        return None


def _coerce_float(value, key: str, problems: list):
    if isinstance(value, bool):
        problems.append(f"{key}: expected a number, found {bounded(value)}")
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        problems.append(f"{key}: expected a number, found {bounded(value)}")
        return None


def _coerce_str(value, key: str, problems: list):
    if isinstance(value, (dict, list)):
        problems.append(f"{key}: expected a string, found {bounded(value)}")
        return None
    return "" if value is None else str(value)


_SCALARS = ((bool, _coerce_bool), (int, _coerce_int), (float, _coerce_float), (str, _coerce_str))


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def flatten_config(cfg, prefix: str = "") -> dict:
    """``{"train.lr": 1e-4, ...}``: the dotted keys that overrides use."""
    flat = {}
    items = cfg.items() if isinstance(cfg, dict) else config_to_dict(cfg).items()
    for key, value in items:
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
