"""Subset trainings on Ray actors (the regression datamodel estimator and LDS).

Each worker receives the subset function once (a picklable
:class:`~cupid_engine.datamodels.regression.SubsetTrainer`: configs, samples,
clusters and the metric; trained models never cross processes) with the masks, and
evaluates masks one at a time, whichever worker is free taking the next one, on a
:class:`~cupid_engine.distributed.executor.RayExecutor` (a worker that dies has its masks
re-queued to a survivor). A training depends only on its mask and the (seeded) configs,
so the schedule never changes the numbers: results equal the in-process ones and are
reported by mask index.

A local Ray instance is started (and shut down afterwards) unless one is already running
or ``address`` names a cluster to join. Ray is imported only inside the executor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cupid_engine.distributed.executor import RayExecutor


class _SubsetWorker:
    """One worker: holds the subset function and the masks, evaluates one mask index per call."""

    def __init__(self, fn: Any, masks: list[np.ndarray], threads: int) -> None:
        import torch

        # Several workers share the machine's cores: one intra-op pool each avoids
        # oversubscription (tiny models slow down badly with contended threads).
        torch.set_num_threads(int(threads))
        self.fn, self.masks = fn, masks

    def __call__(self, index: int) -> np.ndarray:
        return np.atleast_1d(np.asarray(self.fn(self.masks[index]), dtype=np.float64)).reshape(-1)


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
    factory = functools.partial(_SubsetWorker, fn, [np.asarray(m, dtype=bool) for m in masks], threads_per_worker)
    return RayExecutor(workers, address).map(factory, list(range(len(masks))), on_result=on_result)
