"""Datasets written by the engine follow the LeRobot v3.0 layout lerobot 0.6 writes.

The layout checker (``lerobot_v3_layout.py``) is written from lerobot's documented v3
format; it also passes on datasets lerobot itself wrote (docs/lerobot_roundtrip.md).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cupid_engine.data import Episode, open_dataset, write_dataset
from cupid_engine.data.lerobot_meta import StatsAggregator, image_stats, vector_stats

from .helpers import assert_same_episode, make_episodes
from .lerobot_v3_layout import assert_v3_layout, check_v3_layout


def _episodes(rng, n=7, images=False):
    eps = make_episodes(rng, n, obs_dims={"state": 5, "gripper": 1})
    eps.append(Episode("one_step", {"state": rng.standard_normal((1, 5)), "gripper": rng.standard_normal((1, 1))}, rng.standard_normal((1, 3)), task="lift"))
    if images:
        for e in eps:
            e.images = {"agentview": rng.integers(0, 256, (e.length, 6, 5, 3), dtype=np.uint8)}
    return eps


@pytest.mark.parametrize("images", [False, True])
def test_written_dataset_has_the_v3_layout(tmp_path, rng, images):
    eps = _episodes(rng, images=images)
    root = write_dataset(tmp_path / "ds", eps, fps=15, episodes_per_file=3)
    assert_v3_layout(root)
    info = json.loads((root / "meta/info.json").read_text())
    assert info["total_episodes"] == 8 and info["total_tasks"] == 2 and "cupid_engine" not in info
    stats = json.loads((root / "meta/stats.json").read_text())
    all_state = np.concatenate([e.observations["state"] for e in eps]).astype(np.float64)
    np.testing.assert_allclose(stats["observation.state"]["mean"], all_state.mean(0), rtol=1e-9)
    np.testing.assert_allclose(stats["observation.state"]["std"], all_state.std(0), rtol=1e-9)
    assert stats["observation.state"]["count"] == [len(all_state)]
    assert stats["observation.gripper"]["min"] == [float(min(e.observations["gripper"].min() for e in eps))]
    if images:
        assert np.asarray(stats["observation.images.agentview"]["mean"]).shape == (3, 1, 1)
    # the engine still reads back every field exactly
    for a, b in zip(eps, open_dataset(root).episodes(), strict=True):
        assert_same_episode(a, b)


def test_task_strings_come_back_through_the_task_index(tmp_path, rng):
    """lerobot maps each frame's task_index to ``tasks.iloc[task_index].name`` (the pandas
    index of tasks.parquet); a file without that index gives task 0 for every frame."""
    eps = _episodes(rng)
    root = write_dataset(tmp_path / "ds", eps, episodes_per_file=3)
    tasks = pq.read_table(root / "meta/tasks.parquet")
    pandas_meta = json.loads(tasks.schema.metadata[b"pandas"])
    assert pandas_meta["index_columns"] == ["task"]
    index = dict(zip(tasks.column("task_index").to_pylist(), tasks.column(pandas_meta["index_columns"][0]).to_pylist()))
    frames = pq.read_table(sorted((root / "data").glob("*/*.parquet"))[0]).column("task_index").to_pylist()
    first_file_eps = [e for e in eps[:3] for _ in range(e.length)]
    assert [index[i] for i in frames] == [e.task for e in first_file_eps]


def _rewrite(path, fn):
    pq.write_table(fn(pq.read_table(path)), path)


OLD_LAYOUT = {
    # what the engine wrote before: each is refused by lerobot or degrades it
    "tasks without index": (
        lambda r: _rewrite(r / "meta/tasks.parquet", lambda t: t.replace_schema_metadata(None)),
        "the pandas index is None",
    ),
    "no stats.json": (lambda r: (r / "meta/stats.json").unlink(), "meta/stats.json is missing"),
    "no chunk/file columns": (
        lambda r: _rewrite(r / "meta/episodes/chunk-000/file-000.parquet", lambda t: t.drop_columns(["meta/episodes/chunk_index", "meta/episodes/file_index"])),
        "lacks column 'meta/episodes/chunk_index'",
    ),
    "no stats columns": (
        lambda r: _rewrite(r / "meta/episodes/chunk-000/file-000.parquet", lambda t: t.drop_columns([c for c in t.column_names if c.startswith("stats/")])),
        "lacks per-episode stats columns",
    ),
    "engine columns in meta/episodes": (
        lambda r: _rewrite(r / "meta/episodes/chunk-000/file-000.parquet", lambda t: t.append_column("split", pa.array(["train"] * t.num_rows))),
        "columns lerobot does not write: ['split']",
    ),
    "unknown info field": (
        lambda r: (r / "meta/info.json").write_text(json.dumps({**json.loads((r / "meta/info.json").read_text()), "cupid_engine": {}})),
        "fields lerobot's DatasetInfo does not know",
    ),
    "shape-(1,) as a list": (
        lambda r: [
            _rewrite(p, lambda t: t.set_column(t.schema.get_field_index("observation.gripper"), "observation.gripper",
                                             pa.FixedSizeListArray.from_arrays(t.column("observation.gripper").combine_chunks(), 1)))
            for p in (r / "data").glob("*/*.parquet")
        ],
        "column 'observation.gripper' is fixed_size_list<element: float>[1], lerobot reads float",
    ),
    "wrong stats": (
        lambda r: (r / "meta/stats.json").write_text(
            json.dumps({**json.loads((r / "meta/stats.json").read_text()), "action": {**json.loads((r / "meta/stats.json").read_text())["action"], "mean": [0.0, 0.0, 0.0]}})
        ),
        "meta/stats.json action/mean",
    ),
}


@pytest.mark.parametrize("case", list(OLD_LAYOUT))
def test_checker_names_each_departure(tmp_path, rng, case):
    root = write_dataset(tmp_path / "ds", _episodes(rng), episodes_per_file=3)
    assert check_v3_layout(root) == []
    damage, message = OLD_LAYOUT[case]
    damage(root)
    problems = check_v3_layout(root)
    assert any(message in p for p in problems), problems


def test_dataset_resumed_by_lerobot(tmp_path, rng):
    """lerobot's resume appends a new meta/episodes file and data file with its own columns;
    both tools must keep reading the result (lerobot needs identical episode columns)."""
    eps = _episodes(rng, n=4)
    root = write_dataset(tmp_path / "ds", eps, fps=10, episodes_per_file=10)
    info = json.loads((root / "meta/info.json").read_text())
    meta = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet")
    data = pq.read_table(root / "data/chunk-000/file-000.parquet")
    # one more episode, written the way lerobot's save_episode writes it after resume
    T, n, start = 4, meta.num_rows, data.num_rows
    state = rng.standard_normal((T, 5)).astype(np.float32)
    new_rows = pa.table(
        {
            "observation.state": pa.FixedSizeListArray.from_arrays(pa.array(state.reshape(-1)), 5),
            "observation.gripper": pa.array(np.zeros(T, np.float32)),
            "action": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(T * 3, np.float32)), 3),
            "timestamp": pa.array((np.arange(T) / 10).astype(np.float32)),
            "frame_index": pa.array(np.arange(T)),
            "episode_index": pa.array(np.full(T, n)),
            "index": pa.array(np.arange(start, start + T)),
            "task_index": pa.array(np.zeros(T, np.int64)),
        }
    )
    pq.write_table(new_rows, root / "data/chunk-000/file-001.parquet")
    st = {"observation.state": vector_stats(state), "observation.gripper": vector_stats(np.zeros(T)), "action": vector_stats(np.ones((T, 3))),
          "timestamp": vector_stats(np.arange(T) / 10), "frame_index": vector_stats(np.arange(T)), "episode_index": vector_stats(np.full(T, n)),
          "index": vector_stats(np.arange(start, start + T)), "task_index": vector_stats(np.zeros(T))}
    row = {"episode_index": n, "tasks": [eps[0].task], "length": T, "data/chunk_index": 0, "data/file_index": 1,
           "dataset_from_index": start, "dataset_to_index": start + T, "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 1}
    row.update({f"stats/{f}/{k}": v.tolist() for f, s in st.items() for k, v in s.items()})
    pq.write_table(pa.Table.from_pylist([row]).select(meta.column_names).cast(meta.schema), root / "meta/episodes/chunk-000/file-001.parquet")
    agg = StatsAggregator()
    for r in range(n):
        agg.add({f: {k: np.asarray(meta.column(f"stats/{f}/{k}")[r].as_py()) for k in ("min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99")} for f in st})
    agg.add(st)
    (root / "meta/stats.json").write_text(json.dumps({f: {k: v.tolist() for k, v in s.items()} for f, s in agg.result().items()}))
    info.update(total_episodes=n + 1, total_frames=start + T, splits={"train": f"0:{n + 1}"})
    (root / "meta/info.json").write_text(json.dumps(info))
    assert_v3_layout(root)
    ds = open_dataset(root)
    got = list(ds.episodes())
    for a, b in zip(eps, got):
        assert_same_episode(a, b)  # engine fields kept for the episodes it wrote
    assert got[-1].episode_id == f"episode_{n:06d}" and got[-1].split == "train" and got[-1].task == eps[0].task
    np.testing.assert_array_equal(got[-1].observations["state"], state)
    # lerobot's delete_episodes writes a new dataset without meta/cupid_engine/: defaults, same steps
    shutil.rmtree(root / "meta/cupid_engine")
    assert [e.episode_id for e in open_dataset(root).episodes()] == [f"episode_{i:06d}" for i in range(n + 1)]


def test_stats_definitions(rng):
    x = rng.standard_normal((9, 4))
    s = vector_stats(x)
    np.testing.assert_array_equal(s["q50"], np.sort(x, 0)[4])  # x_(ceil(0.5 * 9)) = 5th smallest
    np.testing.assert_array_equal(s["q10"], np.sort(x, 0)[0])  # ceil(0.9) = 1st
    np.testing.assert_array_equal(s["q99"], np.sort(x, 0)[8])
    assert s["count"].tolist() == [9] and s["std"].shape == (4,)
    one = vector_stats(x[:1])
    np.testing.assert_array_equal(one["q01"], x[0])  # a single step: quantiles are the mean
    frames = rng.integers(0, 256, (3, 4, 2, 3), dtype=np.uint8)
    im = image_stats(frames)
    assert im["mean"].shape == (3, 1, 1) and im["count"].tolist() == [3]
    np.testing.assert_allclose(im["mean"][:, 0, 0], frames.reshape(-1, 3).mean(0) / 255)
    big = rng.integers(0, 256, (250, 320, 310, 1), dtype=np.uint8)
    assert image_stats(big)["count"].tolist() == [100]  # lerobot samples max(100, T^0.75) frames


@pytest.mark.parametrize("n", [2, 3, 7, 10, 30, 99, 100, 101, 257])
def test_quantiles_are_numpys_inverted_cdf(rng, n):
    x = rng.standard_normal((n, 3))
    s = vector_stats(x)
    for key, q in (("q01", 0.01), ("q10", 0.10), ("q50", 0.50), ("q90", 0.90), ("q99", 0.99)):
        np.testing.assert_array_equal(s[key], np.quantile(x, q, axis=0, method="inverted_cdf"))


def test_stats_of_several_features_at_once_equal_one_by_one(rng):
    from cupid_engine.data.lerobot_meta import vector_stats_many

    feats = {"a": rng.standard_normal((6, 4)), "b": rng.standard_normal(6).astype(np.float32), "c": np.arange(6)}
    many = vector_stats_many(feats)
    for name, values in feats.items():
        one = vector_stats(values)
        assert many[name].keys() == one.keys()
        for k in one:
            np.testing.assert_array_equal(many[name][k], one[k], err_msg=f"{name} {k}")
