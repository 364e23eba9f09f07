"""Parallel policy rollouts on Ray actors, each holding one robosuite environment.

Each actor wraps a :class:`cupid_engine.sim.rollout.RolloutWorker`: it builds its
environment once (≈1 s) and loads the policy once, from a checkpoint path or a picklable
zero-argument factory (models themselves are never pickled). Episodes are handed out one
at a time to whichever actor is free, so slow (long) episodes do not stall a static shard;
because an episode depends only on its seed, the schedule never changes the results, and
they are returned ordered by episode index.

A local Ray instance is started (and shut down afterwards) unless one is already running
or ``address`` names a cluster to join.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from cupid_engine.data.episode import Episode
from cupid_engine.distributed._ray import ensure_ray, run_on_actors

logger = logging.getLogger(__name__)


class _RolloutActor:
    """Ray actor body: one RolloutWorker (environment + policy) per actor process."""

    def __init__(self, task: str, policy: Any, horizon: int, variation: Any):
        from cupid_engine.sim.rollout import RolloutWorker

        self.worker = RolloutWorker(task, policy, horizon=horizon, variation=variation)

    def run_one(self, index: int, seed: int, episode_id: str) -> tuple[int, Episode]:
        return index, self.worker.run_one(seed, episode_id)


def run_rollouts_ray(
    policy: Any,
    task: str,
    *,
    seeds: Sequence[int],
    episode_ids: Sequence[str],
    workers: int,
    horizon: int,
    variation: Any = None,
    address: str | None = None,
    progress: Callable[[Episode], None] | None = None,
) -> list[Episode]:
    """Run ``len(seeds)`` rollouts on ``workers`` Ray actors.

    Args:
        policy: Checkpoint path (str/PathLike) or picklable zero-argument factory.
        task: Canonical task name.
        seeds: Episode seeds, one per episode.
        episode_ids: Episode ids, one per episode.
        workers: Number of actors W (each takes one CPU).
        horizon: Step limit per episode.
        variation: ``cupid_engine.sim.tasks.Variation`` or None.
        address: Ray cluster address; None starts/uses a local instance.
        progress: Called with each finished episode (completion order).

    Returns:
        Episodes ordered as ``seeds``.
    """
    if len(seeds) != len(episode_ids):
        raise ValueError("seeds and episode_ids differ in length")
    if isinstance(policy, os.PathLike):
        policy = os.fspath(policy)
    if not seeds:
        return []
    started = ensure_ray(address, workers)
    import ray

    actors: list[Any] = []
    try:
        actor_cls = ray.remote(num_cpus=1)(_RolloutActor)
        n_actors = min(int(workers), len(seeds))
        actors = [actor_cls.remote(task, policy, int(horizon), variation) for _ in range(n_actors)]
        results = run_on_actors(
            actors,
            len(seeds),
            lambda actor, i: actor.run_one.remote(i, int(seeds[i]), str(episode_ids[i])),
            on_result=None if progress is None else (lambda i, episode: progress(episode)),
        )
        return [ep for ep in results if ep is not None]
    finally:
        # Actors hold a simulator each: never leave them behind, even on an error.
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()
