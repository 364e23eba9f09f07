"""diffusion_policy zarr replay buffers: round trips, real layout, zip, bad boundaries."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import zarr

from cupid_engine.data import EpisodeError, FormatError
from cupid_engine.data.replay import ReplayBufferDataset, write_replay_buffer

from .helpers import assert_same_episode, make_episodes

_FIELDS = ("episode_id", "split", "source", "task", "success", "return_", "tier", "metadata")


def _defaults(eps, source):
    """What the format keeps: arrays; ids by position, split train, no outcomes."""
    out = []
    for i, e in enumerate(eps):
        out.append(type(e)(f"episode_{i:06d}", e.observations, e.actions, source=source))
    return out


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_round_trip_exact(tmp_path, rng, zarr_format):
    eps = make_episodes(rng, 5)
    path = write_replay_buffer(tmp_path / "pusht.zarr", iter(eps), chunk_rows=4, zarr_format=zarr_format)
    ds = ReplayBufferDataset(path, episodes_per_shard=2)
    assert len(ds) == 5 and ds.obs_keys == ["gripper", "state"] and ds.action_dim == 3
    want = _defaults(eps, "pusht")
    for a, b in zip(want, ds.episodes(), strict=True):
        assert_same_episode(a, b, fields=_FIELDS)
    assert ds.shards() == ["0:2", "2:4", "4:5"]
    assert [e.episode_id for e in ds.iter_shard("2:4")] == ["episode_000002", "episode_000003"]
    assert ds.catalog().column("length").to_pylist() == [e.length for e in eps]
    root = zarr.open_group(str(path), mode="r")
    np.testing.assert_array_equal(root["meta/episode_ends"][:], np.cumsum([e.length for e in eps]))
    assert root["data/state"].shape == (sum(e.length for e in eps), 5)


def test_reads_diffusion_policy_zip_with_images(tmp_path, rng):
    # As diffusion_policy ships PushT: img [N, 96, 96, 3] (here 4x4), state [N, 5], action [N, 2].
    src = tmp_path / "pusht_cchi_v7_replay.zarr"
    root = zarr.open_group(str(src), mode="w", zarr_format=2)
    ends = np.array([3, 7, 12], np.int64)
    n = int(ends[-1])
    img = rng.integers(0, 255, (n, 4, 4, 3)).astype(np.float32)
    state = rng.standard_normal((n, 5)).astype(np.float32)
    action = rng.standard_normal((n, 2))
    root.create_array("data/img", shape=img.shape, chunks=(5, 4, 4, 3), dtype="float32")[:] = img
    root.create_array("data/state", shape=state.shape, chunks=(5, 5), dtype="float32")[:] = state
    root.create_array("data/action", shape=action.shape, chunks=(5, 2), dtype="float64")[:] = action
    root.create_array("meta/episode_ends", shape=(3,), chunks=(3,), dtype="int64")[:] = ends
    zpath = tmp_path / "pusht_cchi_v7_replay.zarr.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in src.rglob("*"):
            if f.is_file():
                zf.write(f, f.relative_to(src).as_posix())
    ds = ReplayBufferDataset(zpath, split="holdout", task="push_t")
    assert ds.obs_keys == ["state"] and ds.action_dim == 2
    got = list(ds.episodes(split="holdout"))
    assert [e.length for e in got] == [3, 4, 5] and {e.source for e in got} == {"pusht_cchi_v7_replay"}
    np.testing.assert_array_equal(got[1].observations["state"], state[3:7])
    np.testing.assert_array_equal(got[2].actions, action[7:12].astype(np.float32))
    assert list(ds.episodes(split="train")) == []
    # img is a camera (float32 holding 0..255 integers, as PushT stores it): exact uint8 frames.
    assert ds.image_keys == ["img"] and ds.image_shapes == {"img": (4, 4, 3)}
    np.testing.assert_array_equal(got[1].image_array("img"), img[3:7].astype(np.uint8))
    with_img = ReplayBufferDataset(src, obs_keys=["img", "state"])
    assert with_img.obs_dims == {"state": 5} and with_img.image_keys == ["img"]
    np.testing.assert_array_equal(next(with_img.episodes()).image_array("img"), img[:3].astype(np.uint8))


@pytest.mark.parametrize("ends, message", [([3, 3, 12], "episode 1 is empty"), ([3, 7, 11], "last end 11 != 12")], ids=["empty", "short"])
def test_bad_episode_ends(tmp_path, rng, ends, message):
    path = tmp_path / "b.zarr"
    root = zarr.open_group(str(path), mode="w")
    root.create_array("data/action", shape=(12, 2), dtype="float32")[:] = rng.standard_normal((12, 2))
    root.create_array("meta/episode_ends", shape=(3,), dtype="int64")[:] = np.array(ends)
    with pytest.raises(FormatError, match=message):
        ReplayBufferDataset(path)
    with pytest.raises(FormatError, match="not a replay buffer"):
        ReplayBufferDataset(tmp_path / "missing.zarr")


def test_writer_rejects_bad_episodes(tmp_path, rng):
    eps = make_episodes(rng, 3)
    eps[2].observations["gripper"][0, 0] = np.nan
    with pytest.raises(EpisodeError, match=r"'ep_002'.*'observation.gripper'"):
        write_replay_buffer(tmp_path / "x.zarr", eps)
    assert not (tmp_path / "x.zarr").exists()


def test_failed_overwrite_keeps_old(tmp_path, rng):
    path = write_replay_buffer(tmp_path / "x.zarr", make_episodes(rng, 2))
    with pytest.raises(FileExistsError):
        write_replay_buffer(path, make_episodes(rng, 1))
    bad = make_episodes(rng, 3)
    bad[1].actions[0, 0] = np.nan
    with pytest.raises(EpisodeError):
        write_replay_buffer(path, bad, overwrite=True)
    assert len(ReplayBufferDataset(path)) == 2 and [p.name for p in tmp_path.iterdir()] == ["x.zarr"]
    write_replay_buffer(path, make_episodes(rng, 3), overwrite=True)
    assert len(ReplayBufferDataset(path)) == 3


def test_reader_names_bad_episode(tmp_path, rng):
    path = write_replay_buffer(tmp_path / "x.zarr", make_episodes(rng, 3))
    arr = zarr.open_array(str(path / "data" / "action"), mode="r+")
    ends = zarr.open_array(str(path / "meta" / "episode_ends"), mode="r")[:]
    arr[int(ends[0]), 1] = np.inf  # first step of episode 1
    with pytest.raises(EpisodeError, match=r"'episode_000001'.*'action'.*step 0, column 1"):
        list(ReplayBufferDataset(path).episodes())
