"""One entry point for every dataset format, and the interface all readers share.

:class:`EpisodeSource` is what the rest of the engine (featurizer, Ray shard planner,
scorers) programs against: an episode-level ``catalog()`` without step data,
``episodes()`` streamed with bounded memory, and ``shards()`` / ``iter_shard()`` so a
worker can process one natural unit of storage (a Parquet file, a TFRecord shard, a
range of demos) without touching the rest. :func:`open_source` picks the reader from
what is on disk.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa

from cupid_engine.data._util import url_to_fs
from cupid_engine.data.episode import Episode
from cupid_engine.data.lerobot import LeRobotDataset
from cupid_engine.data.replay import ReplayBufferDataset
from cupid_engine.data.rlds import SHARD_RE, RLDSDataset, builder_versions
from cupid_engine.data.robomimic import RobomimicDataset
from cupid_engine.data.schema import FormatError
from cupid_engine.errors import ConfigError

log = logging.getLogger(__name__)

FORMATS = ("auto", "lerobot", "robomimic", "rlds", "replay")
_READERS = {"lerobot": LeRobotDataset, "robomimic": RobomimicDataset, "rlds": RLDSDataset, "replay": ReplayBufferDataset}


@runtime_checkable
class EpisodeSource(Protocol):
    """A dataset of episodes, readable in bounded memory.

    Every reader in ``cupid_engine.data`` implements it; ids, splits and catalogs follow
    ``schema.EPISODE_SCHEMA``.
    """

    @property
    def obs_keys(self) -> list[str]:
        """Observation keys, sorted."""
        ...

    @property
    def action_dim(self) -> int:
        """Action width ``A``."""
        ...

    @property
    def image_keys(self) -> list[str]:
        """Camera keys of ``Episode.images`` (``uint8 [T, H, W, C]`` each), sorted; empty
        for state-only datasets."""
        ...

    @property
    def image_shapes(self) -> dict[str, tuple[int, int, int]]:
        """``camera key -> (H, W, C)``, known without decoding a frame."""
        ...

    def __len__(self) -> int:
        """Number of episodes."""
        ...

    def catalog(self) -> pa.Table:
        """Episode-level table (``EPISODE_SCHEMA``), no step data."""
        ...

    def episodes(self, ids: Iterable[str] | None = None, split: str | None = None) -> Iterator[Episode]:
        """Stream episodes (dataset order), optionally only ``ids`` and/or one ``split``."""
        ...

    def shards(self) -> list[str]:
        """Natural storage units, for one worker each."""
        ...

    def iter_shard(self, unit: str) -> Iterator[Episode]:
        """Episodes of one unit from :meth:`shards`."""
        ...


def detect_format(path_or_url: str | os.PathLike) -> str:
    """Name the format of a dataset on disk (one of ``FORMATS`` other than ``auto``).

    Rules, in order: ``*.hdf5``/``*.h5`` file -> robomimic; ``*.zip`` -> replay
    (diffusion_policy ``.zarr.zip``); a folder with ``meta/info.json`` -> lerobot; with
    ``*.tfrecord-XXXXX[-of-YYYYY]`` shards, or version folders (``1.0.0/``) holding them
    (a TFDS builder folder) -> rlds; with ``meta/episode_ends`` -> replay.

    Raises:
        FormatError: If nothing matches (the message lists what was looked for).
    """
    text = str(path_or_url).rstrip("/")
    lower = text.lower()
    if lower.endswith((".hdf5", ".h5")):
        return "robomimic"
    if lower.endswith(".zip"):
        return "replay"
    fs, root = url_to_fs(text)
    if not fs.exists(root):
        raise FileNotFoundError(f"{text} does not exist")
    if fs.isfile(f"{root}/meta/info.json"):
        return "lerobot"
    if fs.isdir(root):
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
        if any(SHARD_RE.match(n) for n in names) or builder_versions(fs, root):
            return "rlds"
        if any(fs.exists(f"{root}/meta/episode_ends/{m}") for m in (".zarray", "zarr.json")):
            return "replay"
    raise FormatError(
        f"{text}: cannot tell the format (looked for *.hdf5, meta/info.json, "
        "*.tfrecord-XXXXX[-of-YYYYY] shards or TFDS version folders holding them, meta/episode_ends); "
        "pass format=..."
    )


def open_source(path_or_url: str | os.PathLike, format: str = "auto", **options: Any) -> EpisodeSource:
    """Open any supported dataset as an :class:`EpisodeSource`.

    Args:
        path_or_url: Local path or fsspec URL (robomimic needs a local file).
        format: ``auto`` (see :func:`detect_format`), ``lerobot`` (v3.0 and v2.1),
            ``robomimic``, ``rlds`` or ``replay``.
        **options: Passed to the reader (e.g. ``split_map``, ``success``, ``obs_keys``;
            ``version`` for a TFDS builder folder, ignored when None).

    Returns:
        A :class:`LeRobotDataset`, :class:`RobomimicDataset`, :class:`RLDSDataset` or
        :class:`ReplayBufferDataset`. Fields the reader leaves out by default (its
        ``skipped_fields``: embeddings, tensors that are not vectors, unread arrays) are
        listed once at INFO with their shapes.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "auto":
        format = detect_format(path_or_url)
    if options.get("version") is None:
        options.pop("version", None)
    elif format != "rlds":
        raise ConfigError(f"{path_or_url}: version= picks a TFDS builder version (RLDS); this is a {format} dataset")
    if format == "robomimic" and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", str(path_or_url)) and not str(path_or_url).startswith("file://"):
        raise ValueError(f"{path_or_url}: robomimic files are read with h5py and must be local")
    if format == "robomimic" and str(path_or_url).startswith("file://"):
        path_or_url = str(path_or_url)[len("file://") :]
    source = _READERS[format](path_or_url, **options)
    report_skipped(source, str(path_or_url))
    return source


_reported: set[tuple[str, tuple[tuple[str, str], ...]]] = set()


def report_skipped(source: Any, where: str) -> dict[str, str]:
    """Log (once per process and dataset) the fields ``source`` does not read, with shapes.

    Returns:
        ``field -> description`` (empty when the reader reads everything it found).
    """
    skipped = dict(getattr(source, "skipped_fields", None) or {})
    key = (where, tuple(sorted(skipped.items())))
    if skipped and key not in _reported:
        _reported.add(key)
        log.info(
            "%s: not read (name them in obs_keys / --obs-keys to use them): %s",
            where,
            "; ".join(f"{k} {v}" for k, v in sorted(skipped.items())),
        )
    return skipped
