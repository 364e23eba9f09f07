"""Where shard work runs: the executor protocol, and the in-process executor.

The featuriser (store shards) and the rollouts (seeded episodes) split their work into
independent *items* whose results do not depend on where or in which order they run. They
hand the items to an :class:`Executor` given by their caller instead of choosing one
themselves: :class:`InProcess` (the default) runs them here, one after another;
``cupid_engine.distributed.RayExecutor`` runs them on Ray actors (the CLI picks it from
``--workers``/``--ray-address``, see ``cupid_engine.distributed.executor_for``).

A worker is made by a *factory*: a zero-argument callable, called once per worker process,
that loads what the worker keeps across items (a policy, a store handle, a simulator) and
returns the function applied to each item. An executor that runs workers in other
processes pickles the factory, so it must name what to load (checkpoint paths, store
URLs), never hold live models; :attr:`Executor.in_process` tells the caller which kind it
has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

__all__ = ["Executor", "InProcess", "WorkerFactory", "peak_rss_kb"]

T = TypeVar("T")
R = TypeVar("R")

WorkerFactory = Callable[[], Callable[[Any], Any]]
"""``factory() -> fn``: builds one worker's state once; ``fn(item) -> result`` per item.
A worker function with a ``close()`` method is closed when the executor is done with it."""


@runtime_checkable
class Executor(Protocol):
    """Runs a worker function over independent items.

    Attributes:
        workers: Items run at once (1 for :class:`InProcess`).
        in_process: Workers run in this process: their factory may hold live objects
            (a policy object, an open store) and is never pickled.
        local: Every worker runs on this machine (False when joining a cluster).
    """

    workers: int
    in_process: bool
    local: bool

    def map(
        self,
        factory: WorkerFactory,
        items: Sequence[Any],
        *,
        on_result: Callable[[Any, Any], None] | None = None,
        gpus: int = 0,
    ) -> list[Any]:
        """Run ``fn(item)`` for every item, each exactly once to success.

        Args:
            factory: Builds a worker (see :data:`WorkerFactory`).
            items: Distinct, hashable items (shard ids, ``(seed, episode_id)`` pairs): the
                unit of scheduling and of retry.
            on_result: Called in this process with ``(item, result)`` as each item
                finishes (completion order).
            gpus: GPUs each worker needs (0: CPU only).

        Returns:
            The results, ordered as ``items``.
        """
        ...


class InProcess:
    """Runs every item in this process, in order, on one worker built once (the default)."""

    workers = 1
    in_process = True
    local = True

    def map(
        self,
        factory: WorkerFactory,
        items: Sequence[Any],
        *,
        on_result: Callable[[Any, Any], None] | None = None,
        gpus: int = 0,
    ) -> list[Any]:
        """See :meth:`Executor.map`; ``gpus`` is the caller's business here (the factory
        already placed its model)."""
        if not items:
            return []
        fn = factory()
        out = []
        try:
            for item in items:
                result = fn(item)
                out.append(result)
                if on_result is not None:
                    on_result(item, result)
        finally:
            close = getattr(fn, "close", None)
            if close is not None:
                close()
        return out

    def __repr__(self) -> str:
        return "InProcess()"


def peak_rss_kb() -> int:
    """This process's peak resident set size (``VmHWM``) in KiB (-1 when unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1
