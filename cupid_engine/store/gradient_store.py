"""The gradient store: a Zarr v3 group holding the episode catalog and feature runs.

Layout (DESIGN §4)::

    <store>/zarr.json            group; attrs["cupid_engine"] = schema version, chunk sizes
    <store>/catalog.parquet      one row per episode + the shard plan (see catalog.py),
                                 row groups of whole shards: read per shard, never whole
    <store>/runs/<name>/...      one Run per featuriser configuration (see run.py)

This module owns opening/creating the store (local paths and fsspec URLs:
``location.py``), the catalog (append-only, driver side; the file itself is read and
written by ``catalog_io.py``) and whole-store checks (:meth:`GradientStore.verify`,
:meth:`GradientStore.info`). Writing and reading features is the job of
:class:`cupid_engine.store.run.Run`; putting a store back after a failed command, of
``undo.StoreUndo``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import zarr

from cupid_engine.constants import SCHEMA_VERSION
from cupid_engine.errors import (
    ConfigError,
    UserError,
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
)
from cupid_engine.store.catalog_io import (
    _DAMAGED,
    _CatalogSink,
    _CatalogSnapshot,
    _check_unique,
    _hash_ids,
    _table_bytes,
)
from cupid_engine.store.location import ATTR_KEY, RUNS_GROUP, _Location, _stamp
from cupid_engine.store.run import Run

log = logging.getLogger(__name__)

DEFAULT_CHUNK_ROWS = 1024
"""Step rows per chunk: 1024 x 4096 fp16 = 8 MiB, large enough for streaming I/O."""

DEFAULT_EPISODE_CHUNK_ROWS = 64
"""Episodes per chunk of the ``episodes`` array (64 x 4096 fp32 = 1 MiB)."""

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_MODES = ("r", "r+", "a")


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


def create_store(store: str | os.PathLike, *, overwrite: bool = False, **kwargs: Any) -> GradientStore:
    """Create a gradient store at a path or URL (see :meth:`GradientStore.create`)."""
    return GradientStore.create(store, overwrite=overwrite, **kwargs)


def open_store(store: str | os.PathLike, *, mode: str = "r") -> GradientStore:
    """Open a gradient store at a path or URL (see :meth:`GradientStore.open`)."""
    return GradientStore.open(store, mode=mode)
