"""Where shard work runs: the executor interface, and the executors of this machine.

The featuriser (store shards) and the rollouts (seeded episodes) split their work into
independent *items* whose results do not depend on where or in which order they run. They
hand the items to an :class:`Executor` given by their caller instead of choosing one
themselves: :class:`InProcess` (the default) runs them here, one after another;
:class:`Processes` in spawned processes of this machine (a process environment of their
own, e.g. an offscreen renderer); ``cupid_engine.distributed.RayExecutor`` on Ray actors
(the CLI picks it from ``--workers``/``--ray-address``, see
``cupid_engine.distributed.executor_for``).

A worker is made by a *factory*: a zero-argument callable, called once per worker process,
that loads what the worker keeps across items (a policy, a store handle, a simulator) and
returns the function applied to each item. An executor that runs workers in other
processes pickles the factory, so it must name what to load (checkpoint paths, store
URLs), never hold live models; :attr:`Executor.in_process` tells the caller which kind it
has.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["Executor", "InProcess", "Processes", "WorkerFactory", "peak_rss_kb"]

WorkerFactory = Callable[[], Callable[[Any], Any]]
"""``factory() -> fn``: builds one worker's state once; ``fn(item) -> result`` per item.
A worker function with a ``close()`` method is closed when the executor is done with it."""


class Executor(abc.ABC):
    """Runs a worker function over independent items; subclasses say where (:meth:`_run`).

    Attributes:
        workers: Items run at once (1 for :class:`InProcess`).
        in_process: Workers run in this process: their factory may hold live objects
            (a policy object, an open store) and is never pickled.
        local: Every worker runs on this machine (False when joining a cluster).
    """

    workers: int = 1
    in_process: bool = False
    local: bool = True

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
        items = list(items)
        out: list[Any] = [None] * len(items)

        def done(i: int, result: Any) -> None:
            out[i] = result
            if on_result is not None:
                on_result(items[i], result)

        if items:
            self._run(factory, items, done, int(gpus))
        return out

    @abc.abstractmethod
    def _run(self, factory: WorkerFactory, items: list[Any], done: Callable[[int, Any], None], gpus: int) -> None:
        """Run every item once to success; ``done(index, result)`` in this process as each finishes."""


class InProcess(Executor):
    """Runs every item in this process, in order, on one worker built once (the default).

    ``gpus`` is the caller's business here: the factory already placed its model.
    """

    in_process = True

    def _run(self, factory: WorkerFactory, items: list[Any], done: Callable[[int, Any], None], gpus: int) -> None:
        fn = factory()
        try:
            for i, item in enumerate(items):
                done(i, fn(item))
        finally:
            close = getattr(fn, "close", None)
            if close is not None:
                close()

    def __repr__(self) -> str:
        return "InProcess()"


_WORKER: dict[str, Any] = {}
"""The worker of this process, in a process :class:`Processes` spawned."""


def _start_worker(factory: WorkerFactory, env: Mapping[str, str]) -> None:
    os.environ.update(env)  # before the factory imports anything that reads them
    _WORKER["fn"] = factory()
    close = getattr(_WORKER["fn"], "close", None)
    if close is not None:
        import atexit

        # Closed explicitly at exit: resources torn down by the garbage collector (an EGL
        # context) complain.
        atexit.register(close)


def _run_item(item: Any) -> Any:
    return _WORKER["fn"](item)


class Processes(Executor):
    """Runs items in ``workers`` spawned processes of this machine, each with one worker.

    Each process sets ``env`` in its environment, then builds its worker once (the
    factory is pickled to it) and takes items as they come; results come back in item
    order. A process that dies fails the map (no retry: use a Ray executor for that).

    Args:
        workers: Processes to spawn (at most one per item).
        env: Environment variables set in each process before its worker is built.
    """

    def __init__(self, workers: int = 2, *, env: Mapping[str, str] | None = None) -> None:
        if int(workers) < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers, self.env = int(workers), dict(env or {})

    def _run(self, factory: WorkerFactory, items: list[Any], done: Callable[[int, Any], None], gpus: int) -> None:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        if gpus:
            raise ValueError("Processes reserves no GPUs; use a Ray executor for GPU workers")
        with ProcessPoolExecutor(max_workers=min(self.workers, len(items)), initializer=_start_worker,
                                 initargs=(factory, self.env), mp_context=multiprocessing.get_context("spawn")) as pool:
            position = {pool.submit(_run_item, item): i for i, item in enumerate(items)}
            pending = set(position)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    done(position[fut], fut.result())

    def __repr__(self) -> str:
        return f"Processes(workers={self.workers})"


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
