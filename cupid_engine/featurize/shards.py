"""Step 3 of the featuriser: store shards featurised and written, one by one or on an executor.

:func:`featurize_shard` is the unit of work: read a shard's episodes (checked against
the catalog), cut samples, featurise them in batches of ``batch_size`` that cross episode
boundaries, write the whole shard, completion marker last. At most one shard's step
features are in memory. :func:`featurize_shards` hands many shards to an executor
(``cupid_engine.executor``): in this process by default, with the live featuriser, or on
the workers of the executor the caller gives (``cupid_engine.distributed.RayExecutor``),
each building its featuriser once from a :class:`ShardWorker` recipe. A shard's features
depend only on its episodes, so the executor never changes the numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from cupid_engine import ops
from cupid_engine.errors import ContentChangedError, DataError
from cupid_engine.executor import Executor, InProcess
from cupid_engine.featurize.config import FeaturizeConfig
from cupid_engine.featurize.featurizer import Featurizer
from cupid_engine.featurize.register import _reading, _where, shard_units
from cupid_engine.policies.task import batch_rows, task_uses_draws
from cupid_engine.store import GradientStore
from cupid_engine.store.catalog import fingerprint_of

__all__ = ["ShardWorker", "ShardWriter", "compute_shard_features", "featurize_shard", "featurize_shards"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- one shard
def _read_shard_episodes(source: Any, ids: list[str], unit: str | None) -> list:
    wanted = set(ids)
    found = {ep.episode_id: ep for ep in _reading(source, unit, ids) if ep.episode_id in wanted}
    missing = [e for e in ids if e not in found]
    if missing:
        raise DataError(f"episodes {missing[:5]} of the store catalog are not in the dataset",
                        where=_where(source, unit), hint="featurise the dataset these episodes came from")
    return [found[e] for e in ids]


def _episode_at(starts: np.ndarray, episodes: list, row: int) -> tuple[str, int]:
    i = int(np.searchsorted(starts, row, side="right")) - 1
    return episodes[i].episode_id, row - int(starts[i])


def _batches(episodes: list, featurizer: Featurizer, batch_size: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """``(first row, batch)`` of exactly ``batch_size`` consecutive step rows (the last
    fewer), in episode then step order, crossing episode boundaries.

    Batches come from the task's ``build_batch`` on groups of whole episodes; rows left
    over after a batch are carried into the next, so at most one batch plus one episode
    group is held at a time, and every batch holds the same rows as slicing the samples
    of the whole shard would (same features to the bit for a given batch composition).
    """
    task, model = featurizer.task, featurizer.policy
    device = next(iter(model.parameters()), torch.empty(0)).device
    pending: dict[str, torch.Tensor] | None = None
    have, emitted, i = 0, 0, 0
    while i < len(episodes) or have:
        while have < batch_size and i < len(episodes):
            group, rows = [], 0
            while i < len(episodes) and (not group or have + rows < batch_size):
                group.append(episodes[i])
                rows += episodes[i].length
                i += 1
            where = f"episodes {group[0].episode_id!r}..{group[-1].episode_id!r}"
            built = task.build_batch(group)
            got = batch_rows(built, where=f"{type(task).__name__}.build_batch({where})")
            if got != rows:
                raise DataError(
                    f"{type(task).__name__}.build_batch returned {got} rows for {rows} steps; the policy protocol "
                    "needs one row per step, in episode then step order", where=where,
                    hint="fix the task's build_batch",
                )
            built = {k: v.to(device) for k, v in built.items()}
            pending = built if pending is None else {k: torch.cat((pending[k], built[k])) for k in built}
            have += rows
        take = min(batch_size, have)
        batch = {k: v[:take] for k, v in pending.items()}
        pending = {k: v[take:] for k, v in pending.items()}
        have -= take
        yield emitted, batch
        emitted += take


def samples_per_batch(config: FeaturizeConfig, featurizer: Featurizer) -> int:
    """``config.batch_size``, capped for a draw-using output so that one forward/backward
    holds at most ``config.max_rows`` (sample x draw) rows: activation memory grows with
    rows, and 64 draws x 1024 samples of even a tiny UNet is tens of GB."""
    if not task_uses_draws(featurizer.task):
        return config.batch_size
    return max(1, min(config.batch_size, config.max_rows // featurizer.draws))


def compute_shard_features(
    episodes: list, featurizer: Featurizer, *, batch_size: int
) -> np.ndarray:
    """``[rows, k]`` float32 features of the episodes' steps, in episode then step order.

    The task's batches are featurised ``batch_size`` rows at a time, crossing episode
    boundaries (:func:`_batches`).

    Raises:
        DataError: non-finite features, naming the episode and step; a batch builder
            that does not return one row per step.
    """
    lengths = np.array([ep.length for ep in episodes], dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])) if len(lengths) else np.zeros(0, np.int64)
    n = int(lengths.sum())
    out = np.empty((n, featurizer.k), np.float32)
    for a, batch in _batches(episodes, featurizer, batch_size):
        phi = featurizer(batch, check_finite=False)  # on the model's device
        bad = ops.nonfinite_rows(phi)
        if bool(bad.any()):
            eid, step = _episode_at(starts, episodes, a + int(bad.nonzero()[0, 0]))
            raise DataError(
                f"episode {eid!r} step {step}: non-finite feature (NaN/Inf gradient); "
                "nothing of its shard was written",
                hint="check the policy checkpoint and the episode's values for NaN/Inf",
            )
        out[a : a + phi.shape[0]] = phi.detach().to(torch.float32).cpu().numpy()
    return out


def featurize_shard(
    store: GradientStore,
    run_name: str,
    shard_id: int,
    source: Any,
    featurizer: Featurizer,
    *,
    unit: str | None = None,
    batch_size: int = 1024,
    writer: ShardWriter | None = None,
) -> dict[str, Any]:
    """Featurise and write one shard (the worker's unit of work).

    Args:
        store: The store (writable).
        run_name: The run, already created by the driver.
        shard_id: Shard of the store's plan.
        source: The episode source holding the shard's episodes.
        featurizer: The featuriser (its ``describe()`` must match the run's config).
        unit: The source unit holding the shard (from :func:`shard_units`); None reads
            the episodes by id.
        batch_size: Samples per featuriser batch.
        writer: Write the shard on this background :class:`ShardWriter` (overlapping the
            next shard's compute) instead of before returning; the shard is then written
            once ``writer`` has been waited on (its next ``submit``, ``wait`` or
            ``close``), which re-raises a failed write.

    Returns:
        ``{"shard", "episodes", "rows", "seconds", "skipped"}``; ``skipped`` when the
        shard was already done (nothing is rewritten).
    """
    t0 = time.perf_counter()
    run = store.run(run_name)
    if not featurizer.matches(run.config.featurizer):
        raise ValueError(f"run {run_name!r} was produced by another featuriser configuration")
    rows = store._shard_rows(shard_id, ["episode_id", "length", "fingerprint"])
    ids = rows.column(0).to_pylist()
    lengths = np.asarray(rows.column(1).to_numpy(), dtype=np.int64)
    if run.shard_done(shard_id):
        return {"shard": shard_id, "episodes": len(ids), "rows": int(lengths.sum()), "seconds": 0.0, "skipped": True}
    episodes = _read_shard_episodes(source, ids, unit)
    for ep, n, fp in zip(episodes, lengths, rows.column(2).to_pylist()):
        # Checked while reading: data changed after registration is never featurised as the old.
        if ep.length != int(n) or (fp is not None and fingerprint_of(ep) != fp):
            raise ContentChangedError(
                f"episode {ep.episode_id!r} changed since it was registered in the store "
                f"({ep.length} steps now, {int(n)} in the catalog)", where=_where(source, unit),
                hint="restore the dataset, or featurise the changed data into a new store",
            )
    features = compute_shard_features(episodes, featurizer, batch_size=batch_size)
    del episodes
    if writer is None:
        run.write_shard(shard_id, ids, features, lengths)
    else:
        writer.submit(shard_id, ids, functools.partial(run.write_shard, shard_id, ids, features, lengths))
    return {
        "shard": shard_id,
        "episodes": len(ids),
        "rows": int(features.shape[0]),
        "seconds": time.perf_counter() - t0,
        "skipped": False,
    }


# ----------------------------------------------------------------------------- background writes
class ShardWriter:
    """Writes finished shards on one background thread while the next shard is computed.

    Bounded: at most one shard is being written while the caller computes the next, so
    at most two shards' features are in memory (``submit`` first waits for the write
    before). Each write is the store's own ``Run.write_shard`` (validated first,
    completion marker last, atomically), so a shard is either complete or not marked
    done, whichever thread writes it and wherever the process stops; :meth:`close` waits
    for the write in flight rather than abandoning it. Writes happen in submission order.

    A failed write is re-raised in the caller's thread (same exception object, with a
    note naming the shard and its episodes) by the next :meth:`submit`, :meth:`wait` or
    :meth:`close`; nothing is submitted after a failure.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._what = ""
        self._error: BaseException | None = None

    def submit(self, shard: int, episode_ids: list[str], write: Any) -> None:
        """Wait for the previous write (re-raising its error), then run ``write()`` in the background."""
        self.wait()
        first, last = (episode_ids[0], episode_ids[-1]) if episode_ids else ("", "")
        self._what = f"shard {shard} (episodes {first!r}..{last!r}, {len(episode_ids)} episodes)"

        def run() -> None:
            try:
                write()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread by wait()
                self._error = exc

        self._thread = threading.Thread(target=run, name=f"cupid-shard-writer-{shard}", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        """Block until the write in flight is done; re-raise its error in this thread."""
        if self._thread is None:
            return
        self._thread.join()
        self._thread = None
        exc, self._error = self._error, None
        if exc is not None:
            exc.add_note(f"raised while writing {self._what} on the background writer thread")
            log.error("writing %s failed: %s", self._what, exc)
            raise exc

    def close(self) -> None:
        """Wait for the last write (re-raising its error); idempotent."""
        self.wait()


# ----------------------------------------------------------------------------- many shards
class _Shards:
    """``fn(shard) -> featurize_shard statistics``: one worker's shards of one run.

    With ``overlap_writes`` a shard is written on a :class:`ShardWriter` while the next
    one is computed; the executor calls :meth:`close` when done (``InProcess`` does),
    which waits for the last write and re-raises a failed one."""

    def __init__(self, store: GradientStore, run_name: str, source: Any, featurizer: Featurizer,
                 units: dict[int, str | None], batch_size: int, overlap_writes: bool = False) -> None:
        self.store, self.run_name, self.source, self.featurizer = store, run_name, source, featurizer
        self.units, self.batch_size = units, batch_size
        self.writer = ShardWriter() if overlap_writes else None

    def __call__(self, shard: int) -> dict[str, Any]:
        try:
            return featurize_shard(self.store, self.run_name, int(shard), self.source, self.featurizer,
                                   unit=self.units.get(shard), batch_size=self.batch_size, writer=self.writer)
        except BaseException:
            if self.writer is not None:  # finish the write in flight; this error is the one raised
                try:
                    self.writer.wait()
                except BaseException:  # noqa: BLE001 - logged by wait(); the first error wins
                    pass
            raise

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclasses.dataclass(frozen=True)
class ShardWorker:
    """Recipe of a featurisation worker in another process (an executor's worker factory).

    It names what to load, never holds a model: calling it (once per worker process) loads
    the policy from its checkpoint, opens the store and the source, and returns the
    function that featurises one shard id.

    Attributes:
        policy_path: Checkpoint directory every worker loads.
        config: ``FeaturizeConfig.to_dict()`` of the run.
        store: Store URL (reachable by every worker).
        run: The run, created by the driver.
        source: Dataset path, or the ``EpisodeSource`` itself (pickled with the recipe,
            which an executor ships once, not once per worker).
        units: Source unit of each shard (:func:`shard_units`).
        threads: torch intra-op threads of the worker process (None: left as they are).
        device: Where each worker runs the policy (None: CPU).
        storage_options: fsspec options of a remote store and dataset, applied in the worker.
    """

    policy_path: str
    config: dict[str, Any]
    store: str
    run: str
    source: Any
    units: dict[int, str | None]
    threads: int | None = 1
    device: str | None = None
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __call__(self) -> _Shards:
        from cupid_engine.policies import load_policy, policy_hash

        if self.threads:
            torch.set_num_threads(int(self.threads))
        source = self.source
        if self.storage_options:
            from cupid_engine.store.options import apply_storage_options

            apply_storage_options(self.storage_options, self.store,
                                  source if isinstance(source, (str, os.PathLike)) else None)
        config = FeaturizeConfig.from_dict(self.config)
        policy = load_policy(self.policy_path)
        if self.device:
            policy = policy.to(self.device)
        featurizer = Featurizer.from_config(policy, config, policy_hash=policy_hash(self.policy_path))
        if isinstance(source, (str, os.PathLike)):
            from cupid_engine.data import open_source

            source = open_source(source)
        return _Shards(GradientStore.open(self.store, mode="r+"), self.run, source, featurizer, self.units,
                       samples_per_batch(config, featurizer))


def featurize_shards(
    source: Any,
    store: GradientStore,
    run_name: str,
    shards: list[int],
    *,
    config: FeaturizeConfig,
    executor: Executor | None = None,
    featurizer: Featurizer | None = None,
    policy_path: str | None = None,
    device: str | None = None,
    threads: int = 1,
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
    overlap_writes: bool = True,
) -> dict[str, Any]:
    """Step 3 over many shards: featurise and write ``shards`` of an existing run.

    An executor running in this process uses the live ``featurizer`` when given; any other
    executor's workers each load ``policy_path`` (:class:`ShardWorker`). A shard's
    features depend only on its episodes, so the executor never changes the numbers.

    Args:
        source: ``EpisodeSource`` or dataset path.
        store: The store (writable), holding the run.
        run_name: The run (``prepare_run`` created it).
        shards: Shards to write (finished ones are skipped by their marker).
        config: The run's :class:`FeaturizeConfig`.
        executor: Where the shards run (default :class:`~cupid_engine.executor.InProcess`).
        featurizer: The featuriser of an in-process run.
        policy_path: Checkpoint directory the workers load.
        device: Where out-of-process workers run the policy (a ``cuda`` device asks the
            executor for one GPU per worker).
        threads: torch intra-op threads per out-of-process worker.
        storage_options: fsspec options of a remote store and dataset, for the workers.
        progress: tqdm bar over episodes.
        overlap_writes: In-process executor with the live ``featurizer``: write each shard
            on a background thread (:class:`ShardWriter`) while the next is computed. The
            store's bytes are the same either way; all writes are done when this returns.

    Returns:
        ``{"shards", "episodes", "rows", "skipped"}`` summed over the shards done.
    """
    executor = executor or InProcess()
    summary = {"shards": 0, "episodes": 0, "rows": 0, "skipped": 0}
    if not shards:
        return summary
    units = shard_units(source, store, shards)
    if executor.in_process and featurizer is not None:
        factory: Any = functools.partial(_Shards, store, run_name, source, featurizer, units,
                                         samples_per_batch(config, featurizer),
                                         overlap_writes=overlap_writes)
    elif policy_path is None:
        raise ValueError(f"{executor!r} needs the policy as a checkpoint path (its workers load it themselves)")
    else:
        factory = ShardWorker(
            str(policy_path), config.to_dict(), store.url, run_name,
            os.fspath(source) if isinstance(source, os.PathLike) else source, units,
            threads=None if executor.in_process else int(threads), device=device, storage_options=dict(storage_options or {}),
        )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        on = f" ({executor.workers} workers)" if executor.workers > 1 else ""
        bar = tqdm(total=int(store.shard_plan().counts()[list(shards)].sum()), unit="ep",
                   desc=f"featurize {run_name}{on}")

    def on_result(shard: int, stats: dict[str, Any]) -> None:
        summary["shards"] += 1
        summary["episodes"] += stats["episodes"]
        summary["rows"] += stats["rows"]
        summary["skipped"] += int(stats["skipped"])
        if bar is not None:
            bar.update(stats["episodes"])

    gpus = 1 if not executor.in_process and device is not None and device.startswith("cuda") else 0
    try:
        executor.map(factory, list(shards), on_result=on_result, gpus=gpus)
    finally:
        if bar is not None:
            bar.close()
    return summary
