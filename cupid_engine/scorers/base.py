"""The ``Scorer`` interface and the one registry every scoring method registers in.

A scorer is a small class holding a frozen :class:`~cupid_engine.config.Config`; its
``score(store, run)`` reads what it needs from a gradient-store run and returns a score
table (:mod:`cupid_engine.scorers.table`). The math of every method lives in pure
array functions next to the class, so it is tested on arrays without a store, and the
class is only the adapter. Keeping one registry lets the CLI, the facade and the audit
enumerate methods without importing each module by name.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa

from cupid_engine.config import Config

if TYPE_CHECKING:
    from cupid_engine.store.reader import StoreReader

_REGISTRY: dict[str, type["Scorer"]] = {}

# Scorers that live above this package (they retrain policies and run rollouts, so they
# may import policies, sim and distributed) register themselves when imported; their
# names are known here so that :func:`get_scorer` imports them on first use, without
# this package importing upward.
_PLUGINS: dict[str, str] = {"datamodel": "cupid_engine.datamodels.scorer"}


class Scorer(abc.ABC):
    """One scoring method: a frozen config plus a store adapter.

    Subclasses set ``name`` (the registry key) and ``config_cls`` and implement
    :meth:`score`. Construct with a config or with its fields as keyword options.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[Config]]

    def __init__(self, config: Config | None = None, **options: Any) -> None:
        if config is not None and options:
            raise TypeError("pass either a config or keyword options, not both")
        if config is None:
            try:
                config = self.config_cls(**options)
            except TypeError as exc:  # an unknown option, or a value of the wrong type (e.g. "abc" >= 0)
                from cupid_engine.errors import ConfigError

                known = [f.name for f in dataclasses.fields(self.config_cls)]
                raise ConfigError(f"{self.name}: invalid options {options} ({exc})",
                                  hint=f"options of {self.name}: {known}") from None
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{self.name} expects a {self.config_cls.__name__}, got {type(config).__name__}")
        self.config = config

    @abc.abstractmethod
    def score(self, store: StoreReader, run: str, **inputs: Any) -> pa.Table:
        """Score the training episodes of ``store``/``run``.

        Args:
            store: An open gradient store (``catalog()``, ``run(name)``).
            run: Run name in the store.
            **inputs: Method-specific arrays that the store does not hold (e.g. states).

        Returns:
            A score table (see :func:`cupid_engine.scorers.table.make_table`).
        """


def register(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: add ``cls`` to the registry under ``cls.name``."""
    name = cls.name
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"scorer {name!r} is already registered by {_REGISTRY[name].__qualname__}")
    _REGISTRY[name] = cls
    return cls


def get_scorer(name: str) -> type[Scorer]:
    """The scorer class registered as ``name``; raises ``KeyError`` listing the known ones."""
    if name not in _REGISTRY and name in _PLUGINS:
        importlib.import_module(_PLUGINS[name])
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown scoring method {name!r}; available: {', '.join(available_scorers())}") from None


def available_scorers() -> list[str]:
    """Sorted names of every registered scorer (plugins included, imported or not)."""
    return sorted(set(_REGISTRY) | set(_PLUGINS))
