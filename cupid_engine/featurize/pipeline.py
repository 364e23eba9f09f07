"""Featurise a dataset into a gradient store: register, plan, stream, write, finalize.

:func:`featurize` is the staged driver (TRAK's featurize -> finalize):

1. **Register** the source's episodes missing from the store catalog. Episodes are added
   one source unit at a time (a LeRobot data file, an RLDS shard file, a robomimic demo
   range), so every store shard lies inside one unit and a worker reads exactly one file
   for it. Units are streamed into one :meth:`GradientStore.append_episodes` call: the
   catalog file is rewritten once, and only one unit's rows are in memory at a time.
2. **Create or reopen the run** with a :class:`~cupid_engine.store.RunConfig` carrying
   :meth:`Featurizer.describe`; a run produced under another config is refused.
3. **Stream** every shard without a completion marker (resume: finished shards are
   skipped, torn ones redone): read its episodes, cut samples, featurise them in batches
   of ``batch_size`` that cross episode boundaries, write the whole shard. At most one
   shard's step features are in memory.
4. **Finalize**: reduce the per-shard Gram partials (training split) in shard order.

:func:`featurize_shard` is step 3 for one shard; :func:`featurize_shards` hands the
pending shards to an executor (``cupid_engine.executor``): in this process by default, or
on the workers of the executor the caller gives (``cupid_engine.distributed.RayExecutor``),
each building its featuriser once from a :class:`ShardWorker` recipe.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from cupid_engine import ops
from cupid_engine.errors import (
    ConfigError,
    ContentChangedError,
    DataError,
    LimitError,
    NotAStoreError,
    UserError,
    one_line,
)
from cupid_engine.executor import Executor, InProcess
from cupid_engine.featurize.config import FeaturizeConfig
from cupid_engine.featurize.featurizer import Featurizer
from torch import nn

from cupid_engine.policies.task import batch_rows, resolve_task
from cupid_engine.store import GradientStore, Run, RunConfig
from cupid_engine.store.gradient_store import StoreUndo
from cupid_engine.store.catalog import fingerprint_of

log = logging.getLogger(__name__)

__all__ = ["ShardWorker", "featurize", "featurize_shard", "featurize_shards", "open_inputs", "register_episodes",
           "shard_units", "run_config"]

_RANGE = re.compile(r"^(\d+):(\d+)$")
_STORE_COLUMNS = ("episode_id", "split", "length", "success", "return", "tier", "source", "task", "metadata",
                  "fingerprint")


# ----------------------------------------------------------------------------- inputs
def open_inputs(source: Any, store: Any, policy: Any) -> tuple[Any, GradientStore, nn.Module, str | None]:
    """Resolve paths: ``(source, store, policy, policy_path)``.

    ``source`` may be a path/URL (``data.open_source``) or an ``EpisodeSource``; ``store`` a
    path (opened with mode ``"a"``) or a :class:`GradientStore`; ``policy`` a checkpoint
    directory (``policies.load_policy``) or an ``nn.Module`` (an engine :class:`Policy`
    or any module implementing the policy protocol, or the model of a separate task).
    """
    if isinstance(source, (str, os.PathLike)):
        from cupid_engine.data import open_source

        try:
            source = open_source(source)
        except UserError:
            raise
        except (pa.ArrowException, ValueError, KeyError, OSError, EOFError) as exc:
            raise DataError(f"cannot open the dataset ({type(exc).__name__}: {one_line(exc)})",
                            where=os.fspath(source), hint="check the path and the dataset's files") from exc
    policy_path = None
    if isinstance(policy, (str, os.PathLike)):
        from cupid_engine.policies import load_policy

        policy_path = str(policy)
        policy = load_policy(policy_path)
    if not isinstance(policy, nn.Module):
        raise TypeError(f"policy must be a torch module (a Policy or a policy-protocol module) or a checkpoint path, "
                        f"got {type(policy).__name__}")
    if not isinstance(store, GradientStore):  # last: a bad dataset or checkpoint creates no store
        store = GradientStore.open(store, mode="a")
    return source, store, policy, policy_path


def _unit_counts(source: Any, units: list[str], total: int) -> list[int] | None:
    """Episodes per unit, in catalog order, or None when they cannot be known cheaply.

    ``"start:stop"`` units (robomimic, replay, synthetic) give their sizes; LeRobot
    datasets keep a per-file row list. Other sources (RLDS) are counted by streaming
    each unit once. Returns None when the counts do not tile the catalog in order.
    """
    counts: list[int] = []
    if units and all(_RANGE.match(u) for u in units):
        pos = 0
        for u in units:
            a, b = (int(x) for x in u.split(":"))
            if a != pos:
                return None
            counts.append(b - a)
            pos = b
    elif isinstance(getattr(source, "_rows_by_file", None), dict):
        # LeRobot: catalog rows per data file (not public API; checked for contiguity).
        pos = 0
        for u in units:
            rows = list(source._rows_by_file.get(u, []))
            if rows != list(range(pos, pos + len(rows))):
                return None
            counts.append(len(rows))
            pos += len(rows)
    else:
        log.info("counting episodes per unit by streaming %d units once", len(units))
        counts = [sum(1 for _ in source.iter_shard(u)) for u in units]
    return counts if sum(counts) == total else None


def unit_tables(source: Any) -> Iterator[tuple[str | None, pa.Table]]:
    """``(unit, episode-level rows of its episodes)`` per source unit, in catalog order.

    Falls back to one ``(None, whole catalog)`` when units cannot be mapped to catalog rows.
    """
    units = list(source.shards())
    if hasattr(source, "unit_catalog"):
        for u in units:
            yield u, source.unit_catalog(u)
        return
    cat = source.catalog()
    counts = _unit_counts(source, units, cat.num_rows)
    if counts is None:
        log.warning("source units do not map onto its catalog: shards will not be aligned to units")
        yield None, cat
        return
    offset = 0
    for u, n in zip(units, counts):
        yield u, cat.slice(offset, n)
        offset += n


def _store_rows(table: pa.Table) -> pa.Table:
    return table.select([c for c in _STORE_COLUMNS if c in table.column_names])


def source_name(source: Any) -> str:
    """A short name of a source for messages: its path when it has one."""
    for attr in ("path", "url", "root"):
        value = getattr(source, attr, None)
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
    return type(source).__name__


def _where(source: Any, unit: str | None) -> str:
    return f"{source_name(source)}" + (f" (unit {unit})" if unit is not None else "")


def _reading(source: Any, unit: str | None, ids: list[str]) -> Iterator[Any]:
    """Episodes of ``unit`` (or ``ids``), reader failures turned into a :class:`DataError` naming the unit.

    A reader's raw ``ArrowInvalid``/``JSONDecodeError``/``OSError`` says neither which file
    nor what to do; bugs (``TypeError``, ``AttributeError`` ...) pass through untouched.
    """
    stream = source.iter_shard(unit) if unit is not None else source.episodes(ids=ids)
    try:
        yield from stream
    except UserError:
        raise
    except (pa.ArrowException, ValueError, KeyError, OSError, EOFError) as exc:
        raise DataError(f"cannot read the dataset's episodes ({type(exc).__name__}: {one_line(exc)})",
                        where=_where(source, unit), hint="check or re-export the dataset") from exc


def _with_content(source: Any, unit: str | None, table: pa.Table) -> pa.Table:
    """``table`` with each episode's ``fingerprint``, after reading and checking its data.

    Every episode is read (streamed, nothing kept) so that no row enters a catalog before
    its data was seen: the length the metadata claims must be the length of the data.

    Raises:
        DataError: an episode without data, or whose data length differs (named).
    """
    ids = table.column("episode_id").to_pylist()
    row = {e: i for i, e in enumerate(ids)}
    claimed = table.column("length").to_pylist()
    fps: list[str | None] = [None] * len(ids)
    for ep in _reading(source, unit, ids):
        i = row.get(ep.episode_id)
        if i is None:
            continue
        if claimed[i] != ep.length:
            raise DataError(
                f"episode {ep.episode_id!r}: the dataset's metadata gives length {claimed[i]} "
                f"but its data has {ep.length} steps", where=f"field 'length' in {_where(source, unit)}",
                hint="fix the episode metadata of the dataset (nothing was stored)",
            )
        fps[i] = fingerprint_of(ep)
    missing = [e for e, f in zip(ids, fps) if f is None]
    if missing:
        raise DataError(f"episode(s) {missing[:5]} are listed in the dataset's metadata but have no data",
                        where=_where(source, unit), hint="fix or re-export the dataset (nothing was stored)")
    fp = pa.array(fps, pa.string())
    if "fingerprint" in table.column_names:
        return table.set_column(table.column_names.index("fingerprint"), "fingerprint", fp)
    return table.append_column("fingerprint", fp)


@dataclasses.dataclass
class Registration:
    """What :func:`register` found and did.

    Attributes:
        selected: Source episodes selected (after the split filter).
        added: Episodes added to the catalog.
        shards: Catalog shards holding the selected episodes (old and new), sorted.
        splits: Episodes per split in the source (before the filter).
        unchecked: Known episodes whose stored fingerprint is unknown (older catalogs).
        replaced: Known episodes with new content (``replace=True``): id -> fingerprint.
    """

    selected: int = 0
    added: int = 0
    shards: list[int] = dataclasses.field(default_factory=list)
    splits: dict[str, int] = dataclasses.field(default_factory=dict)
    unchecked: int = 0
    replaced: dict[str, str] = dataclasses.field(default_factory=dict)


def register(
    source: Any, store: GradientStore, *, shard_size: int, split: str | None = None, replace: bool = False,
) -> Registration:
    """Add the source's episodes missing from ``store``'s catalog, after reading and checking them.

    Every selected episode's data is read (unit by unit, streamed) before anything is
    written: its length must match the metadata, and an episode the store already holds
    must have the same content (fingerprint). The catalog is then appended in one
    atomic rewrite, shards aligned to units; on any error it is left untouched.

    Args:
        source: An ``EpisodeSource``.
        store: The writable store.
        shard_size: Most episodes per new shard.
        split: Only episodes of this split (None: all).
        replace: Accept new content under ids the store holds (same length only): their
            new fingerprints go into ``Registration.replaced`` for :func:`apply_replacements`.

    Raises:
        DataError: unreadable or self-contradicting data (episode, field and unit named).
        ContentChangedError: an id the store holds with other content (unless ``replace``).
    """
    out = Registration()
    shards: set[int] = set()
    before: list[int] = []

    def new_rows() -> Iterator[pa.Table]:
        # Read under the store's catalog lock (append_episodes holds it while consuming
        # this): another driver's episodes registered meanwhile count as known.
        check_existing = store.num_episodes > 0
        before.append(store.num_shards)
        for unit, table in unit_tables(source):
            table = _store_rows(table)
            if table.num_rows:
                for item in pc.value_counts(table.column("split")).to_pylist():
                    out.splits[item["values"]] = out.splits.get(item["values"], 0) + int(item["counts"])
            if split is not None:
                table = table.filter(pc.equal(table.column("split"), split))
            if not table.num_rows:
                continue
            out.selected += table.num_rows
            table = _with_content(source, unit, table)
            if check_existing:
                known = store.contains(table.column("episode_id").to_pylist())
                if known.any():
                    _check_known(source, unit, store, table.filter(pa.array(known)), shards, out, replace)
                    table = table.filter(pa.array(~known))
            if table.num_rows:
                yield table  # one plan group per unit: every shard lies inside one unit

    out.added = store.append_episodes(new_rows(), shard_size=shard_size)
    if out.added:
        shards.update(range(before[0], store.num_shards))
    out.shards = sorted(shards)
    return out


def _check_known(source: Any, unit: str | None, store: GradientStore, table: pa.Table, shards: set[int],
                 out: Registration, replace: bool = False) -> None:
    """Episodes the store already holds must come with the content it holds (fingerprint)."""
    ids = table.column("episode_id").to_pylist()
    stored = store.catalog_rows(ids, ["fingerprint", "source", "shard", "length"])
    shards.update(int(x) for x in np.unique(stored.column("shard").to_numpy()))
    have = stored.column("fingerprint")
    out.unchecked += have.null_count
    differs = pc.fill_null(pc.not_equal(have, table.column("fingerprint")), False)
    if not pc.any(differs).as_py():
        return
    rows = np.flatnonzero(np.asarray(differs.to_numpy(zero_copy_only=False), bool))
    i = int(rows[0])
    src = stored.column("source")[i].as_py()
    if not replace:
        raise ContentChangedError(
            f"episode {ids[i]!r} is already in the store with other content"
            + (f" (stored from source {src!r})" if src else ""),
            where=_where(source, unit),
            hint="give the dataset's episodes ids of their own, featurise it into a new store, or pass "
                 "--replace to rewrite the stored episodes (nothing was stored)",
        )
    new_len, old_len = table.column("length").to_pylist(), stored.column("length").to_pylist()
    fps = table.column("fingerprint").to_pylist()
    for r in rows:
        if new_len[r] != old_len[r]:
            raise ContentChangedError(
                f"episode {ids[r]!r} cannot be replaced: its length changed ({old_len[r]} -> {new_len[r]} steps) "
                "and a store's shard plan is fixed", where=_where(source, unit),
                hint="featurise the dataset into a new store (nothing was stored)",
            )
        out.replaced[ids[r]] = fps[r]


def apply_replacements(store: GradientStore, replaced: dict[str, str], undo: StoreUndo | None = None) -> list[int]:
    """Record replaced episodes' fingerprints and clear their shards in every run.

    Returns:
        The shards that must be featurised again (in every run).
    """
    if not replaced:
        return []
    shards = store.set_fingerprints(replaced)
    for name in store.runs():
        run = store.run(name)
        if undo is not None:
            undo.remember_run(name)
            for s in shards:
                if s < run.num_shards:
                    undo.remember(run.done_marker_path(s))
        run.invalidate_shards([s for s in shards if s < run.num_shards])
    log.warning("replaced the content of %d episode(s) (first: %s): shard(s) %s of every run are featurised again",
                len(replaced), next(iter(replaced)), shards[:10])
    return shards


def register_episodes(source: Any, store: GradientStore, *, shard_size: int, split: str | None = None) -> int:
    """:func:`register`, returning the number of episodes added."""
    return register(source, store, shard_size=shard_size, split=split).added


def shard_units(source: Any, store: GradientStore, shards: list[int]) -> dict[int, str | None]:
    """The source unit holding each shard's episodes (None: read by id).

    Memory stays O(#shards + one unit): only the first id of each shard (from the
    store's shard plan) is indexed.
    """
    plan = store.shard_plan()
    first = {plan.first_ids[s]: s for s in shards}
    out: dict[int, str | None] = {s: None for s in shards}
    if hasattr(source, "unit_of"):
        for eid, s in first.items():
            out[s] = source.unit_of(eid)
        return out
    for unit, table in unit_tables(source):
        if unit is None:
            break
        for eid in table.column("episode_id").to_pylist():
            s = first.get(eid)
            if s is not None:
                out[s] = unit
    return out


def run_config(featurizer: Featurizer, config: FeaturizeConfig, *, stored: RunConfig | None = None) -> RunConfig:
    """The store :class:`RunConfig` of a featuriser run (an existing run's ``stored`` config
    keeps its recorded description when :meth:`Featurizer.matches` it)."""
    desc = featurizer.describe()
    if stored is not None and stored.featurizer != desc and featurizer.matches(stored.featurizer):
        desc = stored.featurizer
    return RunConfig(k=config.projection.k, dtype=config.dtype, featurizer=desc)


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
    run.write_shard(shard_id, ids, features, lengths)
    return {
        "shard": shard_id,
        "episodes": len(ids),
        "rows": int(features.shape[0]),
        "seconds": time.perf_counter() - t0,
        "skipped": False,
    }


# ----------------------------------------------------------------------------- many shards
class _Shards:
    """``fn(shard) -> featurize_shard statistics``: one worker's shards of one run."""

    def __init__(self, store: GradientStore, run_name: str, source: Any, featurizer: Featurizer,
                 units: dict[int, str | None], batch_size: int) -> None:
        self.store, self.run_name, self.source, self.featurizer = store, run_name, source, featurizer
        self.units, self.batch_size = units, batch_size

    def __call__(self, shard: int) -> dict[str, Any]:
        return featurize_shard(self.store, self.run_name, int(shard), self.source, self.featurizer,
                               unit=self.units.get(shard), batch_size=self.batch_size)


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
                       config.batch_size)


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

    Returns:
        ``{"shards", "episodes", "rows", "skipped"}`` summed over the shards done.
    """
    executor = executor or InProcess()
    summary = {"shards": 0, "episodes": 0, "rows": 0, "skipped": 0}
    if not shards:
        return summary
    units = shard_units(source, store, shards)
    if executor.in_process and featurizer is not None:
        factory: Any = functools.partial(_Shards, store, run_name, source, featurizer, units, config.batch_size)
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


# ----------------------------------------------------------------------------- driver
def prepare_run(
    source: Any, store: GradientStore, run_name: str, featurizer: Featurizer, config: FeaturizeConfig,
    *, split: str | None = None,
) -> Run:
    """Steps 1-2: register missing episodes, create/reopen the run and size its arrays."""
    return _prepare(source, store, run_name, featurizer, config, split=split)[0]


def _prepare(
    source: Any, store: GradientStore, run_name: str, featurizer: Featurizer, config: FeaturizeConfig,
    *, split: str | None = None, replace: bool = False, undo: StoreUndo | None = None,
) -> tuple[Run, Registration]:
    store._check_writable()
    rc = run_config(featurizer, config)
    if run_name in store.runs():
        existing = store.run(run_name)
        rc = run_config(featurizer, config, stored=existing.config)
        existing.check_config(rc)  # refuse before touching the catalog
    check_bounds(config, rows=0)  # k alone can be hopeless: say so before reading any data
    reg = register(source, store, shard_size=config.shard_size, split=split, replace=replace)
    if not reg.selected:
        have = ", ".join(f"{k} {v}" for k, v in sorted(reg.splits.items())) or "no episodes at all"
        raise DataError(
            "the dataset has no episodes" + (f" of split {split!r}" if split else "") + f" (it has: {have})",
            where=source_name(source), hint="choose another --split or dataset (nothing was stored)",
        )
    if reg.added:
        log.info("registered %d new episodes", reg.added)
    apply_replacements(store, reg.replaced, undo)
    if reg.unchecked:
        log.warning("%d episode(s) were registered before content fingerprints: their content is not checked",
                    reg.unchecked)
    plan = store.shard_plan()
    check_bounds(config, rows=int(plan.rows[reg.shards].max()) if reg.shards else 0, store=store,
                 total_rows=plan.extent()[0], new_run=run_name not in store.runs())
    run = store.create_run(run_name, rc)
    run.sync()
    return run, reg


def _memory_limit() -> int:
    """Bytes of memory this process may use: physical memory, or a lower cgroup limit."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
            if text.isdigit():
                total = min(total, int(text))
        except OSError:
            pass
    return total


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_bounds(
    config: FeaturizeConfig, *, rows: int, store: GradientStore | None = None, total_rows: int = 0,
    new_run: bool = False, memory: int | None = None,
) -> None:
    """Refuse a featurisation whose memory (or disk) need is out of reach, before allocating.

    Peak memory per shard (estimate): its features ``[rows, k]`` fp32 and their fp64
    copy for the Gram, the Gram and a partial ``[k, k]`` fp64 twice, and one batch of
    ``[batch_size, k]`` fp32 outputs twice (featuriser and copy).

    Args:
        config: The featurisation config (k, batch size, dtype).
        rows: Step rows of the largest shard to write.
        store: The store (its free disk is checked for a new run when local).
        total_rows: Step rows of the whole catalog (a new run's size on disk).
        new_run: The run does not exist yet.
        memory: Bytes available (default: physical memory or the cgroup limit).

    Raises:
        LimitError: with the estimate and what to change.
    """
    k, batch = config.projection.k, config.batch_size
    need = rows * k * (4 + 8) + 2 * k * k * 8 + 2 * batch * k * 4
    have = _memory_limit() if memory is None else memory
    if need > 0.8 * have:
        raise LimitError(
            f"featurising needs about {_gib(need)} of memory (k={k}: Gram {_gib(2 * k * k * 8)}; largest shard "
            f"{rows} steps: {_gib(rows * k * 12)}; batch {batch}: {_gib(2 * batch * k * 4)}), "
            f"more than 80% of the {_gib(have)} here", where="--k/--shard-size/--batch-size",
            hint="lower k, the shard size or the batch size (nothing was stored)",
        )
    if new_run and store is not None and store._loc.is_local and total_rows:
        from cupid_engine.store import quant

        disk = total_rows * k * quant.storage_numpy_dtype(config.dtype).itemsize
        free = shutil.disk_usage(store._loc.root).free
        if disk > free:
            raise LimitError(
                f"the run's features need about {_gib(disk)} on disk ({total_rows} steps x k={k} "
                f"{config.dtype}), only {_gib(free)} is free", where=store.url,
                hint="lower k, store a smaller dtype, or use a larger disk (nothing was stored)",
            )


class _NoDevice(ConfigError, RuntimeError):
    """The requested device is not there (a ``RuntimeError`` for callers that catch one)."""


def check_device(device: str | None) -> str | None:
    """``device`` validated (None passes through); a missing CUDA device raises with a hint."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {device!r} is not a torch device", where="--device",
                          hint="use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise _NoDevice(f"device {device!r} requested but torch sees no CUDA GPU (torch {torch.__version__})",
                        where="--device", hint="install a CUDA build of torch or featurise with device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu or cuda[:N], got {device!r}", where="--device")
    return str(dev)


def featurize(
    source: Any,
    store: Any,
    run_name: str,
    *,
    policy: Any = None,
    config: FeaturizeConfig | None = None,
    split: str | None = None,
    progress: bool = True,
    executor: Executor | None = None,
    device: str | None = None,
    overwrite: bool = False,
    replace: bool = False,
    task: Any = None,
    model: Any = None,
) -> Run:
    """Featurise ``source`` into run ``run_name`` of ``store`` and finalize it.

    Args:
        source: ``EpisodeSource`` or dataset path/URL.
        store: :class:`GradientStore` or store path/URL (created when missing).
        run_name: Run name (``runs/<name>``).
        policy: :class:`Policy` (or any module implementing the policy protocol) or
            checkpoint directory (required as a path when ``executor`` runs out of this
            process: its workers load it themselves). None when ``task`` is given.
        config: :class:`FeaturizeConfig` (default: tensorsketch, k = 4096, ``loss``).
        split: Only episodes of this split (None: all).
        progress: tqdm progress bar over episodes.
        executor: Where the shards are featurised (``cupid_engine.executor``; default
            in this process); ``cupid_engine.distributed.executor_for(workers, address)``
            gives Ray actors, locally or on a cluster.
        device: Where the policy runs (``cpu``, ``cuda``, ``cuda:1``; None: where it is).
            Not part of the run's config: features agree across devices to float32
            rounding, so a store may mix shards featurised on CPUs and GPUs.
        overwrite: Replace the gradient store at ``store`` (a local path) by a new one.
            The new store is built beside it and swapped in only on success; a folder
            that is not a gradient store is never deleted (refused).
        replace: Episodes the store holds may come with new content (same length): their
            fingerprints are updated and their shards featurised again in every run
            (other runs become incomplete until featurised again). Without it, changed
            content under a stored id is an error.
        task: A policy-protocol task (``policies.PolicyTask``: ``build_batch``,
            ``output``, ``supported_outputs``) for a model the engine did not write; the
            engine never needs its class (in-process only).
        model: The ``nn.Module`` whose parameters ``task`` attributes (default: the task
            itself when it is a module, else ``task.model``).

    Returns:
        The finalized :class:`Run` (not finalized, with a warning, when the store holds
        pending shards of episodes this source does not have).

    Raises:
        ValueError: the run exists with another config; bad episodes (named).
    """
    config = config or FeaturizeConfig()
    executor = executor or InProcess()
    device = check_device(device)
    if overwrite:
        return _featurize_overwrite(
            source, store, run_name, policy=policy, config=config, split=split, progress=progress,
            executor=executor, device=device, replace=replace, task=task, model=model,
        )
    undo_args = _store_state(store)
    if task is not None:
        if policy is not None:
            raise TypeError("pass either policy= or task= (+ model=), not both")
        policy, task = resolve_task(task=task, model=model)  # policy: the task's model
    source, store, policy_obj, policy_path = open_inputs(source, store, policy)
    # Until a shard is written, a failure puts the store back as it was (a store made
    # here is removed); once shards are written they are kept, and a rerun resumes.
    undo = StoreUndo(store, run=run_name, **undo_args)
    pending: list[int] = []
    try:
        check_bounds(config, rows=0)  # before the featuriser allocates anything of size k
        if device is not None:
            policy_obj = policy_obj.to(device)
        try:
            if task is None:
                featurizer = Featurizer.from_config(policy_obj, config)
            else:
                featurizer = Featurizer.from_config(None, config, task=task, model=policy_obj)
        except UserError:
            raise
        except ValueError as exc:  # the config does not fit this policy (track names, output, method/path)
            raise ConfigError(f"the featuriser config does not fit the policy ({one_line(exc)})",
                              where="--track/--output/--method", hint="see cupid-engine featurize --help") from None
        if not executor.in_process and policy_path is None:
            raise ValueError(
                f"{executor!r} needs policy as a checkpoint path (its workers load it themselves)"
                + ("; a task= object (a policy the engine did not write) is featurised in this process: "
                   "use workers=1 (the in-process executor)" if task is not None else "")
            )
        run, reg = _prepare(source, store, run_name, featurizer, config, split=split, replace=replace, undo=undo)
        covered = set(reg.shards)
        pending = [s for s in run.pending_shards() if s in covered]
        featurize_shards(source, store, run_name, pending, config=config, executor=executor,
                         featurizer=featurizer, policy_path=policy_path, device=device, progress=progress)
    except BaseException:
        written = _written(store, run_name, pending)
        if written:
            log.warning("run %r: %d shard(s) were written before the error and are kept; run the same "
                        "command again to resume", run_name, written)
            undo.release()
        else:
            undo.restore()
        raise
    undo.release()
    run = store.run(run_name)
    left = run.pending_shards()
    if left:
        others = _sources_of(store, left)
        log.warning(
            "run %r: %d shard(s) hold episodes of other datasets (%s; first shards: %s): not finalized until "
            "those are featurised into it too", run_name, len(left), others, left[:10],
        )
        return run
    if not pending and run.finalized_current():
        return run  # resumed a finished run: nothing was written, the Gram is current
    run.finalize()
    return run


def _featurize_overwrite(source: Any, store: Any, run_name: str, **kwargs: Any) -> Run:
    """``featurize`` into a fresh store built beside ``store`` and swapped in on success."""
    from cupid_engine.store.gradient_store import _Location

    if isinstance(store, GradientStore) or not _Location(store).is_local:
        raise ConfigError("overwrite needs the store as a local folder path", where=str(store),
                          hint="remove the old store yourself, or featurise into a new path")
    loc = _Location(store)
    names = loc.listing()
    if names and not loc.is_store():
        raise NotAStoreError(
            f"{loc.url} is not a gradient store ({loc.describe(names)}); --overwrite only replaces a store",
            hint="choose a new or empty folder for the store (nothing there was changed)",
        )
    if not names:
        return featurize(source, loc.root, run_name, **kwargs)
    parent, base = os.path.split(loc.root.rstrip("/"))
    fresh, old = os.path.join(parent, f".{base}.new-{os.getpid()}"), os.path.join(parent, f".{base}.old-{os.getpid()}")
    shutil.rmtree(fresh, ignore_errors=True)
    try:
        featurize(source, fresh, run_name, **kwargs)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    os.replace(loc.root, old)
    os.replace(fresh, loc.root)
    shutil.rmtree(old, ignore_errors=True)
    return GradientStore.open(loc.root, mode="a").run(run_name)


def _store_state(store: Any) -> dict[str, bool]:
    """Whether ``featurize`` is about to create the store (and whether its folder exists)."""
    if isinstance(store, GradientStore):
        return {}
    from cupid_engine.store.gradient_store import _Location

    loc = _Location(store)
    if loc.exists():
        return {}
    return {"created": True, "had_folder": loc.listing() is not None}


def _written(store: GradientStore, run_name: str, pending: list[int]) -> int:
    """Shards of ``pending`` finished by now (0 when the run is gone or unreadable)."""
    if not pending:
        return 0
    try:
        left = set(store.run(run_name).pending_shards())
    except Exception:  # noqa: BLE001 - only deciding what to keep; the real error follows
        return 0
    return sum(1 for s in pending if s not in left)


def _sources_of(store: GradientStore, shards: list[int]) -> str:
    """The ``source`` names of the first episodes of some shards, for messages."""
    plan = store.shard_plan()
    ids = [plan.first_ids[s] for s in shards[:50]]
    names = sorted({str(x) for x in store.catalog_rows(ids, ["source"]).column(0).to_pylist() if x})
    return "sources " + ", ".join(repr(n) for n in names[:5]) if names else "episodes not in this dataset"

