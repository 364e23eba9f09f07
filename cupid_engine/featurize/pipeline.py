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

:func:`featurize_shard` is step 3 for one shard; the Ray workers of
``cupid_engine.distributed.featurize`` call it, and ``featurize(..., workers > 1)`` hands
step 3 to them.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from cupid_engine import ops

from cupid_engine.featurize.config import FeaturizeConfig
from cupid_engine.featurize.featurizer import Featurizer
from cupid_engine.policies.base import Policy
from cupid_engine.policies.samples import build_samples
from cupid_engine.store import GradientStore, Run, RunConfig

log = logging.getLogger(__name__)

__all__ = ["featurize", "featurize_shard", "open_inputs", "register_episodes", "shard_units", "run_config"]

_RANGE = re.compile(r"^(\d+):(\d+)$")
_STORE_COLUMNS = ("episode_id", "split", "length", "success", "return", "tier", "source", "task", "metadata")


# ----------------------------------------------------------------------------- inputs
def open_inputs(source: Any, store: Any, policy: Any) -> tuple[Any, GradientStore, Policy, str | None]:
    """Resolve paths: ``(source, store, policy, policy_path)``.

    ``source`` may be a path/URL (``data.open_source``) or an ``EpisodeSource``; ``store`` a
    path (opened with mode ``"a"``) or a :class:`GradientStore`; ``policy`` a checkpoint
    directory (``policies.load_policy``) or a :class:`Policy`.
    """
    if isinstance(source, (str, os.PathLike)):
        from cupid_engine.data import open_source

        source = open_source(source)
    if not isinstance(store, GradientStore):
        store = GradientStore.open(store, mode="a")
    policy_path = None
    if isinstance(policy, (str, os.PathLike)):
        from cupid_engine.policies import load_policy

        policy_path = str(policy)
        policy = load_policy(policy_path)
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a Policy or a checkpoint path, got {type(policy).__name__}")
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


def register_episodes(source: Any, store: GradientStore, *, shard_size: int, split: str | None = None) -> int:
    """Add the source's episodes missing from ``store``'s catalog, shards aligned to units.

    Args:
        source: An ``EpisodeSource``.
        store: The writable store.
        shard_size: Most episodes per new shard.
        split: Only episodes of this split (None: all).

    Returns:
        Number of episodes added.
    """
    check_existing = store.num_episodes > 0

    def new_rows() -> Iterator[pa.Table]:
        for _unit, table in unit_tables(source):
            table = _store_rows(table)
            if split is not None:
                table = table.filter(pc.equal(table.column("split"), split))
            if check_existing and table.num_rows:
                known = store.contains(table.column("episode_id").to_pylist())
                if known.any():
                    table = table.filter(pa.array(~known))
            if table.num_rows:
                yield table  # one plan group per unit: every shard lies inside one unit

    return store.append_episodes(new_rows(), shard_size=shard_size)


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


def run_config(featurizer: Featurizer, config: FeaturizeConfig) -> RunConfig:
    """The store :class:`RunConfig` of a featuriser run."""
    return RunConfig(k=config.projection.k, dtype=config.dtype, featurizer=featurizer.describe())


# ----------------------------------------------------------------------------- one shard
def _read_shard_episodes(source: Any, ids: list[str], unit: str | None) -> list:
    wanted = set(ids)
    stream = source.iter_shard(unit) if unit is not None else source.episodes(ids=ids)
    found = {ep.episode_id: ep for ep in stream if ep.episode_id in wanted}
    missing = [e for e in ids if e not in found]
    if missing:
        where = f"unit {unit!r}" if unit is not None else "the source"
        raise KeyError(f"episodes {missing[:5]} of the store catalog are not in {where}")
    return [found[e] for e in ids]


def compute_shard_features(
    episodes: list, featurizer: Featurizer, *, batch_size: int
) -> np.ndarray:
    """``[rows, k]`` float32 features of the episodes' steps, in episode then step order.

    Samples of all episodes are cut once and featurised in batches of ``batch_size``
    that cross episode boundaries.

    Raises:
        ValueError: non-finite features, naming the episode and step.
    """
    policy = featurizer.policy
    cfg = policy.config
    samples = build_samples(episodes, n_obs_steps=cfg.n_obs_steps, horizon=cfg.horizon, obs_keys=cfg.obs_keys)
    n = len(samples)
    out = np.empty((n, featurizer.k), np.float32)
    for a in range(0, n, batch_size):
        b = min(n, a + batch_size)
        phi = featurizer(policy.make_batch(samples, slice(a, b)), check_finite=False)  # on the policy's device
        bad = ops.nonfinite_rows(phi)
        if bool(bad.any()):
            r = a + int(bad.nonzero()[0, 0])
            eid = samples.episode_ids[int(samples.episode_index[r])]
            raise ValueError(
                f"episode {eid!r} step {int(samples.step[r])}: non-finite feature (NaN/Inf gradient); "
                "nothing of its shard was written"
            )
        out[a:b] = phi.detach().to(torch.float32).cpu().numpy()
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
    if run.config.featurizer != featurizer.describe():
        raise ValueError(f"run {run_name!r} was produced by another featuriser configuration")
    ids, lengths = store.shard_episodes(shard_id)
    if run.shard_done(shard_id):
        return {"shard": shard_id, "episodes": len(ids), "rows": int(lengths.sum()), "seconds": 0.0, "skipped": True}
    episodes = _read_shard_episodes(source, ids, unit)
    for ep, n in zip(episodes, lengths):
        if ep.length != int(n):
            raise ValueError(f"episode {ep.episode_id!r}: source has {ep.length} steps, the store catalog {int(n)}")
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


# ----------------------------------------------------------------------------- driver
def prepare_run(
    source: Any, store: GradientStore, run_name: str, featurizer: Featurizer, config: FeaturizeConfig,
    *, split: str | None = None,
) -> Run:
    """Steps 1-2: register missing episodes, create/reopen the run and size its arrays."""
    store._check_writable()
    rc = run_config(featurizer, config)
    if run_name in store.runs():
        store.run(run_name).check_config(rc)  # refuse before touching the catalog
    added = register_episodes(source, store, shard_size=config.shard_size, split=split)
    if added:
        log.info("registered %d new episodes", added)
    run = store.create_run(run_name, rc)
    run.sync()
    return run


def check_device(device: str | None) -> str | None:
    """``device`` validated (None passes through); a missing CUDA device raises with a hint."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device {device!r} is not a torch device ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but torch sees no CUDA GPU (torch {torch.__version__}); "
                           "install a CUDA build of torch or featurise with device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda[:N], got {device!r}")
    return str(dev)


def featurize(
    source: Any,
    store: Any,
    run_name: str,
    *,
    policy: Any,
    config: FeaturizeConfig | None = None,
    split: str | None = None,
    progress: bool = True,
    workers: int = 1,
    address: str | None = None,
    device: str | None = None,
) -> Run:
    """Featurise ``source`` into run ``run_name`` of ``store`` and finalize it.

    Args:
        source: ``EpisodeSource`` or dataset path/URL.
        store: :class:`GradientStore` or store path/URL (created when missing).
        run_name: Run name (``runs/<name>``).
        policy: :class:`Policy` or checkpoint directory (required as a path when
            ``workers > 1`` or ``address`` is set: workers load it themselves).
        config: :class:`FeaturizeConfig` (default: tensorsketch, k = 4096, ``loss``).
        split: Only episodes of this split (None: all).
        progress: tqdm progress bar over episodes.
        workers: ``1``: in this process; ``> 1``: that many Ray actors on a local Ray
            instance (``cupid_engine.distributed.featurize``).
        address: Join this Ray cluster instead (``workers`` actors there).
        device: Where the policy runs (``cpu``, ``cuda``, ``cuda:1``; None: where it is).
            Not part of the run's config: features agree across devices to float32
            rounding, so a store may mix shards featurised on CPUs and GPUs.

    Returns:
        The finalized :class:`Run` (not finalized, with a warning, when the store holds
        pending shards of episodes this source does not have).

    Raises:
        ValueError: the run exists with another config; bad episodes (named).
    """
    config = config or FeaturizeConfig()
    device = check_device(device)
    source, store, policy_obj, policy_path = open_inputs(source, store, policy)
    if device is not None:
        policy_obj = policy_obj.to(device)
    featurizer = Featurizer.from_config(policy_obj, config)
    run = prepare_run(source, store, run_name, featurizer, config, split=split)
    pending = run.pending_shards()
    if workers > 1 or address is not None:
        if policy_path is None:
            raise ValueError("workers > 1 / address need policy as a checkpoint path (workers load it themselves)")
        from cupid_engine.distributed.featurize import featurize_distributed

        featurize_distributed(
            source, store, run_name, policy_path=policy_path, config=config, shards=pending,
            workers=max(1, workers), address=address, progress=progress, device=device,
        )
    else:
        _featurize_local(source, store, run_name, featurizer, config, pending, progress=progress)
    run = store.run(run_name)
    left = run.pending_shards()
    if left:
        log.warning(
            "run %r: %d shard(s) hold episodes this source lacks (first: %s); not finalized",
            run_name, len(left), left[:10],
        )
        return run
    if not pending and run._group.attrs.get("finalized") and not run._group.attrs["finalized"].get("partial"):
        return run  # resumed a finished run: nothing was written, the Gram is current
    run.finalize()
    return run


def _featurize_local(
    source: Any, store: GradientStore, run_name: str, featurizer: Featurizer, config: FeaturizeConfig,
    shards: list[int], *, progress: bool,
) -> None:
    if not shards:
        return
    units = shard_units(source, store, shards)
    total = int(store.shard_plan().counts()[list(shards)].sum())
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="ep", desc=f"featurize {run_name}")
    try:
        for s in shards:
            stats = featurize_shard(
                store, run_name, s, source, featurizer, unit=units.get(s), batch_size=config.batch_size
            )
            if bar is not None:
                bar.update(stats["episodes"])
    finally:
        if bar is not None:
            bar.close()
