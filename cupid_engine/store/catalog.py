"""The episode catalog (``catalog.parquet``) and its deterministic shard plan.

The catalog has one row per episode, in insertion order. Besides the user columns it
carries the *shard plan*, fixed when the episodes are added and never changed later:

- ``shard``: consecutive groups of up to ``shard_size`` new episodes form one shard;
  shard ids keep increasing across :meth:`GradientStore.add_episodes` calls.
- ``row_offset``: first row of the episode in every run's ``steps`` array. The episodes
  of a shard are contiguous, and each shard's region starts at a multiple of the store's
  ``chunk_rows`` so that two processes writing two shards never touch the same chunk.
- ``episode_slot``: row of the episode in every run's ``episodes`` array, with shard
  regions aligned to ``episode_chunk_rows`` for the same reason.

Appending never moves existing rows, so features already written stay valid.

Memory: the file is written in Parquet row groups of whole shards (about
:data:`ROW_GROUP_ROWS` rows), so a worker reads one row group for its shard, and nothing here holds more than one plan group (one source
unit) of new rows as Python objects. The per-shard summary (:class:`ShardPlan`) is
O(#shards). Files written before row groups were aligned to shards read the same, only
less selectively.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cupid_engine.constants import SPLITS
from cupid_engine.errors import ConfigError, DataError, StoreError

CATALOG_NAME = "catalog.parquet"

ROW_GROUP_ROWS = 8192
"""Rows per catalog row group (whole shards are grouped up to this many): reading one
shard reads at most this plus one shard of rows; the Parquet footer grows per group."""

USER_SCHEMA = pa.schema(
    [
        ("episode_id", pa.string()),
        ("split", pa.string()),
        ("length", pa.int64()),
        ("success", pa.bool_()),
        ("return", pa.float64()),
        ("tier", pa.string()),
        ("source", pa.string()),
        ("task", pa.string()),
        ("metadata", pa.string()),
        ("fingerprint", pa.string()),
    ]
)
"""Columns a caller provides; only episode_id, split and length are required.

``fingerprint`` is the episode's content hash (:func:`episode_fingerprint`, computed
while its data is read): an id that comes back with other content is refused rather
than silently taken for the stored one. Catalogs written before it existed read it as
null (unknown)."""

REQUIRED = ("episode_id", "split", "length")

PLAN_SCHEMA = pa.schema([("shard", pa.int64()), ("row_offset", pa.int64()), ("episode_slot", pa.int64())])

CATALOG_SCHEMA = pa.schema(list(USER_SCHEMA) + list(PLAN_SCHEMA))

LEGACY_NAMES = [n for n in CATALOG_SCHEMA.names if n != "fingerprint"]
"""Columns of catalogs written before ``fingerprint`` existed (read with it null)."""


def episode_fingerprint(
    actions: np.ndarray, observations: dict[str, np.ndarray], *, images: dict | None = None, task: str = "",
) -> str:
    """Content hash of one episode: its actions and observations (keys, shapes, float32 bytes).

    Camera images enter by key and shape only (decoding every frame of every video to
    register an episode would cost more than featurising it), and the task text (the
    instruction a language-conditioned policy reads) when given.

    Args:
        actions: ``[T, A]`` actions.
        observations: key -> ``[T, d]`` observations (hashed in sorted key order).
        images: camera key -> ``[T, H, W, C]`` sequence (anything with ``shape``).
        task: The episode's task / instruction text.

    Returns:
        32 hex characters (blake2b-128).
    """
    h = hashlib.blake2b(digest_size=16)
    for name, value in [("action", actions)] + sorted(observations.items()):
        a = np.ascontiguousarray(value, dtype=np.float32)
        h.update(f"{name}|{a.shape}|".encode())
        h.update(memoryview(a).cast("B"))
    for key, seq in sorted((images or {}).items()):
        h.update(f"image:{key}|{tuple(int(x) for x in seq.shape)}|".encode())
    if task:
        h.update(f"task|{task}".encode())
    return h.hexdigest()


def fingerprint_of(episode) -> str:
    """:func:`episode_fingerprint` of an ``Episode``."""
    return episode_fingerprint(episode.actions, episode.observations, images=getattr(episode, "images", None),
                               task=getattr(episode, "task", "") or "")


def empty_catalog() -> pa.Table:
    """A catalog with no episodes."""
    return CATALOG_SCHEMA.empty_table()


def _align(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def _first_true(mask: pa.ChunkedArray | pa.Array) -> int | None:
    """Index of the first true value of a boolean array (nulls count as false), or None."""
    mask = pc.fill_null(mask, False)
    if not pc.any(mask).as_py():
        return None
    return int(np.argmax(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)))


def normalize(table: pa.Table) -> pa.Table:
    """Validate new episodes and cast them to :data:`USER_SCHEMA`.

    Missing optional columns become nulls; unknown columns raise (so that a typo never
    silently drops data). Checks are columnar (Arrow kernels): no per-row Python objects
    except one ``json.loads`` per *distinct* metadata string.

    Raises:
        ValueError: naming the column or the episode that is invalid.
    """
    if not isinstance(table, pa.Table):
        raise TypeError(f"add_episodes expects a pyarrow.Table, got {type(table).__name__}")
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise DataError(f"episode table lacks required column(s) {missing}")
    unknown = [c for c in table.column_names if c not in USER_SCHEMA.names and c not in PLAN_SCHEMA.names]
    if unknown:
        raise DataError(f"episode table has unknown column(s) {unknown}; known: {USER_SCHEMA.names}")
    n = table.num_rows
    cols = []
    for fld in USER_SCHEMA:
        if fld.name in table.column_names:
            col = table.column(fld.name)
            if fld.name == "metadata" and not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_null(col.type)):
                raise DataError(f"metadata column must hold JSON strings, got {col.type}")
            try:
                col = col.cast(fld.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise DataError(f"column {fld.name!r} cannot be read as {fld.type}: {exc}") from None
        else:
            col = pa.nulls(n, fld.type)
        cols.append(col)
    out = pa.Table.from_arrays(cols, schema=USER_SCHEMA)
    if n == 0:
        return out

    ids = out.column("episode_id")

    def name(i: int) -> str:
        return repr(ids[i].as_py())

    bad = _first_true(pc.or_kleene(pc.is_null(ids), pc.equal(pc.utf8_length(ids), 0)))
    if bad is not None:
        raise DataError(f"episode at table row {bad} has an empty episode_id")
    split = out.column("split")
    bad = _first_true(pc.invert(pc.fill_null(pc.is_in(split, value_set=pa.array(SPLITS)), False)))
    if bad is not None:
        raise DataError(f"episode {name(bad)}: split {split[bad].as_py()!r} is not one of {SPLITS}")
    length = out.column("length")
    bad = _first_true(pc.or_kleene(pc.is_null(length), pc.less_equal(length, 0)))
    if bad is not None:
        raise DataError(f"episode {name(bad)}: length must be > 0, got {length[bad].as_py()}")
    meta = out.column("metadata")
    if meta.null_count < n:
        for value in pc.unique(meta.drop_null()).to_pylist():
            try:
                json.loads(value)
            except ValueError:
                bad = _first_true(pc.equal(meta, value))
                raise DataError(f"episode {name(bad)}: metadata is not valid JSON") from None
    return out


@dataclasses.dataclass
class PlanState:
    """Where the next plan group starts: ``(total_rows, total_slots, num_shards)`` so far."""

    rows: int = 0
    slots: int = 0
    shards: int = 0


def plan_group(
    new: pa.Table, state: PlanState, *, shard_size: int, chunk_rows: int, episode_chunk_rows: int
) -> list[pa.Table]:
    """Plan one group of new episodes (already normalised), starting a fresh shard.

    Args:
        new: ``[N]`` episodes in :data:`USER_SCHEMA`.
        state: the plan's end so far; advanced past the new shards.
        shard_size: most episodes per new shard.
        chunk_rows: step-row alignment of shard regions.
        episode_chunk_rows: episode-slot alignment of shard regions.

    Returns:
        One :data:`CATALOG_SCHEMA` table per new shard, in order.
    """
    if not isinstance(shard_size, int) or shard_size <= 0:
        raise ConfigError(f"shard_size must be a positive int, got {shard_size!r}")
    lengths = np.asarray(new.column("length").to_numpy(zero_copy_only=False), dtype=np.int64)
    out = []
    for s0 in range(0, new.num_rows, shard_size):
        s1 = min(new.num_rows, s0 + shard_size)
        row = _align(state.rows, chunk_rows)
        first_slot = _align(state.slots, episode_chunk_rows)
        part = lengths[s0:s1]
        offsets = row + np.concatenate([[0], np.cumsum(part[:-1])]).astype(np.int64)
        plan_cols = [
            pa.array(np.full(s1 - s0, state.shards, np.int64)),
            pa.array(offsets),
            pa.array(first_slot + np.arange(s1 - s0, dtype=np.int64)),
        ]
        out.append(pa.Table.from_arrays(list(new.slice(s0, s1 - s0).columns) + plan_cols, schema=CATALOG_SCHEMA))
        state.rows = row + int(part.sum())
        state.slots = first_slot + (s1 - s0)
        state.shards += 1
    return out


def plan(
    new: pa.Table,
    existing: pa.Table,
    *,
    shard_size: int,
    chunk_rows: int,
    episode_chunk_rows: int,
) -> pa.Table:
    """Append ``new`` episodes (already normalised) to an in-memory ``existing`` catalog.

    The reference form of the plan (the store streams the same computation,
    :func:`plan_group`, without holding the catalog).

    Returns:
        The full catalog (existing rows unchanged, new rows appended).

    Raises:
        ValueError: on a duplicate episode id (named) or a bad ``shard_size``.
    """
    seen = set(existing.column("episode_id").to_pylist())
    for eid in new.column("episode_id").to_pylist():
        if eid in seen:
            raise DataError(f"duplicate episode_id {eid!r}")
        seen.add(eid)
    state = PlanState(*extent(existing))
    parts = plan_group(new, state, shard_size=shard_size, chunk_rows=chunk_rows, episode_chunk_rows=episode_chunk_rows)
    return pa.concat_tables([existing.cast(CATALOG_SCHEMA)] + parts)


def extent(catalog: pa.Table) -> tuple[int, int, int]:
    """``(total_rows, total_slots, num_shards)`` that arrays must have for ``catalog``."""
    if catalog.num_rows == 0:
        return 0, 0, 0
    last = catalog.num_rows - 1
    rows = int(catalog.column("row_offset")[last].as_py()) + int(catalog.column("length")[last].as_py())
    slots = int(catalog.column("episode_slot")[last].as_py()) + 1
    shards = int(catalog.column("shard")[last].as_py()) + 1
    return rows, slots, shards


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Per-shard summary of a catalog, O(#shards) (no per-episode data).

    Attributes:
        first: ``[S + 1]`` catalog row where each shard starts (last: number of episodes).
        row0: ``[S]`` first step row of each shard.
        rows: ``[S]`` step rows of each shard.
        slot0: ``[S]`` first episode slot of each shard.
        first_ids: ``[S]`` episode id of each shard's first episode.
    """

    first: np.ndarray
    row0: np.ndarray
    rows: np.ndarray
    slot0: np.ndarray
    first_ids: tuple[str, ...]

    @property
    def num_shards(self) -> int:
        return len(self.row0)

    @property
    def num_episodes(self) -> int:
        return int(self.first[-1])

    def extent(self) -> tuple[int, int, int]:
        """``(total_rows, total_slots, num_shards)``."""
        if not self.num_shards:
            return 0, 0, 0
        s = self.num_shards - 1
        return int(self.row0[s] + self.rows[s]), int(self.slot0[s] + self.first[s + 1] - self.first[s]), self.num_shards

    def counts(self) -> np.ndarray:
        """``[S]`` episodes per shard."""
        return np.diff(self.first)

    def shard_of(self, positions: np.ndarray) -> np.ndarray:
        """Shard of each catalog position."""
        return np.searchsorted(self.first, np.asarray(positions, np.int64), side="right") - 1

    def slots(self, positions: np.ndarray) -> np.ndarray:
        """``episode_slot`` of each catalog position (slots run on within a shard)."""
        positions = np.asarray(positions, np.int64)
        s = self.shard_of(positions)
        return self.slot0[s] + (positions - self.first[s])


class ShardPlanBuilder:
    """Accumulates a :class:`ShardPlan` from catalog rows streamed in order."""

    def __init__(self) -> None:
        self._first: list[int] = []
        self._row0: list[int] = []
        self._rows: list[int] = []
        self._slot0: list[int] = []
        self._ids: list[str] = []
        self._n = 0
        self._last_shard = -1

    def add(self, part: pa.Table) -> None:
        """Add the next rows (columns ``shard``, ``row_offset``, ``length``, ``episode_slot``, ``episode_id``)."""
        n = part.num_rows
        if not n:
            return
        shard = np.asarray(part.column("shard").to_numpy(zero_copy_only=False), np.int64)
        off = np.asarray(part.column("row_offset").to_numpy(zero_copy_only=False), np.int64)
        length = np.asarray(part.column("length").to_numpy(zero_copy_only=False), np.int64)
        slot = np.asarray(part.column("episode_slot").to_numpy(zero_copy_only=False), np.int64)
        starts = np.flatnonzero(np.concatenate([[shard[0] != self._last_shard], shard[1:] != shard[:-1]]))
        if len(self._rows) and (not len(starts) or starts[0] > 0):  # the previous shard continues here
            stop = starts[0] if len(starts) else n
            self._rows[-1] = int(off[stop - 1] + length[stop - 1] - self._row0[-1])
        ids = part.column("episode_id").take(pa.array(starts)).to_pylist() if len(starts) else []
        for j, i in enumerate(starts):
            if shard[i] != len(self._row0):
                raise StoreError(f"catalog shard ids are not consecutive (row {self._n + i}: shard {shard[i]})")
            end = starts[j + 1] if j + 1 < len(starts) else n
            self._first.append(self._n + int(i))
            self._row0.append(int(off[i]))
            self._rows.append(int(off[end - 1] + length[end - 1] - off[i]))
            self._slot0.append(int(slot[i]))
            self._ids.append(ids[j])
        self._n += n
        self._last_shard = int(shard[-1])

    def build(self) -> ShardPlan:
        return ShardPlan(
            first=np.asarray(self._first + [self._n], np.int64),
            row0=np.asarray(self._row0, np.int64),
            rows=np.asarray(self._rows, np.int64),
            slot0=np.asarray(self._slot0, np.int64),
            first_ids=tuple(self._ids),
        )
