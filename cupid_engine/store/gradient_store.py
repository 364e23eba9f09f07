"""The gradient store: a Zarr v3 group holding the episode catalog and feature runs.

Layout (DESIGN §4)::

    <store>/zarr.json            group; attrs["cupid_engine"] = schema version, chunk sizes
    <store>/catalog.parquet      one row per episode + the shard plan (see catalog.py),
                                 row groups of whole shards: read per shard, never whole
    <store>/runs/<name>/...      one Run per featuriser configuration (see run.py)

This module owns opening/creating the store (local paths and fsspec URLs), the catalog
(append-only, driver side) and whole-store checks (:meth:`GradientStore.verify`,
:meth:`GradientStore.info`). Writing and reading features is the job of
:class:`cupid_engine.store.run.Run`.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr

from cupid_engine.constants import SCHEMA_VERSION
from cupid_engine.errors import (
    ConfigError,
    UserError,
    DataError,
    NotAStoreError,
    ReadOnlyStoreError,
    StoreError,
    StoreExistsError,
    StoreNotFoundError,
    one_line,
)
from cupid_engine.store import catalog as _catalog
from cupid_engine.store.config import RunConfig
from cupid_engine.store.errors import (  # noqa: F401 - the store's errors, importable from here too
    CorruptChunk,
    CorruptChunkError,
    SchemaVersionError,
    StoreKeyError,
    VerifyReport,
    _Damaged,
)
from cupid_engine.store.run import Run

log = logging.getLogger(__name__)

ATTR_KEY = "cupid_engine"
"""Group attribute holding the store's own metadata (kind, schema version, chunking)."""

DEFAULT_CHUNK_ROWS = 1024
"""Step rows per chunk: 1024 x 4096 fp16 = 8 MiB, large enough for streaming I/O."""

DEFAULT_EPISODE_CHUNK_ROWS = 64
"""Episodes per chunk of the ``episodes`` array (64 x 4096 fp32 = 1 MiB)."""

RUNS_GROUP = "runs"
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_MODES = ("r", "r+", "a")


class _Location:
    """Where a store lives: a local directory or an fsspec URL.

    zarr gets the plain path (LocalStore, fastest) or the URL (zarr routes it through
    FsspecStore); the catalog file goes through the matching fsspec filesystem.
    """

    def __init__(self, store: str | os.PathLike) -> None:
        if not isinstance(store, (str, os.PathLike)):
            raise TypeError(f"store must be a path or URL string, got {type(store).__name__}")
        url = os.fspath(store)
        if url.startswith("file://"):
            url = url[len("file://") :]
        self.is_local = "://" not in url and "::" not in url
        if self.is_local:
            self.root = os.path.abspath(url)
            self.zarr_target: str = self.root
            self.fs = fsspec.filesystem("file")
        else:
            self.fs, self.root = fsspec.core.url_to_fs(url)
            self.zarr_target = url
        self.url = url

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def exists(self) -> bool:
        return self.fs.exists(self.path("zarr.json"))

    def is_store(self) -> bool:
        """Whether ``zarr.json`` is a gradient store's group (not any Zarr data)."""
        try:
            raw = self.read_bytes("zarr.json")
            meta = json.loads(raw) if raw is not None else None
        except (OSError, ValueError):
            return False
        attrs = (meta or {}).get("attributes") or {} if isinstance(meta, dict) else {}
        return isinstance(attrs.get(ATTR_KEY), dict) and attrs[ATTR_KEY].get("kind") == "gradient_store"

    def listing(self) -> list[str] | None:
        """Names in the folder (sorted), ``None`` when nothing is there; a file raises."""
        if not self.fs.exists(self.root):
            return None
        if not self.fs.isdir(self.root):
            raise NotAStoreError(f"{self.url} is a file, not a gradient store folder",
                                 hint="give a folder path for the store")
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))

    def describe(self, names: list[str]) -> str:
        """What a non-store folder holds, for refusals (a dataset's format is named)."""
        kind = None
        if "meta" in names and self.fs.exists(self.path("meta/info.json")):
            kind = "a LeRobot dataset (meta/info.json)"
        elif "meta" in names and self.fs.exists(self.path("meta/episode_ends")):
            kind = "a replay-buffer dataset (meta/episode_ends)"
        elif any(re.match(r".*\.tfrecord-\d{5}-of-\d{5}$", n) for n in names):
            kind = "an RLDS dataset (*.tfrecord shards)"
        elif any(n.endswith((".hdf5", ".h5")) for n in names):
            kind = "HDF5 files (robomimic datasets?)"
        elif "zarr.json" in names:
            kind = "a Zarr group that is not a cupid_engine gradient store"
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return f"{kind}: {shown}" if kind else f"{len(names)} entries: {shown}"

    def remove(self) -> None:
        if self.is_local:
            if os.path.isdir(self.root):
                shutil.rmtree(self.root)
        elif self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)

    def read_bytes(self, name: str) -> bytes | None:
        p = self.path(name)
        if not self.fs.exists(p):
            return None
        return self.fs.cat_file(p)

    def write_bytes(self, name: str, data: bytes) -> None:
        p = self.path(name)
        if self.is_local:
            # Write-then-rename so a crash never leaves a half-written catalog.
            tmp = f"{p}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        else:
            self.fs.pipe_file(p, data)


def _id_hashes(values: list[str]) -> np.ndarray:
    """``[n]`` int64 hashes of episode ids (Python's str hash: equal within one process only).

    Only ever used to find *candidates*: every match is confirmed by comparing the ids.
    """
    return np.fromiter(map(hash, values), np.int64, count=len(values))


def _hash_ids(ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return _id_hashes(ids.to_pylist())


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


_DAMAGED = "the store is damaged: restore it from a copy or featurise into a new store"


def _empty(columns: list[str] | None) -> pa.Table:
    t = _catalog.empty_catalog()
    return t if columns is None else t.select(columns)


class GradientStore:
    """A Zarr v3 gradient store: episode catalog + named feature runs.

    Use :meth:`create` / :meth:`open` (or :func:`create_store` / :func:`open_store`).
    The catalog is append-only and edited by one driver process; runs may be written by
    many processes at once, each writing disjoint shards.
    """

    def __init__(self, location: _Location, group: zarr.Group, mode: str) -> None:
        self._loc = location
        self._group = group
        self._mode = mode
        meta = dict(group.attrs.get(ATTR_KEY) or {})
        if meta.get("kind") != "gradient_store":
            raise NotAStoreError(f"{location.url} is a Zarr group but not a cupid_engine gradient store",
                                 hint="give the path of a store made by cupid-engine featurize")
        version = meta.get("schema_version")
        if version != SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{location.url} has store schema version {version}, this cupid_engine reads {SCHEMA_VERSION}",
                hint="use the cupid_engine version that wrote it, or featurise into a new store",
            )
        self.chunk_rows = int(meta["chunk_rows"])
        self.episode_chunk_rows = int(meta["episode_chunk_rows"])
        self._snapshot: _CatalogSnapshot | None = None
        self._locked = False
        self._committed: set[tuple | None] = set()  # catalog versions this handle wrote

    # ------------------------------------------------------------------ open / create
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        overwrite: bool = False,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        episode_chunk_rows: int = DEFAULT_EPISODE_CHUNK_ROWS,
    ) -> GradientStore:
        """Create an empty store.

        Args:
            path: local directory or fsspec URL (``file://``, ``memory://``, ``s3://`` ...).
            overwrite: delete an existing store at ``path`` first; otherwise it is an error.
            chunk_rows: step rows per chunk; every shard's rows start at a multiple of it.
            episode_chunk_rows: episodes per chunk of each run's ``episodes`` array.
        """
        for name, v in (("chunk_rows", chunk_rows), ("episode_chunk_rows", episode_chunk_rows)):
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        loc = _Location(path)
        names = loc.listing()
        if names:  # something is there: only ever replace a gradient store, never other data
            if not loc.is_store():
                raise NotAStoreError(
                    f"{loc.url} is not empty and not a gradient store ({loc.describe(names)})",
                    hint="choose a new or empty folder for the store (nothing there was changed)",
                )
            if not overwrite:
                raise StoreExistsError(f"a store already exists at {loc.url}", hint="pass overwrite=True to replace it")
            loc.remove()
        group = zarr.open_group(loc.zarr_target, mode="w")
        group.require_group(RUNS_GROUP)
        # Catalog before the store attrs: a store is only recognised once it is whole.
        loc.write_bytes(_catalog.CATALOG_NAME, _table_bytes(_catalog.empty_catalog()))
        group.attrs[ATTR_KEY] = {
            "kind": "gradient_store",
            "schema_version": SCHEMA_VERSION,
            "chunk_rows": chunk_rows,
            "episode_chunk_rows": episode_chunk_rows,
        }
        return cls(loc, group, "r+")

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> GradientStore:
        """Open a store.

        Args:
            path: local directory or fsspec URL.
            mode: ``"r"`` read only, ``"r+"`` read/write (must exist), ``"a"`` read/write,
                creating an empty store with default chunking when absent.
        """
        if mode not in _MODES:
            raise ConfigError(f"mode must be one of {_MODES}, got {mode!r}")
        loc = _Location(path)
        if not loc.exists():
            if mode == "a":
                return cls.create(path)  # refuses a non-empty folder that is not a store
            names = loc.listing()
            if names:
                raise NotAStoreError(f"{loc.url} is not a gradient store ({loc.describe(names)})",
                                     hint="give the path of a store made by cupid-engine featurize")
            raise StoreNotFoundError(f"no gradient store at {loc.url}",
                                     hint="create one with cupid-engine featurize --store PATH")
        try:
            group = zarr.open_group(loc.zarr_target, mode="r" if mode == "r" else "r+")
        except (ValueError, KeyError, TypeError) as exc:  # zarr.json that is not JSON / not Zarr metadata
            raise StoreError(f"cannot read the store's Zarr metadata ({type(exc).__name__}: {exc})",
                             where=loc.path("zarr.json"), hint=_DAMAGED) from None
        return cls(loc, group, mode)

    # ------------------------------------------------------------------ properties
    @property
    def url(self) -> str:
        """The path or URL the store was opened with."""
        return self._loc.url

    @property
    def read_only(self) -> bool:
        return self._mode == "r"

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyStoreError(f"store {self.url} is open read-only (mode='r')",
                                     hint="open it with mode='a' to write")

    # ------------------------------------------------------------------ catalog
    def _index(self, refresh: bool = False) -> _CatalogSnapshot:
        """The catalog snapshot; ``refresh`` reopens it when the file changed on disk."""
        if self._snapshot is not None and refresh and self._snapshot.stamp is not None:
            try:
                st = os.stat(self._loc.path(_catalog.CATALOG_NAME))
                if (st.st_ino, st.st_size, st.st_mtime_ns) == self._snapshot.stamp:
                    return self._snapshot
            except FileNotFoundError:
                pass
        if self._snapshot is None or refresh:
            self._snapshot = _CatalogSnapshot(self._loc)
        return self._snapshot

    def catalog(self, *, refresh: bool = False) -> pa.Table:
        """The episode catalog, one row per episode in insertion order.

        This materialises every row (kept until the catalog changes); large-scale code
        paths use :meth:`shard_plan`, :meth:`shard_episodes`, :meth:`positions` and
        :meth:`catalog_rows` instead.

        Args:
            refresh: re-read ``catalog.parquet`` (another process may have appended).
        """
        return self._index(refresh).table()

    @property
    def num_episodes(self) -> int:
        return self._index().num_rows

    def episode_ids(self, split: str | None = None) -> list[str]:
        """Episode ids in catalog order, optionally only those of one split."""
        idx = self._index()
        ids = idx.column("episode_id")
        if split is not None:
            ids = ids.filter(pc.fill_null(pc.equal(idx.column("split"), split), False))
        return ids.to_pylist()

    @property
    def num_shards(self) -> int:
        return self._index().num_shards

    def shard_plan(self, *, refresh: bool = False) -> _catalog.ShardPlan:
        """Per-shard summary (first catalog row, step rows, slots, first episode id): O(#shards)."""
        return self._index(refresh).plan

    def _shard_rows(self, shard_id: int, columns: list[str]) -> pa.Table:
        idx = self._index()
        if shard_id >= idx.num_shards:  # the driver may have appended since we read it
            idx = self._index(refresh=True)
        if not 0 <= shard_id < idx.num_shards:
            raise KeyError(f"shard {shard_id} is not in the shard plan (0..{idx.num_shards - 1})")
        return idx.read(*idx.shard_range(shard_id), columns=columns)

    def shard_episodes(self, shard_id: int) -> tuple[list[str], np.ndarray]:
        """``(episode_ids, lengths [n])`` of one shard, as ``Run.write_shard`` expects them.

        Reads only the shard's own rows of the catalog.
        """
        t = self._shard_rows(shard_id, ["episode_id", "length"])
        return t.column(0).to_pylist(), np.asarray(t.column(1).to_numpy(), dtype=np.int64)

    def positions(self, ids: Sequence[str]) -> np.ndarray:
        """``[m]`` int64 catalog rows of episode ids (O(m log N) once the id hashes are built).

        Raises:
            KeyError: naming unknown ids.
        """
        ids = [str(e) for e in ids]
        pos = self._index().positions(ids)
        if (pos < 0).any():
            pos = self._index(refresh=True).positions(ids)
            if (pos < 0).any():
                raise StoreKeyError(f"unknown episode id(s) {[ids[i] for i in np.flatnonzero(pos < 0)[:10]]} "
                                  f"in the catalog of {self.url}")
        return pos

    def contains(self, ids: Sequence[str]) -> np.ndarray:
        """``[m]`` bool: which ids are in the catalog."""
        idx = self._index()
        if not idx.num_rows:
            return np.zeros(len(ids), bool)
        return idx.positions([str(e) for e in ids]) >= 0

    def catalog_rows(self, ids: Sequence[str], columns: Sequence[str] | None = None) -> pa.Table:
        """Catalog rows of ``ids`` in that order, reading only the row groups holding them.

        Raises:
            KeyError: naming unknown ids.
        """
        cols = None if columns is None else list(columns)
        return self._index().take(self.positions(ids), cols)

    def add_episodes(self, table: pa.Table, *, shard_size: int = 256) -> pa.Table:
        """Append episodes to the catalog and plan their shards.

        Args:
            table: ``[N]`` rows with ``episode_id``, ``split``, ``length`` and optionally
                ``success``, ``return``, ``tier``, ``source``, ``task``, ``metadata`` (JSON).
            shard_size: most episodes per new shard (one worker writes one shard).

        Returns:
            The new catalog rows with their ``shard``, ``row_offset`` and ``episode_slot``.

        Raises:
            ValueError: duplicate id, non-positive length, unknown split (episode named).
        """
        before = self._index(refresh=True).num_rows
        self.append_episodes([table], shard_size=shard_size)
        idx = self._index()
        return idx.read(before, idx.num_rows)

    def append_episodes(self, tables: Iterable[pa.Table], *, shard_size: int = 256) -> int:
        """Append episodes group by group, streaming: each table starts a new shard.

        Use it for sources read unit by unit (one table per source unit, so that no
        shard spans two units): the catalog file is rewritten once, row group by row
        group, and only one table of new episodes is in memory at a time. Nothing is
        appended unless every table is valid.

        Args:
            tables: tables as for :meth:`add_episodes` (an iterator is consumed once).
            shard_size: most episodes per new shard.

        Returns:
            Number of episodes added.

        Raises:
            ValueError: duplicate id, non-positive length, unknown split (episode named).
        """
        self._check_writable()
        if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size <= 0:
            raise ConfigError(f"shard_size must be a positive int, got {shard_size!r}")
        with self.catalog_lock():
            return self._append_locked(tables, shard_size)

    def _append_locked(self, tables: Iterable[pa.Table], shard_size: int) -> int:
        old = self._index(refresh=True)
        state = _catalog.PlanState(old.total_rows, old.total_slots, old.num_shards)
        sink = _CatalogSink(self._loc)
        hashes: list[np.ndarray] = []
        added = 0
        try:
            for g in range(old.num_row_groups()):
                part = old.row_group(g)
                sink.write(part)
                hashes.append(_hash_ids(part.column("episode_id")))
            for table in tables:
                new = _catalog.normalize(table)
                if not new.num_rows:
                    continue
                hashes.append(_hash_ids(new.column("episode_id")))
                for part in _catalog.plan_group(
                    new, state, shard_size=shard_size, chunk_rows=self.chunk_rows,
                    episode_chunk_rows=self.episode_chunk_rows,
                ):
                    sink.write(part)
                added += new.num_rows
            sink.close()
            if not added:
                sink.discard()
                return 0
            all_hashes = np.concatenate(hashes)
            hashes.clear()  # 8 B per episode from here on
            _check_unique(sink, all_hashes)
        except BaseException:
            sink.discard()
            raise
        self._commit(sink)
        return added

    @contextlib.contextmanager
    def catalog_lock(self) -> Iterator[None]:
        """Hold the store's catalog lock (``flock`` on the store folder; re-entrant per handle).

        Two drivers appending at once would each rewrite the catalog from the version they
        read, and the second rename would drop the first's episodes; under the lock the
        second reads the first's catalog. Stores behind fsspec URLs are not locked.
        """
        if not self._loc.is_local or self._locked:
            yield
            return
        fd = os.open(self._loc.root, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._locked = True
            yield
        finally:
            self._locked = False
            os.close(fd)  # releases the lock

    def _commit(self, sink: _CatalogSink) -> None:
        """Swap in a written catalog and remember it as this handle's own (see :class:`StoreUndo`)."""
        sink.commit()
        self._committed.add(_stamp(self._loc))
        self._index(refresh=True)

    def set_fingerprints(self, fingerprints: dict[str, str]) -> list[int]:
        """Record new content fingerprints of stored episodes (an explicit replace).

        The catalog is rewritten row group by row group and swapped in atomically; no
        row moves, so the shard plan is unchanged. The caller invalidates the shards.

        Args:
            fingerprints: episode id -> new fingerprint.

        Returns:
            The shards holding those episodes, sorted.

        Raises:
            StoreKeyError: an id the catalog lacks.
        """
        self._check_writable()
        if not fingerprints:
            return []
        with self.catalog_lock():
            return self._set_fingerprints_locked(fingerprints)

    def _set_fingerprints_locked(self, fingerprints: dict[str, str]) -> list[int]:
        old = self._index(refresh=True)
        pos = self.positions(list(fingerprints))
        shards = sorted({int(x) for x in old.plan.shard_of(pos)})
        wanted = pa.array(list(fingerprints), pa.string())
        col = _catalog.CATALOG_SCHEMA.names.index("fingerprint")
        sink = _CatalogSink(self._loc)
        try:
            for g in range(old.num_row_groups()):
                part = old.row_group(g)
                ids = part.column("episode_id")
                if pc.any(pc.is_in(ids, value_set=wanted)).as_py():
                    values = [fingerprints.get(e, f) for e, f in zip(ids.to_pylist(), part.column(col).to_pylist())]
                    part = part.set_column(col, "fingerprint", pa.array(values, pa.string()))
                sink.write(part)
            sink.close()
        except BaseException:
            sink.discard()
            raise
        self._commit(sink)
        return shards

    # ------------------------------------------------------------------ runs
    def _runs_group(self) -> zarr.Group:
        return self._group[RUNS_GROUP]

    def runs(self) -> list[str]:
        """Names of the runs in the store, sorted."""
        with self._metadata(RUNS_GROUP):
            return sorted(self._runs_group().group_keys())

    @contextlib.contextmanager
    def _metadata(self, relpath: str) -> Iterator[None]:
        """Zarr metadata that does not parse (a damaged ``zarr.json``) becomes a StoreError naming it."""
        try:
            yield
        except UserError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"cannot read Zarr metadata ({type(exc).__name__}: {one_line(exc)})",
                             where=self._loc.path(relpath), hint=_DAMAGED) from None

    def create_run(self, name: str, config: RunConfig):
        """Create a run, or reopen it when it exists with an equal config (resume).

        Raises:
            ValueError: the run exists with a different config (differing keys shown).
        """
        self._check_writable()
        if not isinstance(config, RunConfig):
            raise TypeError(f"config must be a RunConfig, got {type(config).__name__}")
        if not isinstance(name, str) or not _RUN_NAME.match(name):
            raise ConfigError(f"run name {name!r} must match {_RUN_NAME.pattern}")
        if name in self.runs():
            run = Run(self, name, self._runs_group()[name])
            run.check_config(config)
            run._ensure_arrays()  # finishes a create_run that was interrupted
            return run
        group = self._runs_group().create_group(
            name, attributes={"schema_version": SCHEMA_VERSION, "config": config.canonical()}
        )
        run = Run(self, name, group)
        run._ensure_arrays()
        return run

    def run(self, name: str):
        """Open an existing run."""
        if name not in self.runs():
            raise StoreKeyError(f"no run {name!r} in {self.url} (runs: {self.runs()})",
                                hint="featurise into it first, or pick one of the runs listed")
        with self._metadata(f"{RUNS_GROUP}/{name}"):
            return Run(self, name, self._runs_group()[name])

    # ------------------------------------------------------------------ checks
    def verify(self) -> VerifyReport:
        """Read every chunk of every run and report the ones that fail their checksum."""
        report = VerifyReport()
        for name in self.runs():
            self.run(name)._verify_into(report)
        return report

    def info(self) -> dict[str, Any]:
        """Summary for humans and the CLI: episodes per split, runs and their state."""
        idx = self._index(refresh=True)
        splits: dict[str, int] = {}
        if idx.num_rows:
            for item in pc.value_counts(idx.column("split")).to_pylist():
                splits[item["values"]] = int(item["counts"])
        runs = []
        for name in self.runs():
            r = self.run(name)
            runs.append(r.info())
        return {
            "url": self.url,
            "schema_version": SCHEMA_VERSION,
            "chunk_rows": self.chunk_rows,
            "episode_chunk_rows": self.episode_chunk_rows,
            "episodes": idx.num_rows,
            "steps": int(pc.sum(idx.column("length")).as_py() or 0) if idx.num_rows else 0,
            "shards": idx.num_shards,
            "splits": splits,
            "runs": runs,
        }

    def __repr__(self) -> str:
        return f"GradientStore({self.url!r}, mode={self._mode!r})"


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


class StoreUndo:
    """Puts a store back as it was before a command, when the command fails early.

    Remembers the catalog (a hard link for local stores: no copy), the metadata files
    (``zarr.json``) of the command's run, and whether that run existed; :meth:`restore`
    puts them back byte for byte and removes the run if the command created it. Files of
    other runs are only touched when remembered explicitly (:meth:`remember`), and a
    catalog another process changed meanwhile is left alone. Chunk files are not
    covered: a caller restores only while no shard was written, and otherwise keeps the
    finished shards (resume). A store created by the command is removed whole.

    Args:
        store: The open, writable store.
        run: The run the command writes (None: none).
        created: The command created the store (restore removes it).
        had_folder: The store's folder existed (empty) before it was created.
    """

    def __init__(self, store: GradientStore, *, run: str | None = None, created: bool = False,
                 had_folder: bool = False) -> None:
        self._store, self._loc = store, store._loc
        self.created, self.had_folder = created, had_folder
        self._run = run
        self._run_existed = run is not None and run in store.runs()
        self._files: dict[str, bytes | None] = {}
        self._link: str | None = None
        self._catalog: bytes | None = None
        if created:
            return
        cat = self._loc.path(_catalog.CATALOG_NAME)
        if self._loc.is_local:
            _remove_stale(self._loc)
            self._link = f"{cat}.undo-{os.getpid()}"
            if os.path.exists(self._link):
                os.remove(self._link)
            try:
                os.link(cat, self._link)  # the catalog is replaced by rename, never written in place
            except OSError:  # no hard links here: keep the bytes
                self._link = None
        if self._link is None:
            self._catalog = self._loc.read_bytes(_catalog.CATALOG_NAME)
        if self._run_existed:
            self.remember_run(self._run)

    def remember_run(self, name: str) -> None:
        """Remember the metadata files (group and arrays) of run ``name``."""
        base = f"{RUNS_GROUP}/{name}"
        self.remember(f"{base}/zarr.json")
        for arr in self._store.run(name)._array_names():
            self.remember(f"{base}/{arr}/zarr.json")

    def remember(self, relpath: str) -> None:
        """Keep the current bytes of a small file (None: absent) to put back on restore."""
        if relpath not in self._files:
            self._files[relpath] = self._loc.read_bytes(relpath)

    def restore(self) -> None:
        """Put everything remembered back; remove runs (or the store) created since."""
        loc = self._loc
        if self.created:
            loc.remove()
            if self.had_folder and loc.is_local:
                os.makedirs(loc.root, exist_ok=True)
            return
        if self._run is not None and not self._run_existed and self._run in self._store.runs():
            path = loc.path(f"{RUNS_GROUP}/{self._run}")
            if loc.is_local:
                shutil.rmtree(path, ignore_errors=True)
            elif loc.fs.exists(path):
                loc.fs.rm(path, recursive=True)
        for relpath, data in self._files.items():
            if data is None:
                if loc.fs.exists(loc.path(relpath)):
                    loc.fs.rm(loc.path(relpath))
            elif loc.read_bytes(relpath) != data:
                loc.write_bytes(relpath, data)
        with self._store.catalog_lock():
            if self._link is not None:
                cat = loc.path(_catalog.CATALOG_NAME)
                if os.path.exists(cat) and os.path.samefile(self._link, cat):
                    os.remove(self._link)  # unchanged (rename() of two links to one file does nothing)
                elif _stamp(loc) in self._store._committed:
                    os.replace(self._link, cat)
                else:  # another process appended since: its episodes must not be dropped
                    log.warning("%s: the catalog was changed by another process since this command began; "
                                "it is left as it is", loc.url)
                    os.remove(self._link)
                self._link = None
            elif self._catalog is not None:
                loc.write_bytes(_catalog.CATALOG_NAME, self._catalog)
        self._store._snapshot = None

    def release(self) -> None:
        """Keep the changes (the command succeeded or wrote shards worth resuming)."""
        if self._link is not None and os.path.exists(self._link):
            os.remove(self._link)
        self._link = None


def _remove_stale(loc: _Location) -> None:
    """Remove catalog temporaries and undo links left by killed processes (pid no longer alive)."""
    prefix = _catalog.CATALOG_NAME + "."
    for name in os.listdir(loc.root):
        tag, _, pid = name[len(prefix):].partition("-")
        if not name.startswith(prefix) or tag not in ("tmp", "undo") or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive: another command's file
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        try:
            os.remove(os.path.join(loc.root, name))
            log.info("%s: removed %s left by a killed process", loc.url, name)
        except FileNotFoundError:
            pass


def _stamp(loc: _Location) -> tuple | None:
    """``(inode, size, mtime_ns)`` of a local catalog file (None when not local or absent)."""
    if not loc.is_local:
        return None
    try:
        st = os.stat(loc.path(_catalog.CATALOG_NAME))
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def create_store(store: str | os.PathLike, *, overwrite: bool = False, **kwargs: Any) -> GradientStore:
    """Create a gradient store at a path or URL (see :meth:`GradientStore.create`)."""
    return GradientStore.create(store, overwrite=overwrite, **kwargs)


def open_store(store: str | os.PathLike, *, mode: str = "r") -> GradientStore:
    """Open a gradient store at a path or URL (see :meth:`GradientStore.open`)."""
    return GradientStore.open(store, mode=mode)
