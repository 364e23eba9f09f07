"""The Ray executor: items on a fault-tolerant pool of Ray actors (``cupid_engine.executor``).

Each actor calls the worker factory once (the factory is put into the object store once,
not serialised per actor) and then runs items one at a time; the pool
(:class:`~cupid_engine.distributed._ray.WorkerPool`) keeps the queue, re-queues the items of
a worker (or node) that dies onto survivors, replaces lost workers while allowed, and
starts with the workers the cluster can place. Items are independent and their results do
not depend on the schedule, so any number of workers gives the results of one.

A local Ray instance is started for each :meth:`RayExecutor.map` (and shut down after it)
unless Ray is already running in this process or ``address`` names a cluster to join.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from cupid_engine.distributed._ray import WorkerPool, credentials_env, ensure_ray, pool_size
from cupid_engine.errors import ConfigError
from cupid_engine.executor import Executor, InProcess, WorkerFactory, peak_rss_kb

__all__ = ["RayExecutor", "executor_for"]


class _Actor:
    """Ray actor body: one worker built by its factory, applied to one item per call."""

    def __init__(self, factory: WorkerFactory) -> None:
        self.fn = factory()

    def info(self) -> dict[str, Any]:
        """``{"pid", "peak_rss_kb", "host", "node_id"}`` of this worker process."""
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        return {"pid": os.getpid(), "peak_rss_kb": peak_rss_kb(), "host": os.uname().nodename, "node_id": node}

    def call(self, item: Any) -> Any:
        return self.fn(item)


class RayExecutor(Executor):
    """Runs items on ``workers`` Ray actors (one CPU each, plus ``gpus`` per :meth:`map`).

    Args:
        workers: Actors to start (capped by the items and by what the cluster holds).
        address: Ray cluster to join (None: a local instance with ``workers`` CPUs).
        max_restarts: Replacement workers started over one map after workers die.
        max_task_retries: Times an item may lose its worker (dead process or node) and be
            re-queued to a survivor; beyond that the map fails naming the items.
        in_flight: Items queued per actor (keeps workers busy between items).
        start_timeout: Seconds to wait for workers to be placed; the pool runs with those
            that started, and raises a ``TimeoutError`` naming the missing resources when
            none can start.
        on_workers: Called with every started actor's ``info()`` (pid, peak RSS, host,
            node id) before items are dispatched (monitoring, fault-injection tests).

    After each :meth:`map`, :attr:`report` holds ``{"workers": {pid: peak_rss_kb},
    "lost_workers", "dispatch_seconds" (first item to last result)}``.
    """

    def __init__(self, workers: int = 2, address: str | None = None, *, max_restarts: int = 3,
                 max_task_retries: int = 3, in_flight: int = 2, start_timeout: float = 120.0,
                 on_workers: Callable[[list[dict[str, Any]]], None] | None = None) -> None:
        if int(workers) < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers, self.address = int(workers), address
        self.max_restarts, self.max_task_retries = int(max_restarts), int(max_task_retries)
        self.in_flight, self.start_timeout, self.on_workers = int(in_flight), float(start_timeout), on_workers
        self.report: dict[str, Any] = {"workers": {}, "lost_workers": 0, "dispatch_seconds": 0.0}

    @property
    def local(self) -> bool:
        return self.address is None

    def _run(self, factory: WorkerFactory, items: list[Any], done: Callable[[int, Any], None], gpus: int) -> None:
        """Items on the actor pool (see :meth:`cupid_engine.executor.Executor.map`).

        Raises:
            RuntimeError: an item's own error (naming the item), or items that lost their
                worker more than ``max_task_retries`` times.
            TimeoutError: no worker could be placed within ``start_timeout``.
        """
        self.report = {"workers": {}, "lost_workers": 0, "dispatch_seconds": 0.0}
        position = {item: i for i, item in enumerate(items)}
        if len(position) != len(items):
            raise ValueError("executor items must be distinct (each is scheduled and retried by itself)")
        started = ensure_ray(self.address, self.workers, env=credentials_env())
        import ray

        pool = None
        try:
            per_worker = {"CPU": 1.0, **({"GPU": float(gpus)} if gpus else {})}
            # Ray never restarts or retries on its own (max_restarts=0): the pool re-queues a
            # lost worker's items itself, so they run on survivors instead of waiting for a
            # restart that a shrunken cluster may never place.
            actor_cls = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=0, max_task_retries=0)(_Actor)
            factory_ref = ray.put(factory)
            pool = WorkerPool(
                lambda: actor_cls.remote(factory_ref),
                lambda a: a.info.remote(),
                lambda a, item: a.call.remote(item),
                per_worker=per_worker, max_retries=self.max_task_retries, max_restarts=self.max_restarts,
                start_timeout=self.start_timeout, in_flight=self.in_flight,
            )
            pool.start(pool_size(self.workers, len(items), per_worker), self.on_workers)
            for info in pool.actors.values():
                self.report["workers"][info["pid"]] = info["peak_rss_kb"]
            t0 = time.perf_counter()
            pool.run(items, lambda item, value: done(position[item], value))
            self.report["dispatch_seconds"] = time.perf_counter() - t0
            for info in pool.infos():
                self.report["workers"][info["pid"]] = info["peak_rss_kb"]
            self.report["lost_workers"] = len(pool.lost)
        finally:
            # Actors hold a policy, a simulator or a store each: never leave them behind.
            if pool is not None:
                pool.shutdown()
            if started:
                ray.shutdown()

    def __repr__(self) -> str:
        return f"RayExecutor(workers={self.workers}, address={self.address!r})"


def executor_for(workers: int = 1, address: str | None = None) -> Executor:
    """The executor that ``--workers``/``--ray-address`` ask for: :class:`InProcess` for one
    worker and no cluster, else a :class:`RayExecutor`."""
    if int(workers) < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}", where="--workers")
    if int(workers) == 1 and address is None:
        return InProcess()
    return RayExecutor(int(workers), address)
