"""Subset trainings on Ray actors (the regression datamodel estimator and LDS).

Each actor receives the subset function once (a picklable
:class:`~cupid_engine.datamodels.regression.SubsetTrainer`: configs, samples,
clusters and the metric; trained models never cross processes) and evaluates masks one
at a time, whichever actor is free taking the next mask. A training depends only on its
mask and the (seeded) configs, so the schedule never changes the numbers: results equal
the in-process ones and are reported by mask index.

A local Ray instance is started (and shut down afterwards) unless one is already running
or ``address`` names a cluster to join. Ray is imported only inside these functions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cupid_engine.distributed._ray import ensure_ray, run_on_actors

logger = logging.getLogger(__name__)


class _SubsetActor:
    """Ray actor body: holds the subset function, evaluates one mask per call."""

    def __init__(self, fn: Any, threads: int) -> None:
        import torch

        # Several actors share the machine's cores: one intra-op pool each avoids
        # oversubscription (tiny models slow down badly with contended threads).
        torch.set_num_threads(int(threads))
        self.fn = fn

    def run(self, index: int, mask: np.ndarray) -> tuple[int, np.ndarray]:
        value = np.atleast_1d(np.asarray(self.fn(mask), dtype=np.float64)).reshape(-1)
        return index, value


def train_subsets(
    fn: Any,
    masks: Sequence[np.ndarray],
    *,
    workers: int,
    address: str | None = None,
    threads_per_worker: int = 1,
    on_result: Callable[[int, np.ndarray], None] | None = None,
) -> list[np.ndarray]:
    """Evaluate ``fn(mask)`` for every mask on ``workers`` Ray actors.

    Args:
        fn: Picklable subset function ``mask [C] -> value(s)``.
        masks: ``S`` bool masks.
        workers: Number of actors W (one CPU each).
        address: Ray cluster address; None starts/uses a local instance.
        threads_per_worker: torch intra-op threads in each actor.
        on_result: Called in the driver with ``(index, value [n_targets])`` as each
            training finishes (completion order): the caller caches it at once, so a
            killed run keeps every finished training.

    Returns:
        ``S`` float64 arrays ``[n_targets]``, ordered as ``masks``.
    """
    if not masks:
        return []
    started = ensure_ray(address, workers)
    import ray

    actors: list[Any] = []
    try:
        actor_cls = ray.remote(num_cpus=1)(_SubsetActor)
        fn_ref = ray.put(fn)
        n_actors = min(int(workers), len(masks))
        actors = [actor_cls.remote(fn_ref, threads_per_worker) for _ in range(n_actors)]
        results = run_on_actors(
            actors,
            len(masks),
            lambda actor, i: actor.run.remote(i, np.asarray(masks[i], dtype=bool)),
            on_result=on_result,
        )
        return [r for r in results if r is not None]
    finally:
        # Also on failure: actors on a shared (already running) Ray must not linger.
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()
