"""Frozen configuration dataclasses shared by every subpackage.

Every config in cupid_engine is a frozen dataclass whose fields carry ``help``
metadata, validate themselves in ``__post_init__`` and round-trip losslessly through
``to_dict()`` / ``from_dict()`` (JSON-safe values only), so that a store or a cache key
can record exactly what produced it and refuse a mismatching reopen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from typing import Any, TypeVar

from cupid_engine.errors import ConfigError

T = TypeVar("T", bound="Config")


def field(default: Any = dataclasses.MISSING, *, help: str, **kwargs: Any) -> Any:  # noqa: A002
    """A dataclass field with mandatory ``help`` metadata."""
    if default is not dataclasses.MISSING and isinstance(default, (list, dict, set)):
        raise TypeError("use default_factory for mutable defaults")
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    return value


def _from_jsonable(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _from_jsonable(non_none[0], value)
        return value
    if isinstance(tp, type) and issubclass(tp, Config):
        return tp.from_dict(value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_jsonable(args[0], v) for v in value)
        return tuple(_from_jsonable(a, v) for a, v in zip(args, value))
    if tp is float and isinstance(value, int):
        return float(value)
    return value


@dataclasses.dataclass(frozen=True)
class Config:
    """Base class: lossless JSON round trip and a stable content hash."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict with every field, including the class name."""
        out = {f.name: _to_jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["__class__"] = type(self).__name__
        return out

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        """Inverse of :meth:`to_dict`; unknown keys raise."""
        data = dict(data)
        name = data.pop("__class__", cls.__name__)
        if name != cls.__name__:
            raise ValueError(f"config is a {name}, expected {cls.__name__}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        kwargs = {k: _from_jsonable(hints[k], v) for k, v in data.items()}
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def hash(self) -> str:
        """A short stable content hash (first 16 hex digits of sha256 of the JSON)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def names_tuple(value: Any, what: str) -> tuple[str, ...]:
    """A tuple-of-names field from a sequence or a comma-separated string (``--set
    checkpoints=a,b`` arrives as one string; ``tuple("a,b")`` would be its characters)."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    out = tuple(value)
    check(all(isinstance(v, str) and v for v in out), f"{what} must be names (strings), got {out!r}")
    return out


def check(cond: bool, msg: str) -> None:
    """Raise :class:`~cupid_engine.errors.ConfigError` (a ``ValueError``) unless ``cond``."""
    if not cond:
        raise ConfigError(msg)
