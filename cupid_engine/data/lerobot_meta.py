"""The metadata lerobot 0.6 writes beside a v3.0 dataset, computed the way it computes it.

:func:`~cupid_engine.data.lerobot.write_dataset` uses these pieces so that lerobot's own
tools (``LeRobotDataset``, ``LeRobotDatasetMetadata.stats``, ``delete_episodes``,
``LeRobotDataset.resume`` + ``save_episode``, the visualiser) treat our datasets like the
ones lerobot records:

* ``meta/tasks.parquet``: one row per task, column ``task_index`` and the task string as
  the pandas index named ``task`` (lerobot reads it with ``pandas.read_parquet`` and maps
  ``task_index -> task`` through that index, so a plain ``task`` column is not enough);
* per-episode statistics of every feature (``stats/<feature>/<stat>`` columns of
  ``meta/episodes``) and their aggregate in ``meta/stats.json``: ``min``, ``max``,
  ``mean``, ``std``, ``count`` and the quantiles ``q01 q10 q50 q90 q99``;
* the engine's own episode-level fields (id, split, source, task, outcome, tier,
  metadata), kept in ``meta/cupid_engine/episodes.parquet`` keyed by ``episode_index``
  (see :data:`ENGINE_EPISODES_PATH`), because lerobot refuses ``meta/episodes`` files
  whose columns differ from each other (a resumed dataset appends files with lerobot's
  columns only).

Statistics follow lerobot's definitions: per episode, a vector feature ``[T, d]`` gets
per-dimension ``min/max/mean/std`` (population std) and ``count = [T]``; an episode with
one step gets its quantiles set to the mean. Quantiles are the lower order statistic
``x_(ceil(q T))`` (NumPy's ``inverted_cdf``): lerobot estimates the same order statistic
from a 5000-bin histogram, so its numbers agree with ours to within one bin,
``(max - min) / 5000``. Images ``[T, H, W, C]`` are sampled (evenly spaced frames, as
many as lerobot samples), frames wider or taller than 300 pixels are strided down to
about 150, and stats are per channel, divided by 255, shaped ``[C, 1, 1]``, with ``count``
the number of sampled frames. The dataset-level stats combine the episodes as lerobot's
``aggregate_stats`` does: min of mins, max of maxes, count-weighted mean and quantiles,
pooled variance.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cupid_engine.data.schema import EPISODE_SCHEMA

QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
QUANTILE_KEYS = tuple(f"q{round(q * 100):02d}" for q in QUANTILES)
STAT_KEYS = ("min", "max", "mean", "std", "count") + QUANTILE_KEYS
TASKS_PATH = "meta/tasks.parquet"
STATS_PATH = "meta/stats.json"
ENGINE_EPISODES_PATH = "meta/cupid_engine/episodes.parquet"
"""The engine's episode-level fields, one row per ``episode_index`` (lerobot ignores it)."""

ENGINE_EPISODES_SCHEMA = pa.schema([pa.field("episode_index", pa.int64(), nullable=False)] + list(EPISODE_SCHEMA))

# lerobot samples between 100 and 10,000 frames per episode for image stats (T^0.75).
_MIN_IMAGE_SAMPLES, _MAX_IMAGE_SAMPLES, _IMAGE_SAMPLE_POWER = 100, 10_000, 0.75


def vector_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """Stats of one episode's vector feature.

    Args:
        values: ``[T]`` (a scalar feature, e.g. ``timestamp``) or ``[T, d]``.

    Returns:
        ``stat -> array``: ``[d]`` (``[1]`` for ``[T]`` input) for every stat except
        ``count``, which is ``[1]`` holding ``T``.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"vector stats need [T] or [T, d] with T > 0, got shape {np.shape(values)}")
    return _stats_of_rows(x, count=x.shape[0])


def vector_stats_many(features: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """:func:`vector_stats` of several ``[T]``/``[T, d]`` features of one episode at once.

    Every stat is per column, so the features are stacked into one ``[T, sum d]`` array,
    reduced once and split again: the same numbers, one NumPy pass instead of one per feature.
    """
    cols = [np.asarray(v, dtype=np.float64) for v in features.values()]
    cols = [c[:, None] if c.ndim == 1 else c for c in cols]
    if not cols or any(c.ndim != 2 or c.shape[0] != cols[0].shape[0] or c.shape[0] == 0 for c in cols):
        raise ValueError(f"vector stats need [T] or [T, d] features with one T > 0, got {[np.shape(v) for v in features.values()]}")
    stacked = _stats_of_rows(np.concatenate(cols, axis=1), count=cols[0].shape[0])
    out, start = {}, 0
    for name, c in zip(features, cols):
        stop = start + c.shape[1]
        out[name] = {k: v if k == "count" else v[start:stop] for k, v in stacked.items()}
        start = stop
    return out


def image_sample_indices(n_frames: int) -> np.ndarray:
    """Evenly spaced frame indices, as many as lerobot samples for image stats."""
    if n_frames <= 0:
        raise ValueError("an image feature needs at least one frame")
    lo = min(_MIN_IMAGE_SAMPLES, n_frames)
    k = max(lo, min(int(n_frames**_IMAGE_SAMPLE_POWER), _MAX_IMAGE_SAMPLES))
    return np.round(np.linspace(0, n_frames - 1, k)).astype(np.int64)


def image_stats(frames: Any) -> dict[str, np.ndarray]:
    """Per-channel stats of one episode's camera, scaled to ``[0, 1]``.

    Args:
        frames: ``uint8 [T, H, W, C]``, an array or anything indexable by frame that
            returns ``[H, W, C]`` (a lazy :class:`~cupid_engine.data.episode.ImageSequence`).

    Returns:
        ``stat -> [C, 1, 1]`` float arrays, and ``count = [number of sampled frames]``.
    """
    idx = image_sample_indices(len(frames))
    first = np.asarray(frames[int(idx[0])])
    h, w = first.shape[:2]
    # lerobot strides frames of 300 pixels or more down to about 150 before sampling pixels
    step = 1 if max(h, w) < 300 else max(1, int((w if w > h else h) / 150))
    sampled = np.stack([np.asarray(frames[int(i)])[::step, ::step] for i in idx])
    c = sampled.shape[-1]
    pixels = sampled.reshape(-1, c).astype(np.float64) / 255.0
    out = _stats_of_rows(pixels, count=len(idx))
    return {k: v if k == "count" else v.reshape(c, 1, 1) for k, v in out.items()}


def _stats_of_rows(x: np.ndarray, *, count: int) -> dict[str, np.ndarray]:
    mean = x.mean(axis=0)
    out = {
        "min": x.min(axis=0),
        "max": x.max(axis=0),
        "mean": mean,
        "std": x.std(axis=0),
        "count": np.array([count], dtype=np.int64),
    }
    if x.shape[0] < 2:
        for key in QUANTILE_KEYS:
            out[key] = mean.copy()
    else:
        # x_(ceil(q n)), 1-based: NumPy's "inverted_cdf", and the sample lerobot's histogram
        # search lands on (same float product q * n); one sort serves all five quantiles.
        ordered = np.sort(x, axis=0)
        n = x.shape[0]
        for key, q in zip(QUANTILE_KEYS, QUANTILES):
            out[key] = ordered[min(max(math.ceil(q * n) - 1, 0), n - 1)]
    return out


class StatsAggregator:
    """Dataset-level stats from per-episode stats, streaming (lerobot's ``aggregate_stats``).

    Holds only running sums per feature: memory does not grow with the episode count.
    """

    def __init__(self) -> None:
        self._acc: dict[str, dict[str, Any]] = {}

    def add(self, episode_stats: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Fold in one episode's ``feature -> stat -> array``."""
        for feature, st in episode_stats.items():
            n = float(st["count"][0])
            acc = self._acc.get(feature)
            mean = np.asarray(st["mean"], np.float64)
            second = np.asarray(st["std"], np.float64) ** 2 + mean**2
            if acc is None:
                self._acc[feature] = acc = {
                    "min": np.asarray(st["min"], np.float64).copy(),
                    "max": np.asarray(st["max"], np.float64).copy(),
                    "n": 0.0,
                    "sum": np.zeros_like(mean),
                    "sum2": np.zeros_like(mean),
                    "q": {k: np.zeros_like(mean) for k in QUANTILE_KEYS},
                }
            else:
                acc["min"] = np.minimum(acc["min"], st["min"])
                acc["max"] = np.maximum(acc["max"], st["max"])
            acc["n"] += n
            acc["sum"] += n * mean
            acc["sum2"] += n * second
            for k in QUANTILE_KEYS:
                acc["q"][k] += n * np.asarray(st[k], np.float64)

    def result(self) -> dict[str, dict[str, np.ndarray]]:
        """``feature -> stat -> array`` over every episode added."""
        out = {}
        for feature, acc in self._acc.items():
            n = acc["n"]
            mean = acc["sum"] / n
            var = np.maximum(acc["sum2"] / n - mean**2, 0.0)
            st = {
                "min": acc["min"],
                "max": acc["max"],
                "mean": mean,
                "std": np.sqrt(var),
                "count": np.array([int(round(n))], dtype=np.int64),
            }
            for k in QUANTILE_KEYS:
                st[k] = acc["q"][k] / n
            out[feature] = st
        return out


def stats_columns(episode_stats: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """``stats/<feature>/<stat>`` -> nested Python lists, the ``meta/episodes`` columns."""
    return {f"stats/{f}/{k}": np.asarray(v).tolist() for f, st in episode_stats.items() for k, v in st.items()}


def stats_fields(episode_stats: Mapping[str, Mapping[str, np.ndarray]]) -> list[pa.Field]:
    """Arrow fields of :func:`stats_columns`: ``list<double>`` nested per dimension, ``count`` ``list<int64>``."""
    fields = []
    for feature, st in episode_stats.items():
        for key, value in st.items():
            typ: pa.DataType = pa.int64() if key == "count" else pa.float64()
            for _ in range(np.ndim(value)):
                typ = pa.list_(typ)
            fields.append(pa.field(f"stats/{feature}/{key}", typ))
    return fields


def stats_json(stats: Mapping[str, Mapping[str, np.ndarray]]) -> str:
    """``meta/stats.json`` text: ``feature -> stat -> (nested) list``."""
    doc = {f: {k: np.asarray(v).tolist() for k, v in st.items()} for f, st in stats.items()}
    return json.dumps(doc, indent=4, allow_nan=False)


def write_tasks(path: pathlib.Path, tasks: Mapping[str, int]) -> None:
    """Write ``meta/tasks.parquet`` as lerobot does: ``task_index`` with the task as the index.

    lerobot writes a pandas DataFrame indexed by ``task``; without pandas, the same file is
    the two columns plus the ``pandas`` schema metadata that marks ``task`` as the index.
    """
    names = list(tasks)
    table = pa.table(
        {"task_index": pa.array([tasks[t] for t in names], pa.int64()), "task": pa.array(names, pa.string())}
    )
    pandas_meta = {
        "index_columns": ["task"],
        "column_indexes": [
            {"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object", "metadata": {"encoding": "UTF-8"}}
        ],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64", "metadata": None},
            {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object", "metadata": None},
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.3",
    }
    table = table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
