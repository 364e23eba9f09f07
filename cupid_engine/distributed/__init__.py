"""Ray-backed execution: the only package of cupid_engine that imports ray (lazily).

* ``executor``: :class:`~cupid_engine.distributed.executor.RayExecutor`, the Ray
  implementation of the core's executor interface (``cupid_engine.executor``) that the
  featuriser and the rollouts take, on a fault-tolerant actor pool; ``executor_for(workers,
  address)`` is the choice the CLI makes from ``--workers``/``--ray-address``.
* ``featurize``: :func:`~cupid_engine.distributed.featurize.featurize_distributed`, the
  featuriser's shard loop on a Ray executor, with per-worker statistics.

Nothing is imported eagerly: ``import cupid_engine.distributed`` neither imports ray nor
any submodule; attributes below load their submodule on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "RayExecutor": "cupid_engine.distributed.executor",
    "executor_for": "cupid_engine.distributed.executor",
    "featurize_distributed": "cupid_engine.distributed.featurize",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cupid_engine.distributed' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
