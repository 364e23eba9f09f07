"""Reading and writing a store's ``catalog.parquet``.

:class:`_CatalogSnapshot` is one version of the file, read as little as each caller needs
(row groups of whole shards, single columns, id look-ups by hash); :class:`_CatalogSink`
writes the next version beside it, committed by rename (local) or one put (remote).
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cupid_engine.errors import DataError, StoreError
from cupid_engine.store import catalog as _catalog
from cupid_engine.store.errors import _Damaged
from cupid_engine.store.location import _Location

_DAMAGED = "the store is damaged: restore it from a copy or featurise into a new store"


def _id_hashes(values: list[str]) -> np.ndarray:
    """``[n]`` int64 hashes of episode ids (Python's str hash: equal within one process only).

    Only ever used to find *candidates*: every match is confirmed by comparing the ids.
    """
    return np.fromiter(map(hash, values), np.int64, count=len(values))


def _hash_ids(ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return _id_hashes(ids.to_pylist())


def _empty(columns: list[str] | None) -> pa.Table:
    t = _catalog.empty_catalog()
    return t if columns is None else t.select(columns)


class _CatalogSnapshot:
    """One version of ``catalog.parquet``, read as little as each caller needs.

    Opening reads the footer and the plan columns (streamed row group by row group) into
    a :class:`~cupid_engine.store.catalog.ShardPlan`: O(#shards) memory. Everything per
    episode is loaded only when asked for, and columnar: ``length`` and ``row_offset``
    as int64 numpy arrays, ids as an Arrow array, plus sorted id hashes for id -> row
    look-ups (about 50 B per episode in all). A shard's rows are read from its own row
    group(s) only, so a worker never loads the catalog.
    """

    _PLAN_COLUMNS = ["episode_id", "length", "shard", "row_offset", "episode_slot"]

    def __init__(self, loc: _Location) -> None:
        path = loc.path(_catalog.CATALOG_NAME)
        self.stamp: tuple | None = None
        try:
            if loc.is_local:
                handle = pa.OSFile(path)  # Arrow's own reader: no Python buffers per read
                st = os.fstat(handle.fileno())
                self.stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            else:
                data = loc.read_bytes(_catalog.CATALOG_NAME)
                if data is None:
                    raise FileNotFoundError(path)
                handle = io.BytesIO(data)
        except FileNotFoundError:
            raise _Damaged("the store lacks its catalog", where=path, hint=_DAMAGED) from None
        try:
            self._file = pq.ParquetFile(handle)
            names = self._file.schema_arrow.names
        except (pa.ArrowException, OSError) as exc:
            raise StoreError(f"cannot read the catalog ({exc})", where=path, hint=_DAMAGED) from None
        self._legacy = names == _catalog.LEGACY_NAMES  # written before episode fingerprints
        if names != _catalog.CATALOG_SCHEMA.names and not self._legacy:
            raise StoreError(f"catalog columns {names} do not match the schema",
                             where=loc.path(_catalog.CATALOG_NAME), hint="the store is damaged or foreign")
        meta = self._file.metadata
        self.num_rows = int(meta.num_rows)
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        self.group_first = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        builder = _catalog.ShardPlanBuilder()
        for g in range(meta.num_row_groups):
            builder.add(self._file.read_row_group(g, columns=self._PLAN_COLUMNS))
        self.plan = builder.build()
        self.total_rows, self.total_slots, self.num_shards = self.plan.extent()
        self._columns: dict[str, Any] = {}
        self._table: pa.Table | None = None
        self._lookup: tuple[np.ndarray, np.ndarray] | None = None

    # -- rows ----------------------------------------------------------------------------
    def _pq(self, columns: list[str] | None, group: int | None = None) -> pa.Table:
        """Columns of one row group (or the file) as stored; a legacy file gets null fingerprints."""
        want = list(_catalog.CATALOG_SCHEMA.names if columns is None else columns)
        have = [c for c in want if c != "fingerprint"] if self._legacy else want
        t = self._file.read(columns=have) if group is None else self._file.read_row_group(group, columns=have)
        if self._legacy and "fingerprint" in want:
            t = t.append_column("fingerprint", pa.nulls(t.num_rows, pa.string())).select(want)
        return t

    def num_row_groups(self) -> int:
        return len(self.group_first) - 1

    def row_group(self, g: int, columns: list[str] | None = None) -> pa.Table:
        return self._pq(columns, g).cast(
            _catalog.CATALOG_SCHEMA if columns is None else pa.schema([_catalog.CATALOG_SCHEMA.field(c) for c in columns])
        )

    def read(self, a: int, b: int, columns: list[str] | None = None) -> pa.Table:
        """Catalog rows ``[a, b)``, reading only the row groups that hold them."""
        g0 = int(np.searchsorted(self.group_first, a, side="right")) - 1
        g1 = int(np.searchsorted(self.group_first, b, side="left"))
        if b <= a or g0 >= g1:
            return self.row_group(0, columns).slice(0, 0) if self.num_row_groups() else _empty(columns)
        parts = [self.row_group(g, columns) for g in range(g0, g1)]
        t = parts[0] if len(parts) == 1 else pa.concat_tables(parts)
        return t.slice(a - int(self.group_first[g0]), b - a)

    def take(self, positions: np.ndarray, columns: list[str] | None = None) -> pa.Table:
        """Catalog rows at ``positions`` (in that order), reading only their row groups."""
        positions = np.asarray(positions, np.int64)
        if self._table is not None:
            t = self._table if columns is None else self._table.select(columns)
            return t.take(pa.array(positions))
        groups = np.searchsorted(self.group_first, positions, side="right") - 1
        parts, where = [], np.empty(len(positions), np.int64)
        done = 0
        for g in np.unique(groups):
            sel = np.flatnonzero(groups == g)
            t = self.row_group(int(g), columns).take(pa.array(positions[sel] - self.group_first[g]))
            parts.append(t)
            where[sel] = done + np.arange(len(sel))
            done += len(sel)
        if not parts:
            return _empty(columns)
        return pa.concat_tables(parts).take(pa.array(where))

    def table(self) -> pa.Table:
        """The whole catalog (loaded on first use and kept)."""
        if self._table is None:
            self._table = self._pq(None).cast(_catalog.CATALOG_SCHEMA)
        return self._table

    def column(self, name: str) -> pa.ChunkedArray:
        """One whole column, as Arrow (cached)."""
        key = "arrow:" + name
        if key not in self._columns:
            if self._table is not None:
                self._columns[key] = self._table.column(name)
            else:
                self._columns[key] = self._pq([name]).column(0).cast(_catalog.CATALOG_SCHEMA.field(name).type)
        return self._columns[key]

    def int_column(self, name: str) -> np.ndarray:
        """``[N]`` int64 numpy copy of a plan column (``length``, ``row_offset``; cached)."""
        if name not in self._columns:
            col = self._file.read(columns=[name]).column(0)
            self._columns[name] = np.asarray(col.to_numpy(), dtype=np.int64) if len(col) else np.zeros(0, np.int64)
        return self._columns[name]

    # -- ids -----------------------------------------------------------------------------
    def ids(self, a: int = 0, b: int | None = None) -> list[str]:
        b = self.num_rows if b is None else b
        return self.column("episode_id").slice(a, max(0, b - a)).to_pylist()

    def positions(self, ids: list[str]) -> np.ndarray:
        """``[m]`` catalog row of each id, -1 where unknown: O(m log N) after one O(N) build."""
        if self._lookup is None:
            col = self.column("episode_id")
            # Hashed in slices: only one slice of ids is ever a list of Python strings.
            h = np.concatenate([_hash_ids(col.slice(i, 65536)) for i in range(0, len(col), 65536)]
                               or [np.zeros(0, np.int64)])
            order = np.argsort(h, kind="stable")
            self._lookup = (h[order], order.astype(np.int64))
        sorted_h, order = self._lookup
        q = _id_hashes(ids)
        lo = np.searchsorted(sorted_h, q, side="left")
        hi = np.searchsorted(sorted_h, q, side="right")
        out = np.full(len(ids), -1, np.int64)
        one = np.flatnonzero(hi - lo == 1)
        if len(one):
            cand = order[lo[one]]
            stored = self.column("episode_id").take(pa.array(cand))
            same = pc.equal(stored, pa.array([ids[i] for i in one], pa.string()))
            ok = np.asarray(same.to_numpy(zero_copy_only=False), dtype=bool)
            out[one[ok]] = cand[ok]
        col = self.column("episode_id")
        for i in np.flatnonzero(hi - lo > 1):  # hash collisions: compare each candidate
            for p in order[lo[i] : hi[i]]:
                if col[int(p)].as_py() == ids[i]:
                    out[i] = p
                    break
        return out

    def episodes_in_rows(self, r0: int, r1: int) -> list[str]:
        """Ids of episodes whose step rows intersect ``[r0, r1)``."""
        off, length = self.int_column("row_offset"), self.int_column("length")
        lo = int(np.searchsorted(off + length, r0, side="right"))
        hi = int(np.searchsorted(off, r1, side="left"))
        return self.ids(lo, hi)

    def episodes_in_slots(self, s0: int, s1: int) -> list[str]:
        slots = self.plan.slots(np.arange(self.num_rows))
        return self.ids(int(np.searchsorted(slots, s0, side="left")), int(np.searchsorted(slots, s1, side="left")))

    def shard_range(self, shard_id: int) -> tuple[int, int]:
        return int(self.plan.first[shard_id]), int(self.plan.first[shard_id + 1])

    def episodes_in_shard(self, shard_id: int) -> list[str]:
        if shard_id >= self.num_shards:
            return []
        return self.ids(*self.shard_range(shard_id))


class _CatalogSink:
    """Writes a new ``catalog.parquet`` beside the old one, one row group per call.

    Row groups hold whole shards (a shard never spans two), at least
    ``catalog.ROW_GROUP_ROWS`` rows each but the last: a shard's rows are read from one
    row group, and the footer stays small (O(N / ROW_GROUP_ROWS), not O(#shards)).
    Local stores write a temporary file and rename it over the old one on commit (a
    crash leaves the old catalog whole); other stores build the file in memory.
    """

    def __init__(self, loc: _Location) -> None:
        self._loc = loc
        self._path = loc.path(_catalog.CATALOG_NAME)
        if loc.is_local:
            self.tmp = f"{self._path}.tmp-{os.getpid()}"
            self._out: Any = open(self.tmp, "wb")
        else:
            self.tmp = None
            self._out = io.BytesIO()
        # No column statistics: nothing filters on them, and they would grow the footer per shard.
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(self._out, _catalog.CATALOG_SCHEMA, write_statistics=False)

        self._buffer: list[pa.Table] = []
        self._buffered = 0

    def write(self, part: pa.Table) -> None:
        """Add rows; they form row groups of whole parts of >= ``ROW_GROUP_ROWS`` rows."""
        if part.num_rows:
            self._buffer.append(part)
            self._buffered += part.num_rows
            if self._buffered >= _catalog.ROW_GROUP_ROWS:
                self._flush()

    def _flush(self) -> None:
        if self._buffered:
            t = pa.concat_tables(self._buffer)
            self._writer.write_table(t, row_group_size=t.num_rows)
        self._buffer, self._buffered = [], 0

    def close(self) -> None:
        if self._writer is not None:
            self._flush()
            self._writer.close()
            self._writer = None
        if self.tmp is not None and not self._out.closed:
            self._out.flush()
            os.fsync(self._out.fileno())
            self._out.close()

    def reader(self) -> pq.ParquetFile:
        """The written (closed) file, for checks before commit."""
        if self.tmp is not None:
            return pq.ParquetFile(self.tmp)
        return pq.ParquetFile(io.BytesIO(self._out.getvalue()))

    def discard(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - discarding after an error: keep the first one
            pass
        if self.tmp is not None and os.path.exists(self.tmp):
            os.remove(self.tmp)

    def commit(self) -> None:
        if self.tmp is not None:
            os.replace(self.tmp, self._path)
        else:
            self._loc.fs.pipe_file(self._path, self._out.getvalue())


def _check_unique(sink: _CatalogSink, hashes: np.ndarray) -> None:
    """Raise naming the first repeated episode id of the written catalog.

    Hashes find candidate repeats in O(N log N) time and 8 B per episode; the candidates
    are then compared exactly (a hash collision is not a duplicate).
    """
    hashes.sort()  # in place: no second copy
    cand = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
    if not len(cand):
        return
    seen: set[str] = set()
    f = sink.reader()
    for g in range(f.metadata.num_row_groups):
        col = f.read_row_group(g, columns=["episode_id"]).column(0)
        h = _hash_ids(col)
        for i in np.flatnonzero(np.isin(h, cand)):
            eid = col[int(i)].as_py()
            if eid in seen:
                raise DataError(f"duplicate episode_id {eid!r}", where="catalog.parquet",
                                hint="episode ids must be unique across every dataset in a store")
            seen.add(eid)


def _table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()
