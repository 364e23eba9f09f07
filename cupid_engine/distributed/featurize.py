"""Featurisation on Ray actors: whole store shards per task, resumable, fault tolerant.

Why actors: a worker loads the policy once (from a checkpoint *path*; models are never
pickled) and keeps its store handle and featuriser across many shards. Each task is one
shard of the store's plan (aligned to the source's natural units by
``featurize.pipeline.register_episodes``), written by exactly one worker into disjoint
chunk-aligned regions, completion marker last (DESIGN §4), so:

* **Scheduling never changes the numbers.** A shard's features depend only on its
  episodes, and the Gram is reduced in shard order by ``Run.finalize``: any number of
  workers gives the same store as one.
* **Failures are retried.** Actors are created with ``max_restarts`` and
  ``max_task_retries``: when a worker process dies (OOM, SIGKILL, lost node), Ray restarts
  it and re-runs its unfinished tasks; a half-written shard has no marker and is simply
  written again, whole.
* **Re-submission skips finished work.** The driver asks the run for pending shards, and a
  worker re-checks a shard's marker before doing anything.

The driver holds no features and no per-episode catalog data: only the store's shard
plan (O(#shards)), the list of pending shard ids, one unit name per shard, and per-task
statistics (rows, seconds, the worker's peak RSS from ``/proc/self/status``
``VmHWM``). A worker reads the catalog rows of the shard it writes and nothing else, so
neither side's memory grows with the episode count.

``FeaturizeWorker`` follows the Ray callable-class convention (``__init__(config)``,
``__call__(batch: dict[str, ndarray])``), so it also works with ``ray.data.map_batches``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cupid_engine.distributed._ray import WorkerPool, credentials_env, ensure_ray, pool_size

log = logging.getLogger(__name__)

__all__ = ["FeaturizeWorker", "featurize_distributed", "peak_rss_kb"]


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


class FeaturizeWorker:
    """Featurise whole store shards (one Ray actor, or in-process for tests).

    Args:
        config: ``{"policy_path": str, "featurize": FeaturizeConfig.to_dict(),
            "store": store URL, "run": run name, "source": dataset path (when ``source``
            is None), "threads": torch intra-op threads (default 1), "device": where the
            policy runs (optional; ``cuda`` actors reserve one GPU each)}``.
        source: The ``EpisodeSource`` object itself (e.g. a ``ray.put`` reference resolved
            by Ray), overriding ``config["source"]``.
    """

    def __init__(self, config: dict[str, Any], source: Any = None) -> None:
        import torch

        from cupid_engine.featurize.config import FeaturizeConfig
        from cupid_engine.featurize.featurizer import Featurizer
        from cupid_engine.policies import load_policy, policy_hash
        from cupid_engine.store import GradientStore

        torch.set_num_threads(int(config.get("threads", 1)))
        if config.get("storage_options"):
            from cupid_engine.store.options import apply_storage_options

            apply_storage_options(config["storage_options"], config["store"], config.get("source"))
        self.config = FeaturizeConfig.from_dict(config["featurize"])
        path = config["policy_path"]
        policy = load_policy(path)
        if config.get("device"):
            policy = policy.to(config["device"])
        self.featurizer = Featurizer.from_config(policy, self.config, policy_hash=policy_hash(path))
        self.store = GradientStore.open(config["store"], mode="r+")
        self.run_name = config["run"]
        if source is None:
            source = config["source"]
        if isinstance(source, (str, os.PathLike)):
            from cupid_engine.data import open_source

            source = open_source(source)
        self.source = source

    def info(self) -> dict[str, Any]:
        """``{"pid", "peak_rss_kb", "host", "node_id"}`` of this worker process."""
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        return {"pid": os.getpid(), "peak_rss_kb": peak_rss_kb(), "host": os.uname().nodename, "node_id": node}

    def featurize_shard(self, shard_id: int, unit: str | None = None) -> dict[str, Any]:
        """Featurise and write one shard (skipped when its marker exists).

        Returns:
            ``featurize_shard`` statistics plus ``pid`` and ``peak_rss_kb``.
        """
        from cupid_engine.featurize.pipeline import featurize_shard

        stats = featurize_shard(
            self.store, self.run_name, int(shard_id), self.source, self.featurizer,
            unit=unit, batch_size=self.config.batch_size,
        )
        stats.update(pid=os.getpid(), peak_rss_kb=peak_rss_kb())
        return stats

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data style: ``{"shard": [n] int, "unit": [n] str (optional)}`` -> per-shard stats."""
        units = batch.get("unit")
        out = [
            self.featurize_shard(int(s), None if units is None or not units[i] else str(units[i]))
            for i, s in enumerate(batch["shard"])
        ]
        keys = ("shard", "episodes", "rows", "seconds", "skipped", "pid", "peak_rss_kb")
        return {key: np.asarray([o[key] for o in out]) for key in keys}


def featurize_distributed(
    source: Any,
    store: Any,
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
    prepare_run``; :func:`cupid_engine.featurize.featurize` does both and calls this).

    Args:
        source: ``EpisodeSource`` (sent to each actor once) or dataset path.
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
    import ray

    from cupid_engine.featurize.pipeline import shard_units
    from cupid_engine.store import GradientStore

    storage_options = dict(storage_options or {})
    if not isinstance(store, GradientStore):
        store = GradientStore.open(store, mode="r+")
    run = store.run(run_name)
    todo = list(run.pending_shards() if shards is None else shards)
    started = ensure_ray(address, workers, env=credentials_env())
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"shards": 0, "episodes": 0, "rows": 0, "skipped": 0, "workers": {}, "lost_workers": 0}
    pool = None
    try:
        if not todo:
            return summary
        units = shard_units(source, store, todo)
        is_path = isinstance(source, (str, os.PathLike))
        worker_config = {
            "policy_path": str(policy_path), "featurize": config.to_dict(), "store": store.url, "run": run_name,
            "source": str(source) if is_path else None, "threads": int(threads_per_worker), "device": device,
            "storage_options": storage_options,
        }
        # The source object is serialised once into the object store, not once per actor.
        source_ref = None if is_path else ray.put(source)
        gpus = 1 if device is not None and device.startswith("cuda") else 0
        per_worker = {"CPU": 1.0, **({"GPU": 1.0} if gpus else {})}
        # Ray never restarts or retries on its own (max_restarts=0): the pool re-queues a
        # lost worker's shards itself, so they run on survivors instead of waiting for a
        # restart that a shrunken cluster may never place.
        Actor = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=0, max_task_retries=0)(FeaturizeWorker)
        pool = WorkerPool(
            lambda: Actor.remote(worker_config, source_ref),
            lambda a: a.info.remote(),
            lambda a, s: a.featurize_shard.remote(s, units.get(s)),
            per_worker=per_worker, max_retries=max_task_retries, max_restarts=max_restarts,
            start_timeout=start_timeout, in_flight=in_flight,
        )
        pool.start(pool_size(workers, len(todo), per_worker), on_workers)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=int(store.shard_plan().counts()[todo].sum()), unit="ep",
                       desc=f"featurize {run_name} ({len(pool.actors)} workers)")
        t_dispatch = time.perf_counter()

        def on_result(shard: int, stats: dict[str, Any]) -> None:
            summary["shards"] += 1
            summary["episodes"] += stats["episodes"]
            summary["rows"] += stats["rows"]
            summary["skipped"] += int(stats["skipped"])
            summary["workers"][stats["pid"]] = stats["peak_rss_kb"]
            if bar is not None:
                bar.update(stats["episodes"])

        try:
            pool.run(todo, on_result)
        finally:
            if bar is not None:
                bar.close()
        summary["dispatch_seconds"] = time.perf_counter() - t_dispatch
        for info in pool.infos():
            summary["workers"][info["pid"]] = info["peak_rss_kb"]
        summary["lost_workers"] = len(pool.lost)
    finally:
        if pool is not None:
            pool.shutdown()
        summary["seconds"] = time.perf_counter() - t0
        summary["driver_peak_rss_kb"] = peak_rss_kb()
        if started:
            ray.shutdown()
    return summary
