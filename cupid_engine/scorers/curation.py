"""Curation from score tables: filter-k, select-k and score combination (DESIGN §1).

- :func:`filter_k` removes the k lowest-scoring **training** demos;
- :func:`select_k` adds the k highest-scoring **holdout** demos to the training set;
- :func:`keep_k` keeps the k highest-scoring rows of any split(s) (the best k demos);
- :func:`combine` is the min-max normalised weighted sum of several methods' scores.

Order within a score is decided by the table's ``rank`` (ties broken by episode id), so
curation never depends on row order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cupid_engine.errors import ConfigError
from cupid_engine.scorers.table import as_table, make_table, ranks_desc


def _split_rows(table: pa.Table, split: str) -> pa.Table:
    return table.filter(pc.equal(table.column("split"), split))


def _sorted_desc(table: pa.Table) -> pa.Table:
    """Rows by descending score, ties by episode id (re-ranked within the subset)."""
    ids = table.column("episode_id").to_pylist()
    order = np.argsort(ranks_desc(table.column("score").to_numpy(), ids))
    return table.take(pa.array(order))


def filter_k(scores: pa.Table | str | os.PathLike, k: int) -> tuple[pa.Table, list[str]]:
    """Remove the ``k`` lowest-scoring training demos.

    Args:
        scores: A score table or its Parquet path.
        k: Number of training demos to remove (0 <= k <= #train).

    Returns:
        ``(kept, removed_ids)``: the kept training rows (best first) and the removed ids
        (lowest score first).
    """
    table = _sorted_desc(_split_rows(as_table(scores), "train"))
    n = table.num_rows
    if not 0 <= k <= n:
        raise ConfigError(f"filter k must be in [0, {n}] (training demos in the table), got {k}")
    removed = table.slice(n - k).column("episode_id").to_pylist()[::-1]
    return table.slice(0, n - k), removed


def select_k(scores: pa.Table | str | os.PathLike, k: int) -> tuple[pa.Table, list[str]]:
    """Add the ``k`` highest-scoring holdout demos to the training demos.

    Args:
        scores: A score table (with train and holdout rows) or its Parquet path.
        k: Number of holdout demos to add (0 <= k <= #holdout).

    Returns:
        ``(selected, added_ids)``: all training rows plus the added holdout rows, and the
        added ids (best first).
    """
    table = as_table(scores)
    hold = _sorted_desc(_split_rows(table, "holdout"))
    if not 0 <= k <= hold.num_rows:
        hint = (" (`curate keep --k N` keeps the best N demos of any split)" if hold.num_rows == 0 else "")
        raise ConfigError(f"select adds holdout demos: k must be in [0, {hold.num_rows}] (holdout demos in the "
                          f"table), got {k}{hint}")
    added = hold.slice(0, k)
    train = _sorted_desc(_split_rows(table, "train"))
    return pa.concat_tables([train, added]), added.column("episode_id").to_pylist()


def keep_k(scores: pa.Table | str | os.PathLike, k: int, *, splits: Sequence[str] | None = None
           ) -> tuple[pa.Table, list[str]]:
    """Keep the ``k`` highest-scoring rows (the best k demos), whatever their split.

    Args:
        scores: A score table or its Parquet path.
        k: Number of rows to keep (0 <= k <= rows considered).
        splits: Only rows of these splits (None: every row).

    Returns:
        ``(kept, dropped_ids)``: the kept rows (best first) and the ids left out
        (lowest score first).
    """
    table = as_table(scores)
    if splits:
        table = table.filter(pc.is_in(table.column("split"), value_set=pa.array(list(splits), pa.string())))
    table = _sorted_desc(table)
    n = table.num_rows
    where = f" of split(s) {', '.join(splits)}" if splits else ""
    if not 0 <= k <= n:
        raise ConfigError(f"keep k must be in [0, {n}] (rows{where} in the table), got {k}")
    dropped = table.slice(k).column("episode_id").to_pylist()[::-1]
    return table.slice(0, k), dropped


def combine(
    tables: Sequence[pa.Table | str | os.PathLike], weights: Sequence[float] | None = None, *, method: str = "combined"
) -> pa.Table:
    """Min-max normalised weighted sum of several score tables, per episode.

    Args:
        tables: Score tables over the same episodes.
        weights: One weight per table (default: equal weights summing to 1).
        method: Method name of the result.

    Returns:
        A score table (split and metadata from the first table).
    """
    ts = [as_table(t) for t in tables]
    if not ts:
        raise ValueError("nothing to combine")
    w = np.full(len(ts), 1.0 / len(ts)) if weights is None else np.asarray(weights, np.float64)
    if len(w) != len(ts):
        raise ValueError(f"{len(ts)} tables but {len(w)} weights")
    base_ids = ts[0].column("episode_id").to_pylist()
    total = np.zeros(len(base_ids))
    for t, wi in zip(ts, w):
        by_id = dict(zip(t.column("episode_id").to_pylist(), t.column("score").to_numpy()))
        if set(by_id) != set(base_ids):
            raise ValueError("combine: tables cover different episodes")
        s = np.asarray([by_id[e] for e in base_ids])
        lo, hi = s.min(), s.max()
        total += wi * (np.zeros_like(s) if hi <= lo else (s - lo) / (hi - lo))
    first = ts[0]
    meta = {c: first.column(c).to_pylist() for c in first.column_names if c not in
            ("episode_id", "method", "score", "rank", "split", "config_hash")}
    return make_table(base_ids, total, method=method, splits=first.column("split").to_pylist(), metadata=meta)
