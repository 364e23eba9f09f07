"""The gradient store: a Zarr v3 group holding the episode catalog and feature runs.

Layout (DESIGN §4)::

    <store>/zarr.json            group; attrs["cupid_engine"] = schema version, chunk sizes
    <store>/catalog.parquet      one row per episode + the shard plan (see catalog.py)
    <store>/runs/<name>/...      one Run per featuriser configuration (see run.py)

This module owns opening/creating the store (local paths and fsspec URLs), the catalog
(append-only, driver side) and whole-store checks (:meth:`GradientStore.verify`,
:meth:`GradientStore.info`). Writing and reading features is the job of
:class:`cupid_engine.store.run.Run`.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import shutil
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from cupid_engine.constants import SCHEMA_VERSION
from cupid_engine.store import catalog as _catalog
from cupid_engine.store.config import RunConfig

ATTR_KEY = "cupid_engine"
"""Group attribute holding the store's own metadata (kind, schema version, chunking)."""

DEFAULT_CHUNK_ROWS = 1024
"""Step rows per chunk: 1024 x 4096 fp16 = 8 MiB, large enough for streaming I/O."""

DEFAULT_EPISODE_CHUNK_ROWS = 64
"""Episodes per chunk of the ``episodes`` array (64 x 4096 fp32 = 1 MiB)."""

RUNS_GROUP = "runs"
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_MODES = ("r", "r+", "a")


class SchemaVersionError(ValueError):
    """The store (or a run) was written with another on-disk schema version."""


class CorruptChunkError(ValueError):
    """A chunk failed its checksum (or could not be decoded); names the episodes it covers."""


@dataclasses.dataclass(frozen=True)
class CorruptChunk:
    """One unreadable chunk found by :meth:`GradientStore.verify`."""

    run: str
    array: str
    chunk: int
    episode_ids: tuple[str, ...]
    error: str

    def describe(self) -> str:
        ids = ", ".join(self.episode_ids[:8]) + (" ..." if len(self.episode_ids) > 8 else "")
        return f"run {self.run!r} array {self.array!r} chunk {self.chunk}: episodes [{ids}]: {self.error}"


@dataclasses.dataclass
class VerifyReport:
    """Result of :meth:`GradientStore.verify`."""

    chunks_checked: int = 0
    problems: list[CorruptChunk] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def corrupt_episode_ids(self) -> list[str]:
        """Every episode whose stored data touches a corrupt chunk, in catalog order of discovery."""
        out: dict[str, None] = {}
        for p in self.problems:
            out.update(dict.fromkeys(p.episode_ids))
        return list(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "chunks_checked": self.chunks_checked,
            "problems": [dataclasses.asdict(p) for p in self.problems],
        }


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


class _CatalogIndex:
    """Numpy views of the catalog for fast plan lookups (immutable snapshot)."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table
        self.ids: list[str] = table.column("episode_id").to_pylist()
        self.pos = {eid: i for i, eid in enumerate(self.ids)}

        def col(name: str) -> np.ndarray:
            return np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=np.int64)

        self.length = col("length")
        self.shard = col("shard")
        self.row_offset = col("row_offset")
        self.slot = col("episode_slot")
        self.split = np.asarray(table.column("split").to_pylist(), dtype=object)
        self.total_rows, self.total_slots, self.num_shards = _catalog.extent(table)
        # Shards are consecutive runs of catalog rows: shard s covers [starts[s], starts[s+1]).
        self.shard_starts = np.searchsorted(self.shard, np.arange(self.num_shards + 1), side="left")

    def shard_range(self, shard_id: int) -> tuple[int, int]:
        return int(self.shard_starts[shard_id]), int(self.shard_starts[shard_id + 1])

    def episodes_in_rows(self, r0: int, r1: int) -> list[str]:
        """Ids of episodes whose step rows intersect ``[r0, r1)``."""
        ends = self.row_offset + self.length
        lo = int(np.searchsorted(ends, r0, side="right"))
        hi = int(np.searchsorted(self.row_offset, r1, side="left"))
        return self.ids[lo:hi]

    def episodes_in_slots(self, s0: int, s1: int) -> list[str]:
        lo = int(np.searchsorted(self.slot, s0, side="left"))
        hi = int(np.searchsorted(self.slot, s1, side="left"))
        return self.ids[lo:hi]

    def episodes_in_shard(self, shard_id: int) -> list[str]:
        if shard_id >= self.num_shards:
            return []
        a, b = self.shard_range(shard_id)
        return self.ids[a:b]


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
            raise ValueError(f"{location.url} is a Zarr group but not a cupid_engine gradient store")
        version = meta.get("schema_version")
        if version != SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{location.url} has store schema version {version}, this cupid_engine reads {SCHEMA_VERSION}"
            )
        self.chunk_rows = int(meta["chunk_rows"])
        self.episode_chunk_rows = int(meta["episode_chunk_rows"])
        self._index_cache: _CatalogIndex | None = None

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
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        loc = _Location(path)
        if loc.exists():
            if not overwrite:
                raise FileExistsError(f"a store already exists at {loc.url} (pass overwrite=True)")
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
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        loc = _Location(path)
        if not loc.exists():
            if mode == "a":
                return cls.create(path)
            raise FileNotFoundError(f"no gradient store at {loc.url}")
        group = zarr.open_group(loc.zarr_target, mode="r" if mode == "r" else "r+")
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
            raise PermissionError(f"store {self.url} is open read-only (mode='r')")

    # ------------------------------------------------------------------ catalog
    def _index(self, refresh: bool = False) -> _CatalogIndex:
        if self._index_cache is None or refresh:
            data = self._loc.read_bytes(_catalog.CATALOG_NAME)
            if data is None:
                raise FileNotFoundError(f"{self.url} lacks {_catalog.CATALOG_NAME}")
            table = pq.read_table(io.BytesIO(data))
            if table.schema.names != _catalog.CATALOG_SCHEMA.names:
                raise ValueError(f"{self.url}: catalog columns {table.schema.names} do not match the schema")
            self._index_cache = _CatalogIndex(table.cast(_catalog.CATALOG_SCHEMA))
        return self._index_cache

    def catalog(self, *, refresh: bool = False) -> pa.Table:
        """The episode catalog, one row per episode in insertion order.

        Args:
            refresh: re-read ``catalog.parquet`` (another process may have appended).
        """
        return self._index(refresh).table

    def episode_ids(self, split: str | None = None) -> list[str]:
        """Episode ids in catalog order, optionally only those of one split."""
        idx = self._index()
        if split is None:
            return list(idx.ids)
        return [eid for eid, s in zip(idx.ids, idx.split) if s == split]

    @property
    def num_shards(self) -> int:
        return self._index().num_shards

    def shard_episodes(self, shard_id: int) -> tuple[list[str], np.ndarray]:
        """``(episode_ids, lengths [n])`` of one shard, as ``Run.write_shard`` expects them."""
        idx = self._index()
        if shard_id >= idx.num_shards:  # the driver may have appended since we read it
            idx = self._index(refresh=True)
        if not 0 <= shard_id < idx.num_shards:
            raise KeyError(f"shard {shard_id} is not in the shard plan (0..{idx.num_shards - 1})")
        a, b = idx.shard_range(shard_id)
        return idx.ids[a:b], idx.length[a:b].copy()

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
        self._check_writable()
        new = _catalog.normalize(table)
        old = self._index(refresh=True).table
        full = _catalog.plan(
            new,
            old,
            shard_size=shard_size,
            chunk_rows=self.chunk_rows,
            episode_chunk_rows=self.episode_chunk_rows,
        )
        self._loc.write_bytes(_catalog.CATALOG_NAME, _table_bytes(full))
        self._index_cache = _CatalogIndex(full)
        return full.slice(old.num_rows)

    # ------------------------------------------------------------------ runs
    def _runs_group(self) -> zarr.Group:
        return self._group[RUNS_GROUP]

    def runs(self) -> list[str]:
        """Names of the runs in the store, sorted."""
        return sorted(self._runs_group().group_keys())

    def create_run(self, name: str, config: RunConfig):
        """Create a run, or reopen it when it exists with an equal config (resume).

        Raises:
            ValueError: the run exists with a different config (differing keys shown).
        """
        from cupid_engine.store.run import Run

        self._check_writable()
        if not isinstance(config, RunConfig):
            raise TypeError(f"config must be a RunConfig, got {type(config).__name__}")
        if not isinstance(name, str) or not _RUN_NAME.match(name):
            raise ValueError(f"run name {name!r} must match {_RUN_NAME.pattern}")
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
        from cupid_engine.store.run import Run

        if name not in self.runs():
            raise KeyError(f"no run {name!r} in {self.url}; runs: {self.runs()}")
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
        for s in idx.split:
            splits[s] = splits.get(s, 0) + 1
        runs = []
        for name in self.runs():
            r = self.run(name)
            runs.append(r.info())
        return {
            "url": self.url,
            "schema_version": SCHEMA_VERSION,
            "chunk_rows": self.chunk_rows,
            "episode_chunk_rows": self.episode_chunk_rows,
            "episodes": len(idx.ids),
            "steps": int(idx.length.sum()) if len(idx.ids) else 0,
            "shards": idx.num_shards,
            "splits": splits,
            "runs": runs,
        }

    def __repr__(self) -> str:
        return f"GradientStore({self.url!r}, mode={self._mode!r})"


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
