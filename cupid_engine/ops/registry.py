"""Backend registry of the ops.

A backend is a named implementation of some ops (``project``, ``tensorsketch``,
``quality_minmax``) for some devices. ``backend="auto"`` picks the highest-priority
available backend implementing the op for the input's device and logs the choice once; an explicitly requested backend that is missing raises
with an install hint. There is no silent fallback: a failing fast backend is an error,
never a quiet switch to another implementation.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from typing import Any, Callable

logger = logging.getLogger("cupid_engine.ops")


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of the ops.

    Attributes:
        name: Registry name (``torch``, ``cpu``, ``triton``, ``cuda``).
        devices: Device types whose tensors it accepts.
        module: Dotted module path exposing ``project(x, k, method, seed, s)`` and
            ``tensorsketch(delta, x, k, seed)``; imported lazily.
        is_available: Cheap predicate (may import optional packages).
        install_hint: What to do when it is missing.
        priority: Higher wins under ``auto``; 0 or less never wins ``auto``.
        auto_devices: Device types on which ``auto`` may choose it (default: ``devices``).
            The Triton interpreter runs on CPU for tests but is never an automatic CPU
            choice, so the rule lives here, before the choice is logged.
        ops: The ops its module implements (a function of that name each).
    """

    name: str
    devices: tuple[str, ...]
    module: str
    is_available: Callable[[], bool]
    install_hint: str
    priority: int
    auto_devices: tuple[str, ...] | None = None
    ops: tuple[str, ...] = ("project", "tensorsketch")

    def supports(self, op: str) -> bool:
        return op in self.ops

    def may_auto(self, device_type: str) -> bool:
        return self.priority > 0 and device_type in (self.devices if self.auto_devices is None else self.auto_devices)

    def impl(self) -> Any:
        return importlib.import_module(self.module)


_REGISTRY: dict[str, Backend] = {}
_LOGGED: set[tuple[str, str]] = set()


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def available() -> list[str]:
    return [b.name for b in _REGISTRY.values() if b.is_available()]


def resolve(name: str, device_type: str, op: str) -> Backend:
    """The backend to run ``op`` on a tensor of ``device_type``."""
    if name != "auto":
        backend = get(name)
        if not backend.is_available():
            raise RuntimeError(f"backend {name!r} is not available: {backend.install_hint}")
        if not backend.supports(op):
            raise ValueError(
                f"backend {name!r} does not implement {op} (backends that do: "
                f"{sorted(b.name for b in _REGISTRY.values() if b.supports(op))})"
            )
        if device_type not in backend.devices:
            raise ValueError(
                f"backend {name!r} does not run on {device_type!r} tensors (it supports {list(backend.devices)})"
            )
        return backend
    candidates = [
        b for b in _REGISTRY.values() if b.supports(op) and b.may_auto(device_type) and b.is_available()
    ]
    if not candidates:
        raise RuntimeError(f"no backend available for {op} on {device_type!r} tensors")
    chosen = max(candidates, key=lambda b: b.priority)
    if (op, device_type) not in _LOGGED:
        _LOGGED.add((op, device_type))
        logger.info("ops.%s: backend='auto' chose %r for %s tensors", op, chosen.name, device_type)
    return chosen
