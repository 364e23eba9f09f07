"""Our datasets on disk: the LeRobot v3.0 Parquet writer (read back by :mod:`~cupid_engine.data.lerobot`).

Layout written by :func:`write_dataset` (LeRobot v3.0 as lerobot 0.6 writes it, readable
by pyarrow alone; the metadata pieces are built in :mod:`~cupid_engine.data.lerobot_meta`)::

    meta/info.json                              codebase_version "v3.0", fps, features, ...
                                                (exactly the fields of lerobot's DatasetInfo)
    meta/tasks.parquet                          task_index, with the task string as the
                                                pandas index ``task`` (lerobot's lookup)
    meta/stats.json                             per feature: min, max, mean, std, count,
                                                q01, q10, q50, q90, q99
    meta/episodes/chunk-000/file-000.parquet    one row per episode: episode_index, tasks,
                                                length, data/chunk_index, data/file_index,
                                                dataset_from_index, dataset_to_index (global
                                                row range, end exclusive), stats/<feature>/
                                                <stat>, meta/episodes/chunk_index and
                                                file_index
    meta/cupid_engine/episodes.parquet          our episode-level fields (episode_id, split,
                                                source, task, success, return, tier,
                                                metadata) by episode_index, beside lerobot's
                                                files so that its tools still accept them
    data/chunk-XXX/file-XXX.parquet             step rows of ``episodes_per_file`` episodes:
                                                observation.<key>, action (fixed_size_list
                                                <float32>), timestamp, frame_index,
                                                episode_index, index, task_index, and with
                                                ``image_format="png"`` one
                                                observation.images.<camera> column (feature
                                                dtype ``image``: struct{bytes, path}, PNG)
    videos/observation.images.<camera>/chunk-XXX/file-XXX.mp4
                                                with ``image_format="video"`` (feature dtype
                                                ``video``): one MP4 per camera and data file,
                                                episodes concatenated; meta/episodes gains
                                                videos/<feature>/{chunk_index, file_index,
                                                from_timestamp, to_timestamp}

Images: PNG in Parquet is the default because it is lossless (decoding gives the exact
pixels) and needs nothing but Pillow; ``image_format="video"`` writes H.264 MP4 through
PyAV (lossy, much smaller; lerobot's own choice for large datasets). The reader decodes
both lazily (``Episode.images`` holds :class:`~cupid_engine.data.episode.ImageSequence`
views), including v2.1 per-episode videos and AV1 files written by lerobot.

File names come from counters, never from episode ids.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cupid_engine.constants import SCHEMA_VERSION
from cupid_engine.data import lerobot_meta
from cupid_engine.data._util import build_then_swap
from cupid_engine.data.episode import Episode, encode_png
from cupid_engine.data.schema import (
    ACTION_COLUMN,
    IMAGE_PREFIX,
    IMAGE_STRUCT,
    OBS_PREFIX,
    EpisodeValidator,
    episode_row,
    fixed_list,
    step_schema,
)

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000
DATA_PATH_V3 = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
EPISODES_META_PATH = "meta/episodes/chunk-000/file-000.parquet"
VIDEO_PATH_V3 = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
IMAGE_FORMATS = ("png", "video")
# Encoded images are large: a row group is also flushed at this many buffered bytes.
_ROW_GROUP_BYTES = 64 << 20
# Step rows are buffered up to this many before a row group is written: big enough for
# efficient Parquet, small enough that memory stays bounded whatever the episode count.
_ROW_GROUP_ROWS = 65536


# ----------------------------------------------------------------------------- writer


def write_dataset(
    path: str | os.PathLike,
    episodes: Iterable[Episode],
    *,
    fps: int = 20,
    episodes_per_file: int = 100,
    overwrite: bool = False,
    image_format: str = "png",
    video_codec: str | None = None,
) -> pathlib.Path:
    """Write episodes as a LeRobot v3.0 dataset, streaming.

    Episodes are validated as they arrive (duplicate ids, length 0, dimensions that
    differ from the first episode, non-finite values) and written file by file, so at
    most one data file's buffer (``<= 65536`` rows) plus the episode-level rows are held.
    The dataset is assembled in a sibling temporary folder and moved into place only
    when complete: a failure leaves any previous dataset at ``path`` untouched.

    Args:
        path: Destination folder.
        episodes: Any iterable of episodes (a generator is fine).
        fps: Frames per second recorded in ``info.json`` and used for ``timestamp``.
        episodes_per_file: Episodes per ``data/chunk-XXX/file-XXX.parquet``.
        overwrite: Replace an existing dataset at ``path``.
        image_format: How ``Episode.images`` are stored: ``png`` (lossless, in the
            Parquet data files, feature dtype ``image``) or ``video`` (MP4 per camera and
            data file, feature dtype ``video``).
        video_codec: FFmpeg encoder for ``video`` (default ``libx264``; ``libsvtav1`` works).

    Returns:
        The dataset folder.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False, or it is a non-empty
            folder that is not a dataset.
        EpisodeError: For bad episodes (nothing is written).
        ValueError: For no episodes or bad arguments.
    """
    if int(fps) <= 0 or int(episodes_per_file) <= 0:
        raise ValueError(f"fps and episodes_per_file must be positive, got {fps}, {episodes_per_file}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    path = pathlib.Path(path)
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        if not path.is_dir() or (any(path.iterdir()) and not (path / "meta" / "info.json").is_file()):
            raise FileExistsError(f"{path} is not a LeRobot dataset; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    with build_then_swap(path) as tmp:
        _write(
            tmp, episodes, fps=int(fps), episodes_per_file=int(episodes_per_file),
            image_format=image_format, video_codec=video_codec,
        )
    return path


class _Writer:
    """State of one streaming write: the open data file, its buffer and the meta rows."""

    def __init__(
        self, root: pathlib.Path, fps: int, episodes_per_file: int, image_format: str = "png", video_codec: str | None = None
    ) -> None:
        self.root = root
        self.fps = fps
        self.per_file = episodes_per_file
        self.image_format = image_format
        self.video_codec = video_codec
        self.meta_schema = EPISODES_META_SCHEMA
        self.video_writers: dict[str, Any] = {}
        self.buffered_bytes = 0
        self.check = EpisodeValidator()
        self.schema: pa.Schema | None = None
        self.tasks: dict[str, int] = {}
        self.n_episodes = 0
        self.n_frames = 0
        self.file_number = -1
        self.data_writer: pq.ParquetWriter | None = None
        self.buffer: list[pa.Table] = []
        self.buffered_rows = 0
        self.meta_rows: list[dict[str, Any]] = []
        self.meta_writer: pq.ParquetWriter | None = None
        self.stats = lerobot_meta.StatsAggregator()
        self.full_meta_schema: pa.Schema | None = None
        self.engine_rows: list[dict[str, Any]] = []
        self.engine_writer: pq.ParquetWriter | None = None

    def add(self, ep: Episode) -> None:
        self.check(ep)
        if self.schema is None:
            png_keys = sorted(self.check.image_shapes) if self.image_format == "png" else []
            base = step_schema(self.check.obs_dims, self.check.action_dim, png_keys)
            # lerobot stores shape-(1,) features as scalars (datasets.Value), not 1-lists.
            for i, f in enumerate(base):
                if pa.types.is_fixed_size_list(f.type) and f.type.list_size == 1:
                    base = base.set(i, pa.field(f.name, pa.float32(), nullable=False))
            if self.image_format == "video":
                for key in sorted(self.check.image_shapes):
                    for col, typ in _video_meta_columns(IMAGE_PREFIX + key):
                        self.meta_schema = self.meta_schema.append(pa.field(col, typ, nullable=False))
            self.schema = base.append(pa.field("timestamp", pa.float32(), nullable=False))
            self.schema = self.schema.append(pa.field("index", pa.int64(), nullable=False))
            self.schema = self.schema.append(pa.field("task_index", pa.int64(), nullable=False))
        if self.n_episodes % self.per_file == 0:
            self._next_file()
        task_index = self.tasks.setdefault(ep.task, len(self.tasks))
        T = ep.length
        cols: dict[str, pa.Array] = {
            "episode_index": pa.array(np.full(T, self.n_episodes, np.int64)),
            "frame_index": pa.array(np.arange(T, dtype=np.int64)),
        }
        for key in sorted(ep.observations):
            cols[OBS_PREFIX + key] = _step_column(ep.observations[key])
        video_rows: dict[str, Any] = {}
        for key in sorted(ep.images):
            frames = ep.image_array(key)
            if self.image_format == "png":
                blobs = [encode_png(f) for f in frames]
                self.buffered_bytes += sum(len(b) for b in blobs)
                cols[IMAGE_PREFIX + key] = pa.StructArray.from_arrays(
                    [pa.array(blobs, pa.binary()), pa.nulls(T, pa.string())], fields=list(IMAGE_STRUCT)
                )
            else:
                writer = self.video_writers[key]
                first = writer.n_frames
                writer.write(frames)
                feat = IMAGE_PREFIX + key
                chunk_v, file_v = divmod(self.file_number, CHUNKS_SIZE)
                video_rows.update(
                    {
                        f"videos/{feat}/chunk_index": chunk_v,
                        f"videos/{feat}/file_index": file_v,
                        f"videos/{feat}/from_timestamp": first / self.fps,
                        f"videos/{feat}/to_timestamp": (first + T) / self.fps,
                    }
                )
        cols[ACTION_COLUMN] = _step_column(ep.actions)
        cols["timestamp"] = pa.array((np.arange(T) / self.fps).astype(np.float32))
        cols["index"] = pa.array(np.arange(self.n_frames, self.n_frames + T, dtype=np.int64))
        cols["task_index"] = pa.array(np.full(T, task_index, np.int64))
        self.buffer.append(pa.Table.from_arrays(list(cols.values()), schema=self.schema))
        self.buffered_rows += T
        if self.buffered_rows >= _ROW_GROUP_ROWS or self.buffered_bytes >= _ROW_GROUP_BYTES:
            self._flush_data()
        chunk, file = divmod(self.file_number, CHUNKS_SIZE)
        ep_stats = self._episode_stats(ep, task_index)
        self.stats.add(ep_stats)
        row = {
            "episode_index": self.n_episodes,
            "tasks": [ep.task],
            "length": T,
            "data/chunk_index": chunk,
            "data/file_index": file,
            "dataset_from_index": self.n_frames,
            "dataset_to_index": self.n_frames + T,
        }
        row.update(video_rows)
        row.update(lerobot_meta.stats_columns(ep_stats))
        # One episodes file, as lerobot writes until it reaches data_files_size_in_mb.
        row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
        if self.full_meta_schema is None:
            self.full_meta_schema = pa.schema(
                list(self.meta_schema)
                + lerobot_meta.stats_fields(ep_stats)
                + [pa.field("meta/episodes/chunk_index", pa.int64(), nullable=False), pa.field("meta/episodes/file_index", pa.int64(), nullable=False)]
            )
        self.meta_rows.append(row)
        self.engine_rows.append({"episode_index": self.n_episodes, **episode_row(ep)})
        self.n_episodes += 1
        self.n_frames += T

    def _episode_stats(self, ep: Episode, task_index: int) -> dict[str, dict[str, np.ndarray]]:
        """lerobot's per-episode stats of every feature this episode writes."""
        T = ep.length
        vectors: dict[str, np.ndarray] = {OBS_PREFIX + k: v for k, v in sorted(ep.observations.items())}
        vectors[ACTION_COLUMN] = ep.actions
        vectors["timestamp"] = (np.arange(T) / self.fps).astype(np.float32)
        vectors["frame_index"] = np.arange(T)
        vectors["episode_index"] = np.full(T, self.n_episodes)
        vectors["index"] = np.arange(self.n_frames, self.n_frames + T)
        vectors["task_index"] = np.full(T, task_index)
        out = lerobot_meta.vector_stats_many(vectors)
        for k in sorted(ep.images):
            out[IMAGE_PREFIX + k] = lerobot_meta.image_stats(ep.images[k])
        return out

    def _next_file(self) -> None:
        self._close_data()
        self.file_number += 1
        chunk, file = divmod(self.file_number, CHUNKS_SIZE)
        out = self.root / DATA_PATH_V3.format(chunk_index=chunk, file_index=file)
        out.parent.mkdir(parents=True, exist_ok=True)
        self.data_writer = pq.ParquetWriter(out, self.schema)
        if self.image_format == "video":
            from cupid_engine.data.video import DEFAULT_CODEC, VideoWriter

            for key, (h, w, _c) in sorted(self.check.image_shapes.items()):
                vpath = self.root / VIDEO_PATH_V3.format(video_key=IMAGE_PREFIX + key, chunk_index=chunk, file_index=file)
                vpath.parent.mkdir(parents=True, exist_ok=True)
                self.video_writers[key] = VideoWriter(str(vpath), h, w, self.fps, codec=self.video_codec or DEFAULT_CODEC)

    def _flush_data(self) -> None:
        if self.buffer:
            self.data_writer.write_table(pa.concat_tables(self.buffer), row_group_size=_ROW_GROUP_ROWS)
            self.buffer, self.buffered_rows, self.buffered_bytes = [], 0, 0

    def _close_data(self) -> None:
        if self.data_writer is not None:
            self._flush_data()
            self.data_writer.close()
            self.data_writer = None
        self._close_videos()
        self._flush_meta()

    def _close_videos(self) -> None:
        for writer in self.video_writers.values():
            writer.close()
        self.video_writers = {}

    def _flush_meta(self) -> None:
        if not self.meta_rows:
            return
        table = pa.Table.from_pylist(self.meta_rows, schema=self.full_meta_schema)
        if self.meta_writer is None:
            out = self.root / EPISODES_META_PATH
            out.parent.mkdir(parents=True, exist_ok=True)
            self.meta_writer = pq.ParquetWriter(out, self.full_meta_schema)
        self.meta_writer.write_table(table)
        self.meta_rows = []
        if self.engine_writer is None:
            out = self.root / lerobot_meta.ENGINE_EPISODES_PATH
            out.parent.mkdir(parents=True, exist_ok=True)
            schema = lerobot_meta.ENGINE_EPISODES_SCHEMA.with_metadata(
                {b"cupid_engine": json.dumps({"schema_version": SCHEMA_VERSION, "episodes_per_file": self.per_file}).encode()}
            )
            self.engine_writer = pq.ParquetWriter(out, schema)
        self.engine_writer.write_table(pa.Table.from_pylist(self.engine_rows, schema=self.engine_writer.schema))
        self.engine_rows = []

    def finish(self) -> None:
        if self.n_episodes == 0:
            raise ValueError("write_dataset got no episodes")
        self._close_data()
        self.meta_writer.close()
        self.engine_writer.close()
        lerobot_meta.write_tasks(self.root / lerobot_meta.TASKS_PATH, self.tasks)
        (self.root / lerobot_meta.STATS_PATH).write_text(lerobot_meta.stats_json(self.stats.result()))
        features: dict[str, Any] = {}
        for key in sorted(self.check.obs_dims):
            features[OBS_PREFIX + key] = {"dtype": "float32", "shape": [self.check.obs_dims[key]], "names": None}
        for key, (h, w, c) in sorted(self.check.image_shapes.items()):
            features[IMAGE_PREFIX + key] = _image_feature(self.image_format, h, w, c, self.fps, self.video_codec)
        features[ACTION_COLUMN] = {"dtype": "float32", "shape": [self.check.action_dim], "names": None}
        features["timestamp"] = {"dtype": "float32", "shape": [1], "names": None}
        for name in ("frame_index", "episode_index", "index", "task_index"):
            features[name] = {"dtype": "int64", "shape": [1], "names": None}
        # The fields of lerobot 0.6's DatasetInfo, in its order (an unknown field makes lerobot
        # warn and is dropped when lerobot rewrites the file; ours live in meta/cupid_engine/).
        info = {
            "codebase_version": CODEBASE_VERSION,
            "fps": self.fps,
            "features": features,
            "total_episodes": self.n_episodes,
            "total_frames": self.n_frames,
            "total_tasks": len(self.tasks),
            "chunks_size": CHUNKS_SIZE,
            "data_files_size_in_mb": 100,
            "video_files_size_in_mb": 200,
            "data_path": DATA_PATH_V3,
            "video_path": VIDEO_PATH_V3 if self.image_format == "video" and self.check.image_shapes else None,
            "robot_type": None,
            # LeRobot's own (Hugging Face) split: every row. Our train/holdout/... split is
            # the per-episode `split` of meta/cupid_engine/episodes.parquet.
            "splits": {"train": f"0:{self.n_episodes}"},
        }
        (self.root / "meta" / "info.json").write_text(json.dumps(info, indent=2))


EPISODES_META_SCHEMA = pa.schema(
    [
        pa.field("episode_index", pa.int64(), nullable=False),
        pa.field("tasks", pa.list_(pa.string())),
        pa.field("length", pa.int64(), nullable=False),
        pa.field("data/chunk_index", pa.int64(), nullable=False),
        pa.field("data/file_index", pa.int64(), nullable=False),
        pa.field("dataset_from_index", pa.int64(), nullable=False),
        pa.field("dataset_to_index", pa.int64(), nullable=False),
    ]
)
"""Leading ``meta/episodes`` columns (lerobot's); video, ``stats/*`` and ``meta/episodes/*`` columns follow."""


def _step_column(arr: np.ndarray) -> pa.Array:
    """``[T, d]`` -> ``fixed_size_list<float32>[d]``, or a float32 scalar column when ``d == 1``."""
    return pa.array(np.ascontiguousarray(arr[:, 0], dtype=np.float32)) if arr.shape[1] == 1 else fixed_list(arr)


def _video_meta_columns(feature: str) -> list[tuple[str, pa.DataType]]:
    """meta/episodes columns locating one episode of video ``feature`` (lerobot v3 names)."""
    return [
        (f"videos/{feature}/chunk_index", pa.int64()),
        (f"videos/{feature}/file_index", pa.int64()),
        (f"videos/{feature}/from_timestamp", pa.float64()),
        (f"videos/{feature}/to_timestamp", pa.float64()),
    ]


def _image_feature(image_format: str, h: int, w: int, c: int, fps: int, codec: str | None) -> dict[str, Any]:
    """info.json entry of a camera, as lerobot writes it."""
    names = ["height", "width", "channels"]
    if image_format == "png":
        return {"dtype": "image", "shape": [h, w, c], "names": names}
    from cupid_engine.data.video import DEFAULT_CODEC

    codec = codec or DEFAULT_CODEC
    return {
        "dtype": "video",
        "shape": [h, w, 3],
        "names": names,
        "info": {
            "video.height": h,
            "video.width": w,
            "video.codec": {"libx264": "h264", "libsvtav1": "av1"}.get(codec, codec),
            "video.pix_fmt": "yuv420p",
            "video.is_depth_map": False,
            "video.fps": fps,
            "video.channels": 3,
            "has_audio": False,
        },
    }


def _write(
    root: pathlib.Path, episodes: Iterable[Episode], *, fps: int, episodes_per_file: int,
    image_format: str = "png", video_codec: str | None = None,
) -> None:
    root.mkdir(parents=True)
    writer = _Writer(root, fps, episodes_per_file, image_format, video_codec)
    try:
        for ep in episodes:
            writer.add(ep)
        writer.finish()
    finally:
        for vw in writer.video_writers.values():
            vw.close()
        if writer.data_writer is not None:
            writer.data_writer.close()
        if writer.meta_writer is not None:
            writer.meta_writer.close()
        if writer.engine_writer is not None:
            writer.engine_writer.close()
