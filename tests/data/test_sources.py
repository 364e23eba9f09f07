"""open_source: format detection and one interface over every reader."""

from __future__ import annotations

import json

import fsspec
import pytest

from cupid_engine.data import (
    EpisodeSource,
    FormatError,
    LeRobotDataset,
    ReplayBufferDataset,
    RLDSDataset,
    RobomimicDataset,
    open_source,
    write_dataset,
    write_replay_buffer,
    write_rlds,
    write_robomimic,
)

from .helpers import assert_same_episode, make_episodes

WRITERS = {
    "lerobot": (lambda p, e: write_dataset(p / "ds", e, episodes_per_file=2), LeRobotDataset),
    "robomimic": (lambda p, e: write_robomimic(p / "lift.hdf5", e), RobomimicDataset),
    "rlds": (lambda p, e: write_rlds(p / "rl", e, episodes_per_shard=2), RLDSDataset),
    "replay": (lambda p, e: write_replay_buffer(p / "r.zarr", e), ReplayBufferDataset),
}


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_detects_and_shares_interface(tmp_path, rng, fmt):
    eps = make_episodes(rng, 5, splits=("train",))
    write, cls = WRITERS[fmt]
    path = write(tmp_path, eps)
    src = open_source(path)
    assert isinstance(src, cls) and isinstance(src, EpisodeSource)
    assert len(src) == 5 and src.obs_keys == ["gripper", "state"] and src.action_dim == 3
    cat = src.catalog()
    assert cat.num_rows == 5 and cat.column("length").to_pylist() == [e.length for e in eps]
    streamed = [e for u in src.shards() for e in src.iter_shard(u)]
    assert [e.length for e in streamed] == [e.length for e in eps]
    fields = ("split", "task") if fmt != "replay" else ("split",)
    for a, b in zip(eps, src.episodes(split="train"), strict=True):
        assert_same_episode(a, b, fields=fields)
    first_id = cat.column("episode_id")[0].as_py()
    assert [e.episode_id for e in src.episodes(ids=[first_id])] == [first_id]
    assert open_source(path, format=fmt).catalog().equals(cat)


def test_fsspec_url(tmp_path, rng):
    eps = make_episodes(rng, 3)
    path = write_dataset(tmp_path / "ds", eps)
    src = open_source(f"file://{path}")
    assert [e.episode_id for e in src.episodes()] == [e.episode_id for e in eps]
    # An in-memory filesystem stands in for s3:// and friends.
    mem = fsspec.filesystem("memory")
    for f in path.rglob("*"):
        if f.is_file():
            mem.pipe(f"/cupid/{f.relative_to(path).as_posix()}", f.read_bytes())
    try:
        remote = open_source("memory://cupid")
        for a, b in zip(eps, remote.episodes(), strict=True):
            assert_same_episode(a, b)
    finally:
        mem.rm("/cupid", recursive=True)


def test_unknown_layout(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(FormatError, match="cannot tell the format"):
        open_source(tmp_path)
    with pytest.raises(FileNotFoundError):
        open_source(tmp_path / "missing")
    with pytest.raises(ValueError, match="format must be"):
        open_source(tmp_path, format="csv")
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta/info.json").write_text(json.dumps({"codebase_version": "v3.0"}))
    with pytest.raises(FormatError, match="features"):
        open_source(tmp_path)
