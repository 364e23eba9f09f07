"""Putting a store back as it was when a command fails before writing any shard."""

from __future__ import annotations

import logging
import os
import shutil

from cupid_engine.store import catalog as _catalog
from cupid_engine.store.gradient_store import GradientStore
from cupid_engine.store.location import RUNS_GROUP, _remove_stale, _stamp

log = logging.getLogger(__name__)

__all__ = ["StoreUndo"]


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
