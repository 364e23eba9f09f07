"""Step 1 of the featuriser: a source's episodes into the store catalog, unit by unit.

Episodes are registered one source unit at a time (a LeRobot data file, an RLDS shard
file, a robomimic demo range), so every store shard lies inside one unit and a worker
reads exactly one file for it. Every selected episode's data is read and checked before
anything is written (its length, and the content fingerprint of an episode the store
already holds); units are streamed into one :meth:`GradientStore.append_episodes` call,
so the catalog file is rewritten once and only one unit's rows are in memory at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cupid_engine.errors import ContentChangedError, DataError, UserError, one_line
from cupid_engine.store import GradientStore
from cupid_engine.store.catalog import fingerprint_of
from cupid_engine.store.undo import StoreUndo

log = logging.getLogger(__name__)

__all__ = ["Registration", "apply_replacements", "register", "register_episodes", "shard_units", "source_name",
           "unit_tables"]

_RANGE = re.compile(r"^(\d+):(\d+)$")
_STORE_COLUMNS = ("episode_id", "split", "length", "success", "return", "tier", "source", "task", "metadata",
                  "fingerprint")


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
