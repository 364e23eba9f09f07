"""LeRobot v3.0 writer/reader round trips, the real on-disk layout, and v2.1 reading."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cupid_engine.data import EpisodeError, FormatError, open_dataset, write_dataset

from .helpers import assert_same_episode, make_episodes


def test_round_trip_exact(tmp_path, rng):
    eps = make_episodes(rng, 7)
    root = write_dataset(tmp_path / "ds", iter(eps), fps=10, episodes_per_file=3)
    ds = open_dataset(root)
    assert len(ds) == 7
    assert ds.obs_keys == ["gripper", "state"] and ds.action_dim == 3
    got = list(ds.episodes())
    assert [e.episode_id for e in got] == [e.episode_id for e in eps]
    for a, b in zip(eps, got):
        assert_same_episode(a, b)


def test_layout_is_lerobot_v3(tmp_path, rng):
    eps = make_episodes(rng, 7)
    root = write_dataset(tmp_path / "ds", eps, fps=15, episodes_per_file=3)
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0"
    assert info["fps"] == 15 and info["total_episodes"] == 7 and info["chunks_size"] == 1000
    assert info["total_frames"] == sum(e.length for e in eps)
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["features"]["observation.state"] == {"dtype": "float32", "shape": [5], "names": None}
    assert info["features"]["action"]["shape"] == [3]
    files = sorted(p.relative_to(root).as_posix() for p in (root / "data").rglob("*.parquet"))
    assert files == [f"data/chunk-000/file-{i:03d}.parquet" for i in range(3)]
    meta = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet")
    assert meta.column("episode_index").to_pylist() == list(range(7))
    assert meta.column("data/file_index").to_pylist() == [0, 0, 0, 1, 1, 1, 2]
    lengths = np.array([e.length for e in eps])
    np.testing.assert_array_equal(meta.column("dataset_from_index").to_numpy(), np.cumsum(lengths) - lengths)
    np.testing.assert_array_equal(meta.column("dataset_to_index").to_numpy(), np.cumsum(lengths))
    data = pq.read_table(root / "data/chunk-000/file-001.parquet")
    assert data.schema.field("action").type == pa.list_(pa.float32(), 3)
    assert data.column("episode_index").to_pylist() == sum(([i] * eps[i].length for i in (3, 4, 5)), [])
    assert data.column("index").to_pylist()[0] == int(lengths[:3].sum())
    np.testing.assert_allclose(data.column("timestamp").to_numpy()[:2], [0.0, 1 / 15])
    tasks = pq.read_table(root / "meta/tasks.parquet").to_pylist()
    assert {t["task"] for t in tasks} == {"lift", "stack"}


def test_catalog_shards_and_filters(tmp_path, rng):
    eps = make_episodes(rng, 7)
    ds = open_dataset(write_dataset(tmp_path / "ds", eps, episodes_per_file=3))
    cat = ds.catalog()
    assert cat.column_names == ["episode_id", "split", "source", "task", "length", "success", "return", "tier", "metadata"]
    assert cat.column("split").to_pylist() == [e.split for e in eps]
    assert ds.shards() == [f"data/chunk-000/file-{i:03d}.parquet" for i in range(3)]
    per_shard = [[e.episode_id for e in ds.iter_shard(u)] for u in ds.shards()]
    assert per_shard == [["ep_000", "ep_001", "ep_002"], ["ep_003", "ep_004", "ep_005"], ["ep_006"]]
    got = [e.episode_id for e in ds.episodes(ids=["ep_005", "ep_001"])]
    assert got == ["ep_001", "ep_005"]
    hold = list(ds.episodes(split="holdout"))
    assert [e.episode_id for e in hold] == [e.episode_id for e in eps if e.split == "holdout"]
    assert_same_episode(hold[1], next(e for e in eps if e.episode_id == hold[1].episode_id))
    with pytest.raises(KeyError, match="ep_999"):
        list(ds.episodes(ids=["ep_999"]))
    with pytest.raises(KeyError):
        list(ds.iter_shard("../../etc/passwd"))


def test_writer_streams_and_rejects_bad_input(tmp_path, rng):
    eps = make_episodes(rng, 4)
    consumed = []

    def gen():
        for e in eps:
            consumed.append(e.episode_id)
            yield e
        bad = make_episodes(rng, 1, prefix="bad")[0]
        bad.actions[1, 0] = np.nan
        yield bad

    with pytest.raises(EpisodeError, match=r"'bad_000'.*'action'.*non-finite"):
        write_dataset(tmp_path / "ds", gen(), episodes_per_file=2)
    assert consumed == [e.episode_id for e in eps]
    assert not (tmp_path / "ds").exists() and list(tmp_path.iterdir()) == []
    dup = make_episodes(rng, 2) + make_episodes(rng, 1)
    with pytest.raises(EpisodeError, match="duplicate"):
        write_dataset(tmp_path / "ds", dup)
    wide = make_episodes(rng, 1) + make_episodes(rng, 1, prefix="w", action_dim=4)
    with pytest.raises(EpisodeError, match=r"'w_000'.*width 4, expected 3"):
        write_dataset(tmp_path / "ds", wide)
    with pytest.raises(ValueError, match="no episodes"):
        write_dataset(tmp_path / "ds", [])


def test_overwrite_rules(tmp_path, rng):
    root = write_dataset(tmp_path / "ds", make_episodes(rng, 2))
    with pytest.raises(FileExistsError):
        write_dataset(root, make_episodes(rng, 1))
    write_dataset(root, make_episodes(rng, 3, prefix="new"), overwrite=True)
    assert [e.episode_id for e in open_dataset(root).episodes()] == ["new_000", "new_001", "new_002"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a LeRobot dataset"):
        write_dataset(other, make_episodes(rng, 1), overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    # A failed overwrite keeps the old dataset.
    bad = make_episodes(rng, 1, prefix="bad")
    bad[0].observations["state"][0, 0] = np.inf
    with pytest.raises(EpisodeError):
        write_dataset(root, bad, overwrite=True)
    assert len(open_dataset(root)) == 3


def test_corrupt_row_ranges_detected(tmp_path, rng):
    root = write_dataset(tmp_path / "ds", make_episodes(rng, 3))
    meta_path = root / "meta/episodes/chunk-000/file-000.parquet"
    meta = pq.read_table(meta_path)
    # Move the boundary between episodes 0 and 1 by one row, keeping the lengths consistent.
    for name, i in (("dataset_to_index", 0), ("dataset_from_index", 1)):
        values = meta.column(name).to_pylist()
        values[i] += 1
        meta = meta.set_column(meta.schema.get_field_index(name), name, pa.array(values, pa.int64()))
    lengths = meta.column("length").to_pylist()
    lengths[0] += 1
    lengths[1] -= 1
    fixed = meta.set_column(meta.schema.get_field_index("length"), "length", pa.array(lengths, pa.int64()))
    pq.write_table(meta, meta_path)
    with pytest.raises(FormatError, match="has length"):
        open_dataset(root)
    pq.write_table(fixed, meta_path)
    # our per-episode fields no longer line up with the edited ranges
    with pytest.raises(FormatError, match="episode_index 0 has length 6 there but 7 in meta/episodes"):
        open_dataset(root)
    (root / "meta/cupid_engine/episodes.parquet").unlink()
    with pytest.raises(FormatError, match="do not all belong to episode 'episode_000000'"):
        list(open_dataset(root).episodes())


def test_reads_hub_v3_without_our_fields(tmp_path, rng):
    """A v3.0 dataset as lerobot writes it: no episode_id/split/... columns, list<float> steps."""
    eps = make_episodes(rng, 4)
    root = write_dataset(tmp_path / "aloha_sim", eps, episodes_per_file=3)
    meta_path = root / "meta/episodes/chunk-000/file-000.parquet"
    # what lerobot writes: no meta/cupid_engine/ (our episode-level fields)
    shutil.rmtree(root / "meta/cupid_engine")
    for f in (root / "data").rglob("*.parquet"):
        t = pq.read_table(f)
        for name in ("observation.state", "action"):
            i = t.schema.get_field_index(name)
            t = t.set_column(i, name, t.column(name).cast(pa.list_(pa.float32())))
        pq.write_table(t, f)
    ds = open_dataset(root)
    got = list(ds.episodes())
    assert [e.episode_id for e in got] == [f"episode_{i:06d}" for i in range(4)]
    assert {e.split for e in got} == {"train"} and {e.source for e in got} == {"aloha_sim"}
    assert [e.task for e in got] == [e.task for e in eps]
    assert all(e.success is None and e.tier is None and e.metadata == {} for e in got)
    for a, b in zip(eps, got):
        assert_same_episode(a, b, fields=("task",))


# ----------------------------------------------------------------------------- v2.1


def _write_v21(root, rng, lengths, *, splits=None):
    """A LeRobot v2.1 dataset as the lerobot package writes it (pandas-style list columns)."""
    (root / "meta").mkdir(parents=True)
    info = {
        "codebase_version": "v2.1",
        "robot_type": "so100",
        "total_episodes": len(lengths),
        "total_frames": int(sum(lengths)),
        "total_tasks": 2,
        "chunks_size": 2,
        "fps": 30,
        "splits": splits or {"train": f"0:{len(lengths)}"},
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
        "features": {
            "action": {"dtype": "float32", "shape": [6], "names": [f"j{i}" for i in range(6)]},
            "observation.state": {"dtype": "float32", "shape": [6], "names": None},
            "observation.images.top": {"dtype": "video", "shape": [48, 64, 3], "names": ["height", "width", "channel"]},
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
            "episode_index": {"dtype": "int64", "shape": [1], "names": None},
            "index": {"dtype": "int64", "shape": [1], "names": None},
            "task_index": {"dtype": "int64", "shape": [1], "names": None},
        },
    }
    (root / "meta/info.json").write_text(json.dumps(info))
    tasks = ["pick the cube", "place the cube"]
    with open(root / "meta/tasks.jsonl", "w") as f:
        for i, t in enumerate(tasks):
            f.write(json.dumps({"task_index": i, "task": t}) + "\n")
    arrays = []
    start = 0
    with open(root / "meta/episodes.jsonl", "w") as f:
        for idx, T in enumerate(lengths):
            f.write(json.dumps({"episode_index": idx, "tasks": [tasks[idx % 2]], "length": T}) + "\n")
            state = rng.standard_normal((T, 6)).astype(np.float32)
            action = rng.standard_normal((T, 6)).astype(np.float32)
            arrays.append((state, action))
            table = pa.table(
                {
                    "action": pa.array(list(action), pa.list_(pa.float32())),
                    "observation.state": pa.array(list(state), pa.list_(pa.float32())),
                    "timestamp": pa.array(np.arange(T, dtype=np.float32) / 30),
                    "frame_index": pa.array(np.arange(T, dtype=np.int64)),
                    "episode_index": pa.array(np.full(T, idx, np.int64)),
                    "index": pa.array(np.arange(start, start + T, dtype=np.int64)),
                    "task_index": pa.array(np.full(T, idx % 2, np.int64)),
                }
            )
            out = root / f"data/chunk-{idx // 2:03d}/episode_{idx:06d}.parquet"
            out.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, out)
            start += T
    return arrays


def test_reads_lerobot_v21(tmp_path, rng):
    root = tmp_path / "so100_pick"
    arrays = _write_v21(root, rng, [4, 3, 5], splits={"train": "0:2", "test": "2:3"})
    ds = open_dataset(root)
    assert ds.info["codebase_version"] == "v2.1"
    assert ds.obs_keys == ["state"] and ds.action_dim == 6
    assert ds.shards() == [
        "data/chunk-000/episode_000000.parquet",
        "data/chunk-000/episode_000001.parquet",
        "data/chunk-001/episode_000002.parquet",
    ]
    got = list(ds.episodes())
    assert [e.episode_id for e in got] == ["episode_000000", "episode_000001", "episode_000002"]
    assert [e.split for e in got] == ["train", "train", "holdout"]
    assert [e.task for e in got] == ["pick the cube", "place the cube", "pick the cube"]
    assert {e.source for e in got} == {"so100_pick"}
    assert all(e.success is None and e.tier is None for e in got)
    for ep, (state, action) in zip(got, arrays):
        np.testing.assert_array_equal(ep.observations["state"], state)
        np.testing.assert_array_equal(ep.actions, action)
    assert [e.episode_id for e in ds.iter_shard(ds.shards()[2])] == ["episode_000002"]
    assert ds.catalog().column("length").to_pylist() == [4, 3, 5]


def test_v21_unknown_split_needs_mapping(tmp_path, rng):
    _write_v21(tmp_path / "d", rng, [2, 2], splits={"train": "0:1", "dev": "1:2"})
    with pytest.raises(FormatError, match="'dev'.*split_map"):
        open_dataset(tmp_path / "d")
    ds = open_dataset(tmp_path / "d", split_map={"train": "train", "dev": "validation"})
    assert ds.catalog().column("split").to_pylist() == ["train", "validation"]


def test_v21_template_cannot_escape_root(tmp_path, rng):
    root = tmp_path / "d"
    _write_v21(root, rng, [2])
    info = json.loads((root / "meta/info.json").read_text())
    info["data_path"] = "../../{episode_index}.parquet"
    (root / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(FormatError, match="escapes"):
        open_dataset(root)


def test_not_a_dataset(tmp_path):
    with pytest.raises(FormatError, match="info.json"):
        open_dataset(tmp_path)
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta/info.json").write_text(json.dumps({"codebase_version": "v1.6"}))
    with pytest.raises(FormatError, match="v1.6"):
        open_dataset(tmp_path)


def test_reader_streams_file_by_file(tmp_path, rng):
    """Episodes of earlier files arrive before a later, broken file is even opened."""
    eps = make_episodes(rng, 5)
    root = write_dataset(tmp_path / "ds", eps, episodes_per_file=2)
    (root / "data/chunk-000/file-002.parquet").write_bytes(b"not parquet")
    stream = open_dataset(root).episodes()
    assert [next(stream).episode_id for _ in range(4)] == [e.episode_id for e in eps[:4]]
    with pytest.raises(FormatError, match="file-002.parquet"):
        next(stream)


def test_writer_does_not_keep_episodes(tmp_path, rng):
    """The writer copies steps into Arrow buffers and drops the Episode objects."""
    import gc
    import weakref

    refs = []
    alive_when_late = []

    def gen():
        for i in range(12):
            ep = make_episodes(rng, 1, prefix=f"g{i:02d}")[0]
            refs.append(weakref.ref(ep))
            if i == 11:
                gc.collect()
                alive_when_late.append(sum(r() is not None for r in refs[:10]))
            yield ep
            del ep

    write_dataset(tmp_path / "ds", gen(), episodes_per_file=4)
    assert alive_when_late == [0]
    assert len(open_dataset(tmp_path / "ds")) == 12
