"""Score tables: the one on-disk and in-memory format every scorer returns.

A score table is a ``pyarrow.Table`` with one row per scored episode and the columns
``episode_id`` (string), ``method`` (string), ``score`` (float64, higher = more useful),
``rank`` (int64, 1 = highest score), ``split`` (string) and ``config_hash`` (string),
followed by free metadata columns (``tier``, ``length``, ...). Ranks break ties by
episode id so they never depend on the order rows were scored in. The scorer's full
config is kept in the schema metadata so a Parquet file says what produced it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CORE_COLUMNS = ("episode_id", "method", "score", "rank", "split", "config_hash")


def ranks_desc(scores: np.ndarray, ids: Sequence[str]) -> np.ndarray:
    """Ranks with 1 = highest score; ties broken by ascending episode id.

    Args:
        scores: ``[N]`` scores.
        ids: ``N`` episode ids.

    Returns:
        ``[N]`` int64 ranks in 1..N.
    """
    scores = np.asarray(scores, dtype=np.float64)
    ids_arr = np.asarray([str(i) for i in ids])
    # lexsort sorts by the last key first: primary -score, secondary id.
    order = np.lexsort((ids_arr, -scores))
    rank = np.empty(len(scores), dtype=np.int64)
    rank[order] = np.arange(1, len(scores) + 1)
    return rank


def make_table(
    episode_ids: Sequence[str],
    scores: np.ndarray,
    *,
    method: str,
    splits: Sequence[str] | str = "train",
    config: Any = None,
    metadata: Mapping[str, Sequence[Any]] | None = None,
) -> pa.Table:
    """Build a score table.

    Args:
        episode_ids: ``N`` episode ids.
        scores: ``[N]`` scores (higher = more useful); NaN is rejected.
        method: Scoring method name.
        splits: One split for all rows or ``N`` splits.
        config: The scorer's :class:`~cupid_engine.config.Config` (hash and JSON recorded).
        metadata: Extra columns, each of length ``N``.

    Returns:
        The score table, rows in the order given.
    """
    ids = [str(i) for i in episode_ids]
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(s) != len(ids):
        raise ValueError(f"{len(ids)} episode ids but {len(s)} scores")
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate episode ids in a score table")
    bad = ~np.isfinite(s)
    if bad.any():
        raise ValueError(f"non-finite score for episode {ids[int(np.flatnonzero(bad)[0])]!r} ({method})")
    split_col = [splits] * len(ids) if isinstance(splits, str) else [str(x) for x in splits]
    if len(split_col) != len(ids):
        raise ValueError("splits must have one entry per episode")
    chash = config.hash() if config is not None else ""
    cols: dict[str, Any] = {
        "episode_id": pa.array(ids, pa.string()),
        "method": pa.array([method] * len(ids), pa.string()),
        "score": pa.array(s, pa.float64()),
        "rank": pa.array(ranks_desc(s, ids), pa.int64()),
        "split": pa.array(split_col, pa.string()),
        "config_hash": pa.array([chash] * len(ids), pa.string()),
    }
    for name, values in (metadata or {}).items():
        if name in cols:
            raise ValueError(f"metadata column {name!r} clashes with a core column")
        if len(values) != len(ids):
            raise ValueError(f"metadata column {name!r} has {len(values)} rows, expected {len(ids)}")
        cols[name] = pa.array(values) if not isinstance(values, (pa.Array, pa.ChunkedArray)) else values
    meta = {b"cupid.method": method.encode()}
    if config is not None:
        meta[b"cupid.config"] = config.to_json().encode()
    return pa.table(cols).replace_schema_metadata(meta)


def validate_table(table: pa.Table) -> pa.Table:
    """Raise unless ``table`` has the core score-table columns; returns it."""
    missing = [c for c in CORE_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"not a score table: missing columns {missing}")
    return table


def write_table(table: pa.Table, path: str | os.PathLike) -> None:
    """Write a score table to Parquet (creating parent folders)."""
    validate_table(table)
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    pq.write_table(table, path)


def read_table(path: str | os.PathLike) -> pa.Table:
    """Read a score table written by :func:`write_table`."""
    return validate_table(pq.read_table(path))


def as_table(scores: pa.Table | str | os.PathLike) -> pa.Table:
    """A score table from a table or a Parquet path."""
    if isinstance(scores, pa.Table):
        return validate_table(scores)
    return read_table(scores)


def tie_summary(table: pa.Table) -> tuple[float, int]:
    """The most common score of a table and how many rows share it (``(nan, 0)`` if empty).

    A score that ties most rows cannot order them (``length`` at a fixed horizon, a
    constant feature): ranks and curation then follow the episode-id tie-break.
    """
    s = np.asarray(validate_table(table).column("score").to_numpy(), np.float64)
    if s.size == 0:
        return float("nan"), 0
    values, counts = np.unique(s, return_counts=True)
    i = int(np.argmax(counts))
    return float(values[i]), int(counts[i])


def table_config(table: pa.Table) -> dict[str, Any] | None:
    """The scorer config recorded in a table's schema metadata, if any."""
    meta = table.schema.metadata or {}
    raw = meta.get(b"cupid.config")
    return json.loads(raw) if raw else None
