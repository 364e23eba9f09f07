"""A checker of the LeRobot v3.0 layout as lerobot 0.6 documents and writes it.

Written from lerobot's v3 documentation (``docs/source/lerobot-dataset-v3.mdx``: info.json,
stats.json, tasks, chunked ``meta/episodes``, ``data/`` and ``videos/`` files) and the
format its writer produces (``DatasetInfo`` fields, ``tasks.parquet`` indexed by the task
string, ``stats/<feature>/<stat>`` and ``meta/episodes/{chunk,file}_index`` columns,
shape-(1,) features stored as scalars). It needs only pyarrow and numpy, so it also runs
against datasets lerobot itself wrote (see docs/lerobot_roundtrip.md).

``check_v3_layout(root)`` returns the list of problems (empty when the dataset conforms);
``assert_v3_layout(root)`` raises with all of them.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

INFO_FIELDS = (
    "codebase_version", "fps", "features", "total_episodes", "total_frames", "total_tasks", "chunks_size",
    "data_files_size_in_mb", "video_files_size_in_mb", "data_path", "video_path", "robot_type", "splits",
)
OPTIONAL_INFO_FIELDS = ("tools",)
DEFAULT_FEATURES = {
    "timestamp": "float32", "frame_index": "int64", "episode_index": "int64", "index": "int64", "task_index": "int64",
}
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_FILE = re.compile(r"^meta/episodes/chunk-(\d{3})/file-(\d{3})\.parquet$")
STATS = ("min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99")
EPISODE_COLUMNS = {
    "episode_index": pa.int64(), "tasks": pa.list_(pa.string()), "length": pa.int64(),
    "data/chunk_index": pa.int64(), "data/file_index": pa.int64(),
    "dataset_from_index": pa.int64(), "dataset_to_index": pa.int64(),
    "meta/episodes/chunk_index": pa.int64(), "meta/episodes/file_index": pa.int64(),
}
VIDEO_COLUMNS = ("chunk_index", "file_index", "from_timestamp", "to_timestamp")


def assert_v3_layout(root: str | pathlib.Path, **kw: Any) -> None:
    problems = check_v3_layout(root, **kw)
    assert not problems, "LeRobot v3 layout problems:\n" + "\n".join(problems)


def check_v3_layout(root: str | pathlib.Path, *, check_values: bool = True) -> list[str]:
    """Every way ``root`` departs from the v3.0 layout lerobot 0.6 reads and writes.

    Args:
        root: The dataset folder.
        check_values: Also recompute per-episode stats from the data files and compare.
    """
    root = pathlib.Path(root)
    out: list[str] = []
    info_path = root / "meta/info.json"
    if not info_path.is_file():
        return ["meta/info.json is missing"]
    info = json.loads(info_path.read_text())
    out += _check_info(info)
    features: dict[str, dict] = info.get("features", {})
    video_keys = [k for k, f in features.items() if f.get("dtype") == "video"]

    tasks = _check_tasks(root, out)
    meta = _check_episodes(root, info, features, video_keys, out)
    if meta is None:
        return out
    n_eps = meta.num_rows
    if info.get("total_episodes") != n_eps:
        out.append(f"info.json total_episodes={info.get('total_episodes')} but meta/episodes has {n_eps} rows")
    if tasks is not None and info.get("total_tasks") != len(tasks):
        out.append(f"info.json total_tasks={info.get('total_tasks')} but tasks.parquet has {len(tasks)} tasks")
    if info.get("splits") != {"train": f"0:{n_eps}"}:
        out.append(f"info.json splits {info.get('splits')} is not {{'train': '0:{n_eps}'}}")
    frames = _check_data(root, info, features, meta, tasks, out, check_values)
    if frames is not None and info.get("total_frames") != frames:
        out.append(f"info.json total_frames={info.get('total_frames')} but the data files hold {frames} rows")
    for vk in video_keys:
        for c, f in set(zip(meta.column(f"videos/{vk}/chunk_index").to_pylist(), meta.column(f"videos/{vk}/file_index").to_pylist())):
            p = root / VIDEO_PATH.format(video_key=vk, chunk_index=c, file_index=f)
            if not p.is_file():
                out.append(f"{p.relative_to(root)} is missing")
    _check_stats_json(root, features, meta, out)
    return out


def _check_info(info: dict) -> list[str]:
    out = []
    extra = sorted(set(info) - set(INFO_FIELDS) - set(OPTIONAL_INFO_FIELDS))
    missing = sorted(set(INFO_FIELDS) - set(info))
    if extra:
        out.append(f"info.json has fields lerobot's DatasetInfo does not know (it warns and drops them): {extra}")
    if missing:
        out.append(f"info.json lacks fields {missing}")
    if info.get("codebase_version") != "v3.0":
        out.append(f"codebase_version {info.get('codebase_version')!r} is not 'v3.0'")
    if not isinstance(info.get("fps"), int) or info["fps"] <= 0:
        out.append(f"fps {info.get('fps')!r} is not a positive integer")
    if info.get("data_path") != DATA_PATH:
        out.append(f"data_path {info.get('data_path')!r} is not {DATA_PATH!r}")
    features = info.get("features", {})
    has_video = any(f.get("dtype") == "video" for f in features.values())
    if (info.get("video_path") is not None) != has_video or (has_video and info.get("video_path") != VIDEO_PATH):
        out.append(f"video_path {info.get('video_path')!r} does not match the video features")
    for name, dtype in DEFAULT_FEATURES.items():
        f = features.get(name)
        if f is None or f.get("dtype") != dtype or list(f.get("shape", [])) != [1]:
            out.append(f"default feature {name!r} must be {{dtype: {dtype}, shape: [1]}}, got {f}")
    for name, f in features.items():
        if not {"dtype", "shape", "names"} <= set(f):
            out.append(f"feature {name!r} lacks dtype/shape/names: {f}")
        elif not isinstance(f["shape"], list) or not all(isinstance(s, int) and s > 0 for s in f["shape"]):
            out.append(f"feature {name!r} has a bad shape {f['shape']!r}")
    for k in ("chunks_size", "data_files_size_in_mb", "video_files_size_in_mb"):
        if not isinstance(info.get(k), int) or info[k] <= 0:
            out.append(f"{k} {info.get(k)!r} is not a positive integer")
    return out


def _check_tasks(root: pathlib.Path, out: list[str]) -> list[str] | None:
    """Tasks in task_index order, read the way pandas (hence lerobot) reads the file."""
    path = root / "meta/tasks.parquet"
    if not path.is_file():
        out.append("meta/tasks.parquet is missing")
        return None
    table = pq.read_table(path)
    pandas_meta = json.loads((table.schema.metadata or {}).get(b"pandas", b"{}"))
    # lerobot reads tasks with pandas.read_parquet and looks task strings up in the index named "task"
    if pandas_meta.get("index_columns") != ["task"]:
        out.append(f"meta/tasks.parquet: the pandas index is {pandas_meta.get('index_columns')}, not ['task'] (lerobot's task lookup)")
        return None
    cols = {c["name"]: c for c in pandas_meta.get("columns", [])}
    if set(cols) != {"task", "task_index"} or set(table.column_names) != {"task", "task_index"}:
        out.append(f"meta/tasks.parquet: columns {table.column_names} (pandas {sorted(cols)}) are not task_index + index task")
        return None
    if table.schema.field("task_index").type != pa.int64():
        out.append("meta/tasks.parquet: task_index is not int64")
    idx = table.column("task_index").to_pylist()
    names = table.column("task").to_pylist()
    if sorted(idx) != list(range(len(idx))):
        out.append(f"meta/tasks.parquet: task_index {idx} is not 0..{len(idx) - 1}")
        return None
    if len(set(names)) != len(names):
        out.append("meta/tasks.parquet: repeated task strings")
    return [names[idx.index(i)] for i in range(len(idx))]


def _check_episodes(root, info, features, video_keys, out) -> pa.Table | None:
    files = sorted(p for p in (root / "meta/episodes").glob("*/*.parquet"))
    if not files:
        out.append("meta/episodes/chunk-*/file-*.parquet is missing")
        return None
    want = dict(EPISODE_COLUMNS)
    for vk in video_keys:
        for c in VIDEO_COLUMNS:
            want[f"videos/{vk}/{c}"] = pa.float64() if c.endswith("timestamp") else pa.int64()
    stat_cols = {f"stats/{f}/{s}" for f in features for s in STATS}
    tables = []
    names0 = None
    for p in files:
        rel = p.relative_to(root).as_posix()
        m = EPISODES_FILE.match(rel)
        if m is None:
            out.append(f"{rel}: not named meta/episodes/chunk-XXX/file-XXX.parquet")
            continue
        t = pq.read_table(p)
        names = set(t.column_names)
        # lerobot loads all episode files as one datasets.Dataset: the columns must agree
        if names0 is not None and names != names0:
            out.append(f"{rel}: columns differ from the first episodes file: {sorted(names ^ names0)}")
        names0 = names0 or names
        extra = sorted(names - set(want) - stat_cols)
        if extra:
            out.append(f"{rel}: columns lerobot does not write: {extra}")
        for c, typ in want.items():
            if c not in names:
                out.append(f"{rel}: lacks column {c!r}")
            elif t.schema.field(c).type != typ:
                out.append(f"{rel}: column {c!r} is {t.schema.field(c).type}, lerobot writes {typ}")
        missing_stats = sorted(stat_cols - names)
        if missing_stats:
            out.append(f"{rel}: lacks per-episode stats columns {missing_stats[:6]}{' ...' if len(missing_stats) > 6 else ''}")
        if "meta/episodes/chunk_index" in names:
            here = {(int(m.group(1)), int(m.group(2)))}
            got = set(zip(t.column("meta/episodes/chunk_index").to_pylist(), t.column("meta/episodes/file_index").to_pylist()))
            if got != here:
                out.append(f"{rel}: meta/episodes/chunk_index,file_index {sorted(got)} do not name this file {here}")
        tables.append(t)
    if not tables or any(c not in names0 for c in EPISODE_COLUMNS):
        return None
    meta = pa.concat_tables(tables, promote_options="permissive").sort_by("episode_index")
    idx = meta.column("episode_index").to_pylist()
    if idx != list(range(len(idx))):
        out.append(f"meta/episodes: episode_index is not 0..{len(idx) - 1}")
    frm = np.asarray(meta.column("dataset_from_index").to_pylist())
    to = np.asarray(meta.column("dataset_to_index").to_pylist())
    length = np.asarray(meta.column("length").to_pylist())
    if frm.size and (frm[0] != 0 or np.any(frm[1:] != to[:-1]) or np.any(to - frm != length) or np.any(length <= 0)):
        out.append("meta/episodes: dataset_from_index/dataset_to_index are not contiguous row ranges of the episode lengths")
    return meta


def _data_type(f: dict) -> pa.DataType:
    dtype = {"float32": pa.float32(), "float64": pa.float64(), "int64": pa.int64(), "int32": pa.int32(), "bool": pa.bool_(), "string": pa.string()}.get(f["dtype"])
    if f["dtype"] == "image":
        return pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
    if list(f["shape"]) == [1]:
        return dtype  # datasets.Value: a scalar column
    return pa.list_(dtype, int(np.prod(f["shape"]))) if len(f["shape"]) == 1 else None


def _check_data(root, info, features, meta, tasks, out, check_values) -> int | None:
    data_features = {k: f for k, f in features.items() if f.get("dtype") != "video"}
    fps = info.get("fps", 1)
    total = 0
    ep_tasks = meta.column("tasks").to_pylist()
    files: dict[tuple[int, int], list[int]] = {}
    for r, (c, f) in enumerate(zip(meta.column("data/chunk_index").to_pylist(), meta.column("data/file_index").to_pylist())):
        files.setdefault((c, f), []).append(r)
    on_disk = {p.relative_to(root).as_posix() for p in (root / "data").glob("*/*.parquet")}
    named = {DATA_PATH.format(chunk_index=c, file_index=f) for c, f in files}
    if on_disk != named:
        out.append(f"data/: files {sorted(on_disk ^ named)} are not exactly the ones meta/episodes names")
    stats_cols = [c for c in meta.column_names if c.startswith("stats/")]
    for (c, f), rows in sorted(files.items()):
        rel = DATA_PATH.format(chunk_index=c, file_index=f)
        if not (root / rel).is_file():
            continue
        t = pq.read_table(root / rel)
        total += t.num_rows
        if set(t.column_names) != set(data_features):
            out.append(f"{rel}: columns {sorted(set(t.column_names) ^ set(data_features))} differ from the non-video features")
            continue
        for name, feat in data_features.items():
            want = _data_type(feat)
            if want is not None and t.schema.field(name).type != want:
                out.append(f"{rel}: column {name!r} is {t.schema.field(name).type}, lerobot reads {want}")
        start = int(meta.column("dataset_from_index")[rows[0]].as_py())
        for r in rows:
            lo = int(meta.column("dataset_from_index")[r].as_py()) - start
            n = int(meta.column("length")[r].as_py())
            part = t.slice(lo, n)
            where = f"{rel}: episode_index {r}"
            if part.num_rows != n or part.column("episode_index").to_pylist() != [r] * n:
                out.append(f"{where}: rows {lo}:{lo + n} are not that episode's")
                continue
            if part.column("frame_index").to_pylist() != list(range(n)):
                out.append(f"{where}: frame_index is not 0..{n - 1}")
            if part.column("index").to_pylist() != list(range(start + lo, start + lo + n)):
                out.append(f"{where}: index is not the global row number")
            ts = part.column("timestamp").to_numpy()
            if np.any(np.abs(ts - np.arange(n) / fps) > 1e-4):  # lerobot's default tolerance_s
                out.append(f"{where}: timestamps are not frame_index / fps")
            if tasks is not None:
                used = {tasks[i] if 0 <= i < len(tasks) else None for i in part.column("task_index").to_pylist()}
                if not used <= set(ep_tasks[r]):
                    out.append(f"{where}: task_index names {sorted(map(str, used))}, not the episode's tasks {ep_tasks[r]}")
            if check_values:
                for name, feat in data_features.items():
                    # lerobot's delete_episodes renumbers episode_index/index/task_index but keeps
                    # their per-episode stats, so those stored values are bookkeeping only.
                    if feat["dtype"] in ("image", "string") or name in ("episode_index", "index", "task_index"):
                        continue
                    col = part.column(name).combine_chunks()
                    flat = col.flatten() if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) else col
                    vals = np.asarray(flat.to_numpy(zero_copy_only=False), np.float64).reshape(n, -1)
                    _compare_episode_stats(meta, r, name, vals, stats_cols, out, where)
    return total


def _compare_episode_stats(meta, r, name, vals, stats_cols, out, where) -> None:
    """Recompute one feature's episode stats (float64) and compare with the stored ones."""
    x = vals.reshape(len(vals), -1)
    ref = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0), "count": np.array([len(x)])}
    for q in ("q01", "q10", "q50", "q90", "q99"):
        ref[q] = x.mean(0) if len(x) < 2 else np.quantile(x, int(q[1:]) / 100, axis=0, method="inverted_cdf")
    for stat, want in ref.items():
        col = f"stats/{name}/{stat}"
        if col not in stats_cols:
            continue
        got = np.asarray(meta.column(col)[r].as_py(), np.float64)
        if got.shape != want.shape:
            out.append(f"{where}: {col} has shape {got.shape}, expected {want.shape}")
        elif stat.startswith("q"):
            # lerobot's histogram estimate agrees with the order statistic to one bin
            width = (ref["max"] - ref["min"]) / 5000
            if np.any(np.abs(got - want) > width + 1e-6) or np.any(got < ref["min"] - 1e-6) or np.any(got > ref["max"] + 1e-6):
                out.append(f"{where}: {col} = {got} is not the {stat} of the data ({want})")
        elif not np.allclose(got, want, rtol=1e-5, atol=1e-6):
            out.append(f"{where}: {col} = {got}, the data give {want}")


def _check_stats_json(root, features, meta, out) -> None:
    path = root / "meta/stats.json"
    if not path.is_file():
        out.append("meta/stats.json is missing (lerobot's meta.stats would be None)")
        return
    stats = json.loads(path.read_text())
    missing = sorted(set(features) - set(stats))
    if missing:
        out.append(f"meta/stats.json lacks features {missing}")
    for feat, st in stats.items():
        if set(st) != set(STATS):
            out.append(f"meta/stats.json {feat}: stats {sorted(st)} are not {list(STATS)}")
            continue
        cols = {s: f"stats/{feat}/{s}" for s in STATS}
        if not all(c in meta.column_names for c in cols.values()):
            continue
        per = {s: np.asarray(meta.column(c).to_pylist(), np.float64) for s, c in cols.items()}
        n = per["count"].reshape(-1)
        w = n.reshape((-1,) + (1,) * (per["mean"].ndim - 1))
        mean = (per["mean"] * w).sum(0) / n.sum()
        var = ((per["std"] ** 2 + (per["mean"] - mean) ** 2) * w).sum(0) / n.sum()
        agg = {"min": per["min"].min(0), "max": per["max"].max(0), "mean": mean, "std": np.sqrt(var), "count": np.array([n.sum()])}
        for q in STATS[5:]:
            agg[q] = (per[q] * w).sum(0) / n.sum()
        for s, want in agg.items():
            got = np.asarray(st[s], np.float64)
            if got.shape != want.shape or not np.allclose(got, want, rtol=1e-5, atol=1e-6):
                out.append(f"meta/stats.json {feat}/{s} = {got.tolist()} is not lerobot's aggregate of the episodes ({want.tolist()})")
