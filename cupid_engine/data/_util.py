"""Small helpers shared by the readers and writers: filesystems, safe paths, selection by
id/split, duplicate ids, and the build-beside-then-swap write."""

from __future__ import annotations

import collections
import contextlib
import os
import pathlib
import posixpath
import shutil
import urllib.parse
import uuid
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import fsspec
import pyarrow as pa

from cupid_engine.constants import SPLITS
from cupid_engine.data.episode import Episode
from cupid_engine.data.schema import FormatError
from cupid_engine.errors import UserError


NATIVE_SPLIT_MAP = {"train": "train", "val": "holdout", "valid": "holdout", "test": "holdout", "validation": "validation"}
"""Default translation of split names used by LeRobot (info.json) and TFDS/RLDS files."""


def escape_id(episode_id: str) -> str:
    """Percent-encode an episode id so it can be used as one file-name component.

    Ids are data, never paths: ``"../x"`` becomes ``"..%2Fx"``; only
    ``[A-Za-z0-9_.-]`` survive, and a leading dot is encoded so no name is hidden or
    ``..``.
    """
    out = urllib.parse.quote(episode_id, safe="")
    # quote() leaves '.', '-', '_', '~' alone; '~' and a leading '.' are still awkward.
    out = out.replace("~", "%7E")
    if out.startswith("."):
        out = "%2E" + out[1:]
    return out


def url_to_fs(path_or_url: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """Split a local path or fsspec URL into ``(filesystem, root path)``."""
    fs, root = fsspec.core.url_to_fs(str(path_or_url))
    return fs, root.rstrip("/") or "/"


def join_inside(root: str, relative: str, *, what: str) -> str:
    """Join ``relative`` (read from a dataset's own metadata) under ``root``, refusing escapes.

    Raises:
        FormatError: If ``relative`` is absolute or climbs out of ``root``.
    """
    norm = posixpath.normpath(relative)
    if relative.startswith(("/", "\\")) or norm == ".." or norm.startswith("../") or "\\" in relative or ":" in relative:
        raise FormatError(f"{what}: path {relative!r} escapes the dataset root {root!r}")
    return posixpath.join(root, norm)


class UnknownKeyError(UserError, KeyError):
    """Requested observation/image keys that a dataset does not have.

    The message names the missing keys and lists every key the dataset has (low-dimensional
    and image), so ``--obs-keys`` typos and wrong camera names are fixed in one go.
    """

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


def select_keys(
    requested: Iterable[str] | None,
    lowdim: Iterable[str],
    images: Iterable[str],
    *,
    where: str,
    skipped: Mapping[str, str] | None = None,
) -> tuple[list[str], list[str]]:
    """Split a requested key list into ``(low-dimensional keys, image keys)``, sorted.

    Args:
        requested: Keys asked for (``--obs-keys``); None selects every readable key.
        lowdim: The dataset's low-dimensional observation keys.
        images: The dataset's camera (image) keys.
        where: The dataset, named in errors.
        skipped: Keys the dataset has but this reader cannot use, with the reason
            (e.g. ``"depth map float32 [84, 84, 1]"``); asked for, they are refused by name.

    Raises:
        UnknownKeyError: Naming each unknown key and listing what the dataset has.
    """
    lowdim, images = sorted(lowdim), sorted(images)
    if requested is None:
        return lowdim, images
    requested = [requested] if isinstance(requested, str) else list(requested)
    skipped = dict(skipped or {})
    bad = [k for k in requested if k not in lowdim and k not in images]
    if bad:
        why = "; ".join(f"{k!r} is {skipped[k]}" for k in bad if k in skipped)
        raise UnknownKeyError(
            f"{where}: observation key(s) {bad} not found"
            + (f" ({why}, which cannot be read as an observation or image)" if why else "")
            + f"; the dataset has low-dimensional keys {lowdim} and image keys {images}"
        )
    return sorted(k for k in set(requested) if k in lowdim), sorted(k for k in set(requested) if k in images)


def task_from_instructions(texts: Sequence[str], metadata: dict[str, Any]) -> str:
    """Episode task text from per-step instructions (the first step's).

    When the instruction changes within the episode, ``metadata["instructions"]`` gets
    ``[[start_step, text], ...]`` for every run, so nothing is dropped.
    """
    if not texts:
        return ""
    runs = [[0, texts[0]]]
    for i, t in enumerate(texts):
        if t != runs[-1][1]:
            runs.append([i, t])
    if len(runs) > 1:
        metadata["instructions"] = runs
    return texts[0]


def check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")


def map_split(name: str, split_map: dict[str, str], *, where: str) -> str:
    """Translate a native split name to one of ``constants.SPLITS`` (no silent default)."""
    if name not in split_map:
        raise FormatError(f"{where}: native split {name!r} has no mapping; pass split_map={{{name!r}: ...}}")
    out = split_map[name]
    if out not in SPLITS:
        raise ValueError(f"split_map[{name!r}] = {out!r} is not one of {SPLITS}")
    return out


def selected_rows(catalog: pa.Table, ids: Iterable[str] | None, split: str | None) -> list[int]:
    """Row numbers of ``catalog`` matching ``ids`` and ``split`` (catalog order).

    Raises:
        KeyError: If some requested ids are not in the catalog (they are listed).
    """
    check_split(split)
    ep_ids = catalog.column("episode_id").to_pylist()
    splits = catalog.column("split").to_pylist()
    wanted = None
    if ids is not None:
        wanted = {ids} if isinstance(ids, str) else set(ids)
        missing = wanted.difference(ep_ids)
        if missing:
            raise KeyError(f"episode ids not in dataset: {sorted(missing)[:10]}{' ...' if len(missing) > 10 else ''}")
    return [
        i
        for i, (eid, sp) in enumerate(zip(ep_ids, splits))
        if (wanted is None or eid in wanted) and (split is None or sp == split)
    ]


def filter_stream(episodes: Iterable[Episode], ids: Iterable[str] | None, split: str | None) -> Iterator[Episode]:
    """Filter a stream for sources without a cheap catalog; missing ids raise at the end."""
    check_split(split)
    wanted = None if ids is None else ({ids} if isinstance(ids, str) else set(ids))
    seen: set[str] = set()
    for ep in episodes:
        if wanted is not None:
            if ep.episode_id not in wanted:
                continue
            seen.add(ep.episode_id)
        if split is None or ep.split == split:
            yield ep
    if wanted is not None and seen != wanted:
        missing = sorted(wanted - seen)
        raise KeyError(f"episode ids not in dataset: {missing[:10]}{' ...' if len(missing) > 10 else ''}")


def first_duplicate(values: Sequence[Hashable]) -> Hashable | None:
    """The first value of ``values`` (in order) that occurs more than once, else None.

    One counting pass: readers check catalogs of millions of ids, where
    ``values.count`` per element would be quadratic.
    """
    counts = collections.Counter(values)
    return next((v for v in values if counts[v] > 1), None)


@contextlib.contextmanager
def build_then_swap(path: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yield a fresh hidden path beside ``path`` to build into; swap it in on success.

    A failed write loses nothing: on any exception the partial build is removed and
    ``path`` is untouched. A built folder replaces an existing ``path`` by moving the old
    one aside first (``os.replace`` cannot replace a non-empty folder) and deleting it
    after the swap; a built file replaces ``path`` with one ``os.replace``. The caller
    decides beforehand whether ``path`` may be replaced, and creates its parent.
    """
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        yield tmp
        if tmp.is_dir() and path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
