"""Ray-backed execution: the only package of cupid_engine that imports ray (lazily).

* ``featurize``: featurisation of gradient-store shards on Ray actors
  (:func:`~cupid_engine.distributed.featurize.featurize_distributed`,
  :class:`~cupid_engine.distributed.featurize.FeaturizeWorker`).
* ``rollouts``: parallel simulated rollouts on Ray actors.
* ``training``: parallel policy training (datamodel subsets).

Nothing is imported eagerly: ``import cupid_engine.distributed`` neither imports ray nor
any submodule; attributes below load their submodule on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "FeaturizeWorker": "cupid_engine.distributed.featurize",
    "featurize_distributed": "cupid_engine.distributed.featurize",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cupid_engine.distributed' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
