"""Where a gradient store lives, and the names of its layout.

:class:`_Location` is a local directory or an fsspec URL: zarr gets the plain path
(``LocalStore``, fastest) or the URL; the catalog file goes through the matching fsspec
filesystem. Local catalog housekeeping (stale temporaries of killed processes, the
catalog's file stamp) lives here too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

import fsspec

from cupid_engine.errors import NotAStoreError
from cupid_engine.store import catalog as _catalog

log = logging.getLogger(__name__)

ATTR_KEY = "cupid_engine"
"""Group attribute holding the store's own metadata (kind, schema version, chunking)."""

RUNS_GROUP = "runs"


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
