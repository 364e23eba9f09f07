"""Featurisation on Ray actors: whole store shards per task, resumable, fault tolerant.

:func:`featurize_distributed` is the featuriser's shard loop
(:func:`cupid_engine.featurize.pipeline.featurize_shards`) on a
:class:`~cupid_engine.distributed.executor.RayExecutor`, with the statistics a benchmark
or an operator wants. Each worker loads the policy once (from a checkpoint *path*; models
are never pickled) and keeps its store handle and featuriser across many shards. Each
task is one shard of the store's plan (aligned to the source's natural units by
``featurize.pipeline.register_episodes``), written by exactly one worker into disjoint
chunk-aligned regions, completion marker last (DESIGN §4), so:

* **Scheduling never changes the numbers.** A shard's features depend only on its
  episodes, and the Gram is reduced in shard order by ``Run.finalize``: any number of
  workers gives the same store as one.
* **Failures are retried.** A shard whose worker process (or node) dies is re-queued to a
  survivor and lost workers are replaced (``max_restarts``, ``max_task_retries``); a
  half-written shard has no marker and is simply written again, whole.
* **Re-submission skips finished work.** The driver asks the run for pending shards, and a
  worker re-checks a shard's marker before doing anything.

The driver holds no features and no per-episode catalog data: only the store's shard
plan (O(#shards)), the list of pending shard ids, one unit name per shard, and per-task
statistics. A worker reads the catalog rows of the shard it writes and nothing else, so
neither side's memory grows with the episode count.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from cupid_engine.distributed.executor import RayExecutor
from cupid_engine.executor import peak_rss_kb
from cupid_engine.store import GradientStore

__all__ = ["featurize_distributed", "peak_rss_kb"]


def featurize_distributed(
    source: Any,
    store: GradientStore | str | os.PathLike,
    run_name: str,
    *,
    policy_path: str,
    config: Any,
    shards: Sequence[int] | None = None,
    workers: int = 2,
    address: str | None = None,
    progress: bool = True,
    threads_per_worker: int = 1,
    max_restarts: int = 3,
    max_task_retries: int = 3,
    in_flight: int = 2,
    on_workers: Callable[[list[dict[str, Any]]], None] | None = None,
    device: str | None = None,
    start_timeout: float = 120.0,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Featurise pending shards of an existing run on ``workers`` Ray actors.

    The run must already exist with its episodes registered (``featurize.pipeline.
    prepare_run``; :func:`cupid_engine.featurize.featurize` with a Ray executor does both).

    Args:
        source: ``EpisodeSource`` (sent to the actors once) or dataset path.
        store: :class:`GradientStore` or its URL (must be reachable by every worker).
        run_name: The run.
        policy_path: Checkpoint directory every worker loads.
        config: The :class:`FeaturizeConfig` the run was created with.
        shards: Shards to do (default: the run's pending shards).
        workers: Number of actors.
        address: Ray cluster address (None: start a local instance with ``workers`` CPUs,
            shut down afterwards).
        progress: tqdm bar over episodes.
        threads_per_worker: torch intra-op threads per actor.
        max_restarts: Replacement workers started over the run after workers die.
        max_task_retries: Times a shard may lose its worker (dead process or node) and be
            re-queued to a survivor; beyond that the run fails naming the shards.
        in_flight: Tasks queued per actor (keeps workers busy between tasks).
        on_workers: Called with every started actor's ``info()`` (pid, peak RSS, host,
            node id) before work is dispatched (monitoring, fault-injection tests).
        device: Where each actor runs the policy (None: CPU); a ``cuda`` device makes
            each actor ask Ray for one GPU.
        start_timeout: Seconds to wait for workers to be placed; the pool is capped at
            what the cluster holds, runs with the workers that started, and raises a
            ``TimeoutError`` naming the missing resources when none can start.
        storage_options: fsspec options of a remote store and dataset (endpoint,
            credentials...), passed to every worker; AWS/GCS credential variables of the
            driver's environment are forwarded in the Ray ``runtime_env``.

    Returns:
        ``{"shards", "episodes", "rows", "skipped", "seconds" (all, Ray start included),
        "dispatch_seconds" (first task to last result), "workers": {pid: peak_rss_kb},
        "lost_workers", "driver_peak_rss_kb"}``.
    """
    from cupid_engine.featurize.shards import featurize_shards

    if not isinstance(store, GradientStore):
        store = GradientStore.open(store, mode="r+")
    todo = list(store.run(run_name).pending_shards() if shards is None else shards)
    executor = RayExecutor(workers, address, max_restarts=max_restarts, max_task_retries=max_task_retries,
                           in_flight=in_flight, start_timeout=start_timeout, on_workers=on_workers)
    t0 = time.perf_counter()
    summary = featurize_shards(
        source, store, run_name, todo, config=config, executor=executor, policy_path=str(policy_path),
        device=device, threads=threads_per_worker, storage_options=storage_options, progress=progress,
    )
    return {**summary, **executor.report, "seconds": time.perf_counter() - t0, "driver_peak_rss_kb": peak_rss_kb()}
