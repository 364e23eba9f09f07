"""LeRobot datasets: a streaming reader for v3.0 (ours, :mod:`~cupid_engine.data.lerobot_writer`) and v2.1.

The on-disk layout is described in :mod:`cupid_engine.data.lerobot_writer`, which writes
it; :func:`write_dataset` is re-exported here. The reader decodes images lazily
(``Episode.images`` holds :class:`~cupid_engine.data.episode.ImageSequence` views), PNG in
Parquet and MP4 video alike, including v2.1 per-episode videos and AV1 files written by
lerobot.

The reader also opens LeRobot v2.1
datasets (``meta/episodes.jsonl`` and one ``data/chunk-XXX/episode_XXXXXX.parquet``
per episode) without the lerobot package, so hub datasets can be scored directly; fields
those datasets lack get defaults (split from ``info.json`` ``splits``, else ``train``;
source = the dataset folder name; success/return/tier unknown).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cupid_engine.data import lerobot_meta
from cupid_engine.data._util import NATIVE_SPLIT_MAP, first_duplicate, join_inside, map_split, select_keys, selected_rows, url_to_fs
from cupid_engine.data.episode import Episode, ImageSequence
from cupid_engine.data.lerobot_writer import (
    CHUNKS_SIZE,
    CODEBASE_VERSION,
    DATA_PATH_V3,
    EPISODES_META_PATH,
    IMAGE_FORMATS,
    VIDEO_PATH_V3,
    write_dataset,
)
from cupid_engine.data.schema import (
    ACTION_COLUMN,
    EPISODE_SCHEMA,
    IMAGE_PREFIX,
    OBS_PREFIX,
    FormatError,
    column_to_numpy,
    parse_metadata,
    validate_episode,
)

__all__ = [
    "CHUNKS_SIZE",
    "CODEBASE_VERSION",
    "DATA_PATH_V3",
    "EPISODES_META_PATH",
    "IMAGE_FORMATS",
    "READABLE_VERSIONS",
    "VIDEO_PATH_V2",
    "VIDEO_PATH_V3",
    "LeRobotDataset",
    "open_dataset",
    "write_dataset",
]

READABLE_VERSIONS = ("v3.0", "v2.1", "v2.0")
VIDEO_PATH_V2 = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
# Step columns every LeRobot dataset has; the reader rebuilds them, so they are not "skipped".
_BOOKKEEPING = ("timestamp", "frame_index", "episode_index", "index", "task_index")
_NUMERIC_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "bool")


# ----------------------------------------------------------------------------- reader


def open_dataset(path: str | os.PathLike, **options: Any) -> LeRobotDataset:
    """Open a LeRobot v3.0 (ours or the hub's) or v2.1 dataset. See :class:`LeRobotDataset`."""
    return LeRobotDataset(path, **options)


class LeRobotDataset:
    """Streaming reader of a LeRobot v3.0 or v2.1 dataset (local path or fsspec URL).

    Only episode-level metadata is loaded at open; step data is read one data file at a
    time, so memory is bounded by the largest data file.

    Args:
        path: Dataset folder (holding ``meta/info.json``) or fsspec URL.
        source: ``source`` for datasets without a ``source`` column (default: folder name).
        split_map: Native split name (``info.json`` ``splits``) -> one of
            ``constants.SPLITS``, used when there is no ``split`` column.
        default_split: Split of episodes outside every ``splits`` range.
        obs_keys: Observation and camera keys to read (default: every numeric
            ``observation.*`` feature and every ``image``/``video`` feature). Camera keys
            drop the ``observation.images.`` (else ``observation.``) prefix; an unknown key
            raises :class:`~cupid_engine.data._util.UnknownKeyError` listing what there is.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        source: str | None = None,
        split_map: dict[str, str] | None = None,
        default_split: str = "train",
        obs_keys: Iterable[str] | None = None,
    ) -> None:
        self.path = str(path)
        self._fs, self._root = url_to_fs(path)
        info_path = join_inside(self._root, "meta/info.json", what=self.path)
        if not self._fs.isfile(info_path):
            raise FormatError(f"{self.path}: no meta/info.json; not a LeRobot dataset")
        with self._fs.open(info_path, "rb") as f:
            self.info: dict[str, Any] = json.loads(f.read())
        self.version = str(self.info.get("codebase_version", ""))
        if self.version not in READABLE_VERSIONS:
            raise FormatError(f"{self.path}: codebase_version {self.version!r} not in {READABLE_VERSIONS}")
        self._source = source if source is not None else self._root.rstrip("/").rsplit("/", 1)[-1]
        self._split_map = dict(NATIVE_SPLIT_MAP if split_map is None else split_map)
        self._default_split = default_split
        self._parse_features()
        lowdim, cameras = select_keys(obs_keys, self._obs_dims, self._image_specs, where=self.path)
        self._obs_dims = {k: self._obs_dims[k] for k in lowdim}
        self._image_specs = {k: self._image_specs[k] for k in cameras}
        meta = self._read_meta_v3() if self.version == "v3.0" else self._read_meta_v2()
        self._index = meta.column("episode_index").to_numpy().astype(np.int64)
        self._from = meta.column("dataset_from_index").to_numpy().astype(np.int64)
        self._to = meta.column("dataset_to_index").to_numpy().astype(np.int64)
        self._file = meta.column("_file").to_pylist()
        if np.any(self._to - self._from <= 0):
            bad = int(np.argmax(self._to - self._from <= 0))
            raise FormatError(f"{self.path}: episode_index {self._index[bad]} has length 0 in the episode metadata")
        if "length" in meta.column_names:
            stated = np.asarray(meta.column("length").to_pylist(), dtype=np.int64)
            bad = np.flatnonzero(stated != self._to - self._from)
            if bad.size:
                i = int(bad[0])
                raise FormatError(
                    f"{self.path}: episode_index {self._index[i]} has length {stated[i]} but row range "
                    f"{self._from[i]}:{self._to[i]}"
                )
        self._catalog = self._build_catalog(meta)
        self._video_files, self._video_from = self._video_locations(meta)
        self._rows_by_file: dict[str, list[int]] = {}
        for r, f in enumerate(self._file):
            self._rows_by_file.setdefault(f, []).append(r)
        self._shards = list(self._rows_by_file)

    # -- metadata ---------------------------------------------------------------------

    def _parse_features(self) -> None:
        feats = self.info.get("features")
        if not isinstance(feats, dict) or ACTION_COLUMN not in feats:
            raise FormatError(f"{self.path}: meta/info.json has no 'features' with an 'action' entry")
        self._obs_dims: dict[str, int] = {}
        # camera key -> (feature name, "image" | "video", (H, W, C))
        self._image_specs: dict[str, tuple[str, str, tuple[int, int, int]]] = {}
        for name, spec in feats.items():
            if not name.startswith(OBS_PREFIX) or not isinstance(spec, dict):
                continue
            if spec.get("dtype") in ("image", "video"):
                key = name[len(IMAGE_PREFIX) :] if name.startswith(IMAGE_PREFIX) else name[len(OBS_PREFIX) :]
                self._image_specs[key] = (name, str(spec["dtype"]), _frame_shape(spec, name, self.path))
                continue
            if spec.get("dtype") not in _NUMERIC_DTYPES:
                continue
            self._obs_dims[name[len(OBS_PREFIX) :]] = _feature_width(spec, name, self.path)
        clash = sorted(set(self._obs_dims) & set(self._image_specs))
        if clash:
            raise FormatError(f"{self.path}: keys {clash} name both a low-dimensional and an image feature")
        self._action_dim = _feature_width(feats[ACTION_COLUMN], ACTION_COLUMN, self.path)
        used = {OBS_PREFIX + k for k in self._obs_dims} | {v[0] for v in self._image_specs.values()} | {ACTION_COLUMN}
        self._skipped = {
            name: f"{spec.get('dtype')} {spec.get('shape')}"
            for name, spec in feats.items()
            if isinstance(spec, dict) and name not in used and name not in _BOOKKEEPING
        }

    def _read_meta_v3(self) -> pa.Table:
        pattern = join_inside(self._root, "meta/episodes", what=self.path) + "/chunk-*/file-*.parquet"
        files = sorted(self._fs.glob(pattern))
        if not files:
            raise FormatError(f"{self.path}: no meta/episodes/chunk-*/file-*.parquet")
        tables = []
        for f in files:
            # The per-episode stats/* columns are large and not needed to read episodes.
            names = [n for n in pq.read_schema(f, filesystem=self._fs).names if not n.startswith("stats/")]
            tables.append(pq.read_table(f, columns=names, filesystem=self._fs))
        meta = pa.concat_tables(tables, promote_options="permissive")
        for col in ("episode_index", "data/chunk_index", "data/file_index", "dataset_from_index", "dataset_to_index"):
            if col not in meta.column_names:
                raise FormatError(f"{self.path}: episode metadata lacks column {col!r}")
        template = str(self.info.get("data_path", DATA_PATH_V3))
        files_col = []
        for c, f in zip(meta.column("data/chunk_index").to_pylist(), meta.column("data/file_index").to_pylist()):
            files_col.append(_format_path(template, self.path, chunk_index=c, file_index=f))
        return self._join_engine_fields(meta.append_column("_file", pa.array(files_col, pa.string())))

    def _join_engine_fields(self, meta: pa.Table) -> pa.Table:
        """Add our episode-level fields from ``meta/cupid_engine/episodes.parquet``, by episode_index.

        Episodes that file does not list (appended later by lerobot's ``resume``) keep
        the defaults; a row whose length disagrees with ``meta/episodes`` means another
        tool renumbered the episodes in place, which is refused rather than mislabelled.
        """
        path = join_inside(self._root, lerobot_meta.ENGINE_EPISODES_PATH, what=self.path)
        if not self._fs.isfile(path):
            return meta
        where = f"{self.path}/{lerobot_meta.ENGINE_EPISODES_PATH}"
        try:
            side = pq.read_table(path, filesystem=self._fs)
        except (OSError, pa.ArrowInvalid) as exc:
            raise FormatError(f"{where}: cannot read ({exc})") from None
        missing = [c for c in lerobot_meta.ENGINE_EPISODES_SCHEMA.names if c not in side.column_names]
        if missing:
            raise FormatError(f"{where}: lacks columns {missing}")
        side_index = side.column("episode_index").to_pylist()
        pos = {int(i): r for r, i in enumerate(side_index)}
        if len(pos) != len(side_index):
            raise FormatError(f"{where}: an episode_index appears twice")
        meta_index = [int(i) for i in meta.column("episode_index").to_pylist()]
        extra = sorted(set(pos) - set(meta_index))
        if extra:
            raise FormatError(f"{where}: episode_index {extra[:5]} not in meta/episodes (the dataset was edited by another tool)")
        lengths = (np.asarray(meta.column("dataset_to_index").to_pylist()) - np.asarray(meta.column("dataset_from_index").to_pylist())).tolist()
        side_len = side.column("length").to_pylist()
        for i, n in zip(meta_index, lengths):
            if i in pos and side_len[pos[i]] != n:
                raise FormatError(
                    f"{where}: episode_index {i} has length {side_len[pos[i]]} there but {n} in meta/episodes "
                    "(the episodes were renumbered by another tool)"
                )
        for name in EPISODE_SCHEMA.names:
            if name == "length":
                continue
            values = side.column(name).to_pylist()
            column = pa.array([values[pos[i]] if i in pos else None for i in meta_index], EPISODE_SCHEMA.field(name).type)
            if name in meta.column_names:
                meta = meta.set_column(meta.column_names.index(name), name, column)
            else:
                meta = meta.append_column(name, column)
        return meta

    def _read_meta_v2(self) -> pa.Table:
        ep_path = join_inside(self._root, "meta/episodes.jsonl", what=self.path)
        if not self._fs.isfile(ep_path):
            raise FormatError(f"{self.path}: no meta/episodes.jsonl")
        rows = []
        with self._fs.open(ep_path, "rt") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise FormatError(f"{self.path}: meta/episodes.jsonl line {lineno}: {exc}") from None
        rows.sort(key=lambda r: r.get("episode_index", -1))
        chunks_size = int(self.info.get("chunks_size", CHUNKS_SIZE))
        template = str(self.info.get("data_path", "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"))
        start = 0
        cols: dict[str, list] = {k: [] for k in ("episode_index", "length", "tasks", "dataset_from_index", "dataset_to_index", "_file")}
        for r in rows:
            idx, length = r.get("episode_index"), r.get("length")
            if not isinstance(idx, int) or not isinstance(length, int) or idx < 0 or length < 0:
                raise FormatError(f"{self.path}: meta/episodes.jsonl row {r!r} needs integer episode_index and length")
            cols["episode_index"].append(idx)
            cols["length"].append(length)
            tasks = r.get("tasks", [])
            cols["tasks"].append([str(t) for t in tasks] if isinstance(tasks, list) else [str(tasks)])
            # v2.1 has no stored row ranges: the global `index` runs over episodes in order.
            cols["dataset_from_index"].append(start)
            cols["dataset_to_index"].append(start + length)
            start += length
            cols["_file"].append(_format_path(template, self.path, episode_chunk=idx // chunks_size, episode_index=idx))
        return pa.table(cols)

    def _build_catalog(self, meta: pa.Table) -> pa.Table:
        n = meta.num_rows
        names = set(meta.column_names)
        lengths = (self._to - self._from).tolist()

        def col(name: str, default: Any) -> list:
            return meta.column(name).to_pylist() if name in names else [default] * n

        ids = col("episode_id", None)
        ids = [f"episode_{i:06d}" if e is None else e for e, i in zip(ids, self._index.tolist())]
        splits = col("split", None)
        if any(s is None for s in splits):
            native = self._splits_from_info()
            splits = [n if s is None else s for s, n in zip(splits, native)]
        joined = ["; ".join(t or []) for t in col("tasks", [])]
        tasks = [j if t is None else t for t, j in zip(col("task", None), joined)]
        table = pa.Table.from_pydict(
            {
                "episode_id": ids,
                "split": splits,
                "source": [self._source if v is None else v for v in col("source", None)],
                "task": tasks,
                "length": lengths,
                "success": col("success", None),
                "return": col("return", None),
                "tier": col("tier", None),
                "metadata": [m if m else "{}" for m in col("metadata", "{}")],
            },
            schema=EPISODE_SCHEMA,
        )
        if (dup := first_duplicate(ids)) is not None:
            raise FormatError(f"{self.path}: duplicate episode_id {dup!r} in the episode metadata")
        return table

    def _splits_from_info(self) -> list[str]:
        out = [None] * len(self._index)
        pos = {int(i): k for k, i in enumerate(self._index.tolist())}
        for name, rng in (self.info.get("splits") or {}).items():
            try:
                a, b = (int(x) for x in str(rng).split(":"))
            except ValueError:
                raise FormatError(f"{self.path}: info.json split {name!r} range {rng!r} is not 'start:stop'") from None
            mapped = map_split(name, self._split_map, where=self.path)
            for i in range(a, b):
                if i in pos:
                    out[pos[i]] = mapped
        return [self._default_split if s is None else s for s in out]

    # -- public API -------------------------------------------------------------------

    @property
    def obs_keys(self) -> list[str]:
        """Observation keys (without the ``observation.`` prefix), sorted."""
        return sorted(self._obs_dims)

    @property
    def obs_dims(self) -> dict[str, int]:
        """``observation key -> width``."""
        return dict(self._obs_dims)

    @property
    def skipped_fields(self) -> dict[str, str]:
        """Features not read, ``name -> "dtype [shape]"``: anything but numeric or camera
        ``observation.*`` features and ``action`` (e.g. ``next.reward``, strings)."""
        return dict(self._skipped)

    @property
    def image_keys(self) -> list[str]:
        """Camera keys (``Episode.images``), sorted."""
        return sorted(self._image_specs)

    @property
    def image_shapes(self) -> dict[str, tuple[int, int, int]]:
        """``camera key -> (H, W, C)`` of every frame."""
        return {k: v[2] for k, v in self._image_specs.items()}

    @property
    def action_dim(self) -> int:
        """Action width ``A``."""
        return self._action_dim

    def __len__(self) -> int:
        return len(self._index)

    def catalog(self) -> pa.Table:
        """Episode-level table (:data:`~cupid_engine.data.schema.EPISODE_SCHEMA`), no step data."""
        return self._catalog

    def shards(self) -> list[str]:
        """Data files, relative to the dataset root, in episode order."""
        return list(self._shards)

    def iter_shard(self, unit: str) -> Iterator[Episode]:
        """Episodes stored in one data file (a value from :meth:`shards`)."""
        if unit not in self._shards:
            raise KeyError(f"{unit!r} is not a data file of {self.path}")
        yield from self._read_file(unit, self._rows_by_file[unit])

    def episodes(self, ids: Iterable[str] | None = None, split: str | None = None) -> Iterator[Episode]:
        """Stream episodes in dataset order, one data file at a time.

        Args:
            ids: Only these episode ids (dataset order, not the order given).
            split: Only this split.

        Raises:
            KeyError: If an id is not in the dataset (before anything is read).
        """
        rows = selected_rows(self._catalog, ids, split)
        by_file: dict[str, list[int]] = {}
        for r in rows:
            by_file.setdefault(self._file[r], []).append(r)
        for unit, file_rows in by_file.items():
            yield from self._read_file(unit, file_rows)

    # -- step data --------------------------------------------------------------------

    def _read_file(self, unit: str, rows: list[int]) -> Iterator[Episode]:
        full = join_inside(self._root, unit, what=self.path)
        png = [k for k, (_n, kind, _s) in sorted(self._image_specs.items()) if kind == "image"]
        columns = ["episode_index"] + [OBS_PREFIX + k for k in self.obs_keys] + [self._image_specs[k][0] for k in png] + [ACTION_COLUMN]
        try:
            table = pq.read_table(full, columns=columns, filesystem=self._fs)
        except (OSError, pa.ArrowInvalid) as exc:
            raise FormatError(f"{self.path}: cannot read data file {unit!r}: {exc}") from None
        # The first row of a file is the smallest global row index of the episodes it holds.
        start = int(self._from[self._rows_by_file[unit]].min())
        ep_col = table.column("episode_index")
        cat = self._catalog
        for r in rows:
            eid = cat["episode_id"][r].as_py()
            lo, hi = int(self._from[r]) - start, int(self._to[r]) - start
            if hi > table.num_rows:
                raise FormatError(f"{self.path}: {unit!r} has {table.num_rows} rows; episode {eid!r} needs rows {lo}:{hi}")
            got = ep_col.slice(lo, hi - lo).to_numpy()
            if got.size == 0 or np.any(got != self._index[r]):
                raise FormatError(f"{self.path}: {unit!r} rows {lo}:{hi} do not all belong to episode {eid!r} (episode_index {self._index[r]})")
            part = table.slice(lo, hi - lo)
            try:
                obs = {k: column_to_numpy(part.column(OBS_PREFIX + k), self._obs_dims[k]) for k in self.obs_keys}
                act = column_to_numpy(part.column(ACTION_COLUMN), self._action_dim)
            except FormatError as exc:
                raise FormatError(f"{self.path}: {unit!r}, episode {eid!r}: {exc}") from None
            images = {k: self._png_view(part.column(self._image_specs[k][0]), k, unit, eid) for k in png}
            for k, (feat, kind, shape) in self._image_specs.items():
                if kind == "video":
                    images[k] = self._video_view(k, r, hi - lo, eid)
            ep = Episode(
                episode_id=eid,
                observations=obs,
                actions=act,
                split=cat["split"][r].as_py(),
                source=cat["source"][r].as_py(),
                task=cat["task"][r].as_py(),
                success=cat["success"][r].as_py(),
                return_=cat["return"][r].as_py(),
                tier=cat["tier"][r].as_py(),
                metadata=parse_metadata(cat["metadata"][r].as_py(), eid),
                images=images,
            )
            validate_episode(ep, obs_dims=self._obs_dims, action_dim=self._action_dim, image_shapes=self.image_shapes)
            yield ep

    # -- images -----------------------------------------------------------------------

    def _png_view(self, column: pa.ChunkedArray, key: str, unit: str, eid: str) -> ImageSequence:
        """Lazy view over one episode's encoded frames (struct{bytes, path} cells)."""
        feat, _kind, shape = self._image_specs[key]
        what = f"{self.path}: {unit!r}, episode {eid!r}, {feat}"
        col = pa.concat_arrays(column.chunks) if column.num_chunks != 1 else column.chunk(0)
        if pa.types.is_struct(col.type):
            if col.type.get_field_index("bytes") < 0:
                raise FormatError(f"{what}: image cells have no 'bytes' field ({col.type})")
            blobs = col.field("bytes").to_pylist()
        elif pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            blobs = col.to_pylist()
        else:
            raise FormatError(f"{what}: image column has type {col.type}, expected struct{{bytes, path}}")
        missing = [i for i, b in enumerate(blobs) if not b]
        if missing:
            # Hugging Face `Image` cells may point to a file instead; LeRobot v3 embeds bytes.
            raise FormatError(f"{what}: frames {missing[:5]} have no embedded image bytes")
        return ImageSequence.from_encoded(blobs, shape, what=what)

    def _video_locations(self, meta: pa.Table) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
        """Per camera: the video file of each catalog row and the episode's start time."""
        files: dict[str, list[str]] = {}
        starts: dict[str, np.ndarray] = {}
        n = meta.num_rows
        for key, (feat, kind, _shape) in self._image_specs.items():
            if kind != "video":
                continue
            if self.version == "v3.0":
                template = str(self.info.get("video_path") or VIDEO_PATH_V3)
                cols = [f"videos/{feat}/{c}" for c in ("chunk_index", "file_index", "from_timestamp")]
                lacking = [c for c in cols if c not in meta.column_names]
                if lacking:
                    raise FormatError(f"{self.path}: video feature {feat!r} but the episode metadata lacks {lacking}")
                chunk, file, start = (meta.column(c).to_pylist() for c in cols)
                files[key] = [_format_video_path(template, feat, self.path, chunk_index=c, file_index=f) for c, f in zip(chunk, file)]
                starts[key] = np.asarray(start, dtype=np.float64)
            else:
                template = str(self.info.get("video_path") or VIDEO_PATH_V2)
                chunks_size = int(self.info.get("chunks_size", CHUNKS_SIZE))
                idx = self._index.tolist()
                files[key] = [_format_video_path(template, feat, self.path, episode_chunk=i // chunks_size, episode_index=i) for i in idx]
                starts[key] = np.zeros(n, np.float64)
        return files, starts

    def _video_view(self, key: str, r: int, T: int, eid: str) -> ImageSequence:
        from cupid_engine.data.video import decode_segment

        feat, _kind, (h, w, c) = self._image_specs[key]
        path = join_inside(self._root, self._video_files[key][r], what=self.path)
        start = float(self._video_from[key][r])
        fps = float(self.info.get("fps") or 0)
        if fps <= 0:
            raise FormatError(f"{self.path}: info.json has no positive fps, needed to locate video frames")
        fs, what = self._fs, f"{self.path}: episode {eid!r}, {feat}"
        return ImageSequence(
            (T, h, w, c), frames=lambda a, b: decode_segment(fs, path, start, a, b, fps, what=what, frame_size=(h, w)), what=what
        )


def _feature_width(spec: Any, name: str, where: str) -> int:
    shape = spec.get("shape") if isinstance(spec, dict) else None
    if not isinstance(shape, list) or not all(isinstance(s, int) and s > 0 for s in shape):
        raise FormatError(f"{where}: feature {name!r} has no valid shape ({shape!r})")
    return int(np.prod(shape)) if shape else 1


def _frame_shape(spec: dict[str, Any], name: str, where: str) -> tuple[int, int, int]:
    """``(H, W, C)`` of an image/video feature (its ``shape`` may be ``[C, H, W]`` by ``names``)."""
    shape = spec.get("shape")
    if not isinstance(shape, list) or len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise FormatError(f"{where}: image feature {name!r} has shape {shape!r}, expected [H, W, C]")
    names = spec.get("names")
    if isinstance(names, list) and len(names) == 3 and str(names[0]).startswith("channel"):
        c, h, w = shape
    else:
        h, w, c = shape
    if spec.get("dtype") == "video":
        c = 3  # decoded as RGB
    return int(h), int(w), int(c)


def _format_video_path(template: str, video_key: str, where: str, **fields: Any) -> str:
    """Fill a video_path template (integers plus the feature name) and keep it relative."""
    for k, v in fields.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise FormatError(f"{where}: {k} must be a non-negative integer, got {v!r}")
    try:
        out = template.format(video_key=video_key, **fields)
    except (KeyError, IndexError, ValueError) as exc:
        raise FormatError(f"{where}: video_path template {template!r} cannot be filled ({exc})") from None
    join_inside("/", out, what=where)
    return out


def _format_path(template: str, where: str, **fields: Any) -> str:
    """Fill a data_path template with integer fields only, and keep it relative."""
    for k, v in fields.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise FormatError(f"{where}: {k} must be a non-negative integer, got {v!r}")
    try:
        out = template.format(**fields)
    except (KeyError, IndexError, ValueError) as exc:
        raise FormatError(f"{where}: data_path template {template!r} cannot be filled ({exc})") from None
    join_inside("/", out, what=where)
    return out
