"""Typed settings: config dataclasses built from untyped values (flags, TOML/YAML files, run.json),
checked field by field, with one-line errors that name the setting.

A recipe's config composes the training loop's settings (`loop`, a LoopConfig) with its own; a flat
mapping such as the command line gives is routed to the right one of the two by field name.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from ..model.config import ConfigError

T = TypeVar("T")


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", str(kind).replace("typing.", ""))


def check_value(name: str, value: Any, kind: Any) -> Any:
    """`value` if it fits the annotation `kind` (int, float, str, bool, None, list[X], dict, unions);
    ints are accepted for floats. A ConfigError naming `name` otherwise."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return check_value(name, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"setting {name!r} must be {' or '.join(_type_name(a) for a in args)}, not {value!r}")
    if kind is type(None):
        if value is None:
            return None
    elif kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, list):
            return [check_value(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else value
    elif origin is dict or kind is dict:
        if isinstance(value, dict):
            return value
    elif isinstance(kind, type) and dataclasses.is_dataclass(kind):
        if isinstance(value, kind):
            return value
        if isinstance(value, dict):
            return build(kind, value)
    else:
        return value
    raise ConfigError(f"setting {name!r} must be {_type_name(kind)}, not {value!r}")


def own_hints(cls: type) -> dict[str, Any]:
    """The field types `cls` itself declares (not its bases'), resolved in its own module."""
    namespace = vars(sys.modules[cls.__module__])
    return {k: eval(v, namespace) if isinstance(v, str) else v for k, v in vars(cls).get("__annotations__", {}).items()}


def build(cls: type[T], values: dict[str, Any]) -> T:  # cls: a dataclass
    """`cls(**values)` with every value checked against its field's type, and unknown names refused."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}")
    return cls(**{k: check_value(k, v, hints[k]) for k, v in values.items()})


def route(cls: type[T], flat: dict[str, Any], loop_defaults: Any) -> T:
    """A recipe config from a flat mapping: names of the recipe's own fields stay with it, names of
    LoopConfig's fields go to its `loop` (on top of `loop_defaults`), anything else is an error."""
    loop_type = type(loop_defaults)
    own = {f.name for f in dataclasses.fields(cls)} - {"loop"}  # type: ignore[arg-type]
    loop_names = {f.name for f in dataclasses.fields(loop_type)}
    nested = flat.get("loop", {})
    if not isinstance(nested, dict):
        raise ConfigError("setting 'loop' must be a table of training-loop settings")
    loop_values = {**dataclasses.asdict(loop_defaults), **nested, **{k: v for k, v in flat.items() if k in loop_names}}
    recipe_values = {k: v for k, v in flat.items() if k in own or k not in loop_names | {"loop"}}
    return build(cls, {**recipe_values, "loop": build(loop_type, loop_values)})


def flatten(cfg: Any) -> dict[str, Any]:
    """The inverse of `route`: one mapping of every setting of a recipe config and its loop."""
    values = dataclasses.asdict(cfg)
    return {**values.pop("loop"), **values}


def resumed(cfg: T, given: dict[str, Any], changeable: frozenset[str], flag=lambda name: name) -> T:
    """`cfg` with the settings in `given` changed, which must all be in `changeable` (a resumed run
    continues as it was: only how long it runs and how it is laid out may change)."""
    refused = sorted(set(given) - changeable)
    if refused:
        allowed = ", ".join(sorted(flag(n) for n in changeable))
        raise ConfigError(
            f"--resume continues a run as it was; only {allowed} may change, not {', '.join(flag(n) for n in refused)}"
        )
    return route(type(cfg), {**flatten(cfg), **given}, cfg.loop)  # type: ignore[attr-defined]


def read_file(path: str | Path) -> dict[str, Any]:
    """Settings from a TOML or YAML file, keys as the flags (dashes or underscores)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from None
    try:
        if path.suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text) or {}
    except Exception as e:  # noqa: BLE001 - any parse error becomes one line for the user
        raise ConfigError(f"config file {path} cannot be parsed: {str(e).splitlines()[0] if str(e) else e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a table of settings")
    return {str(k).replace("-", "_"): v for k, v in raw.items()}
