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
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from cupid_engine.constants import SPLITS

CATALOG_NAME = "catalog.parquet"

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
    ]
)
"""Columns a caller provides; only episode_id, split and length are required."""

REQUIRED = ("episode_id", "split", "length")

PLAN_SCHEMA = pa.schema([("shard", pa.int64()), ("row_offset", pa.int64()), ("episode_slot", pa.int64())])

CATALOG_SCHEMA = pa.schema(list(USER_SCHEMA) + list(PLAN_SCHEMA))


def empty_catalog() -> pa.Table:
    """A catalog with no episodes."""
    return CATALOG_SCHEMA.empty_table()


def _align(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def normalize(table: pa.Table) -> pa.Table:
    """Validate new episodes and cast them to :data:`USER_SCHEMA`.

    Missing optional columns become nulls; unknown columns raise (so that a typo never
    silently drops data).

    Raises:
        ValueError: naming the column or the episode that is invalid.
    """
    if not isinstance(table, pa.Table):
        raise TypeError(f"add_episodes expects a pyarrow.Table, got {type(table).__name__}")
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise ValueError(f"episode table lacks required column(s) {missing}")
    unknown = [c for c in table.column_names if c not in USER_SCHEMA.names and c not in PLAN_SCHEMA.names]
    if unknown:
        raise ValueError(f"episode table has unknown column(s) {unknown}; known: {USER_SCHEMA.names}")
    n = table.num_rows
    cols = []
    for fld in USER_SCHEMA:
        if fld.name in table.column_names:
            col = table.column(fld.name)
            if fld.name == "metadata" and not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_null(col.type)):
                raise ValueError(f"metadata column must hold JSON strings, got {col.type}")
            try:
                col = col.cast(fld.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ValueError(f"column {fld.name!r} cannot be read as {fld.type}: {exc}") from None
        else:
            col = pa.nulls(n, fld.type)
        cols.append(col)
    out = pa.Table.from_arrays(cols, schema=USER_SCHEMA)

    ids = out.column("episode_id").to_pylist()
    splits = out.column("split").to_pylist()
    lengths = out.column("length").to_pylist()
    metas = out.column("metadata").to_pylist()
    for i, eid in enumerate(ids):
        if eid is None or eid == "":
            raise ValueError(f"episode at table row {i} has an empty episode_id")
        if splits[i] not in SPLITS:
            raise ValueError(f"episode {eid!r}: split {splits[i]!r} is not one of {SPLITS}")
        if lengths[i] is None or lengths[i] <= 0:
            raise ValueError(f"episode {eid!r}: length must be > 0, got {lengths[i]}")
        if metas[i] is not None:
            try:
                json.loads(metas[i])
            except ValueError:
                raise ValueError(f"episode {eid!r}: metadata is not valid JSON") from None
    return out


def plan(
    new: pa.Table,
    existing: pa.Table,
    *,
    shard_size: int,
    chunk_rows: int,
    episode_chunk_rows: int,
) -> pa.Table:
    """Append ``new`` episodes (already normalised) to ``existing`` with their shard plan.

    Args:
        new: ``[N]`` episodes in :data:`USER_SCHEMA`.
        existing: the current catalog (:data:`CATALOG_SCHEMA`).
        shard_size: most episodes per new shard.
        chunk_rows: step-row alignment of shard regions.
        episode_chunk_rows: episode-slot alignment of shard regions.

    Returns:
        The full catalog (existing rows unchanged, new rows appended).

    Raises:
        ValueError: on a duplicate episode id (named) or a bad ``shard_size``.
    """
    if not isinstance(shard_size, int) or shard_size <= 0:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    seen = set(existing.column("episode_id").to_pylist())
    for eid in new.column("episode_id").to_pylist():
        if eid in seen:
            raise ValueError(f"duplicate episode_id {eid!r}")
        seen.add(eid)

    n = new.num_rows
    end_row, end_slot, next_shard = extent(existing)
    lengths = np.asarray(new.column("length").to_numpy(zero_copy_only=False), dtype=np.int64)
    shard = np.empty(n, np.int64)
    row_offset = np.empty(n, np.int64)
    slot = np.empty(n, np.int64)
    for s0 in range(0, n, shard_size):
        s1 = min(n, s0 + shard_size)
        row = _align(end_row, chunk_rows)
        first_slot = _align(end_slot, episode_chunk_rows)
        shard[s0:s1] = next_shard
        row_offset[s0:s1] = row + np.concatenate([[0], np.cumsum(lengths[s0 : s1 - 1])])
        slot[s0:s1] = first_slot + np.arange(s1 - s0)
        end_row = row + int(lengths[s0:s1].sum())
        end_slot = first_slot + (s1 - s0)
        next_shard += 1
    planned = pa.Table.from_arrays(
        list(new.columns) + [pa.array(shard), pa.array(row_offset), pa.array(slot)], schema=CATALOG_SCHEMA
    )
    return pa.concat_tables([existing, planned])


def extent(catalog: pa.Table) -> tuple[int, int, int]:
    """``(total_rows, total_slots, num_shards)`` that arrays must have for ``catalog``."""
    if catalog.num_rows == 0:
        return 0, 0, 0
    last = catalog.num_rows - 1
    rows = int(catalog.column("row_offset")[last].as_py()) + int(catalog.column("length")[last].as_py())
    slots = int(catalog.column("episode_slot")[last].as_py()) + 1
    shards = int(catalog.column("shard")[last].as_py()) + 1
    return rows, slots, shards
