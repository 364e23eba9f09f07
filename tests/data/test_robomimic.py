"""robomimic HDF5: round trips, MH filter keys -> splits and tiers, outcomes, bad files."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from cupid_engine.data import EpisodeError, FormatError
from cupid_engine.data.robomimic import RobomimicDataset, write_robomimic

from .helpers import assert_same_episode, make_episodes


def test_round_trip_exact(tmp_path, rng):
    eps = make_episodes(rng, 7)
    path = write_robomimic(tmp_path / "lift.hdf5", iter(eps))
    ds = RobomimicDataset(path, demos_per_shard=3)
    assert len(ds) == 7 and ds.obs_keys == ["gripper", "state"] and ds.action_dim == 3
    got = list(ds.episodes())
    for a, b in zip(eps, got, strict=True):
        assert_same_episode(a, b)
    assert ds.shards() == ["0:3", "3:6", "6:7"]
    assert [e.episode_id for u in ds.shards() for e in ds.iter_shard(u)] == [e.episode_id for e in eps]
    cat = ds.catalog()
    assert cat.column("tier").to_pylist() == [e.tier for e in eps]
    assert cat.column("split").to_pylist() == [e.split for e in eps]
    assert [e.episode_id for e in ds.episodes(split="holdout")] == [e.episode_id for e in eps if e.split == "holdout"]
    assert [e.episode_id for e in ds.episodes(ids=["ep_004"])] == ["ep_004"]
    with h5py.File(path) as f:
        assert sorted(f["mask"].keys()) == ["better", "okay", "train", "valid", "worse"]
        assert f["data/demo_3"].attrs["num_samples"] == eps[3].length


def _write_mh(path, rng, n=10):
    """A robomimic MH-style file written directly with h5py, as robomimic ships it."""
    arrays = {}
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "NutAssemblySquare", "type": 1, "env_kwargs": {}})
        for i in range(n):
            T = int(rng.integers(3, 7))
            g = data.create_group(f"demo_{i}")
            g.attrs["num_samples"] = T
            eef = rng.standard_normal((T, 3))
            quat = rng.standard_normal((T, 4))
            g.create_dataset("obs/robot0_eef_pos", data=eef)
            g.create_dataset("obs/robot0_eef_quat", data=quat.astype(np.float32))
            g.create_dataset("obs/agentview_image", data=np.zeros((T, 4, 4, 3), np.uint8))
            act = rng.uniform(-1, 1, (T, 7))
            g.create_dataset("actions", data=act)
            rewards = np.zeros(T)
            dones = np.zeros(T, np.int64)
            if i != 4:  # demo_4 is a failure
                rewards[-1] = 1.0
                dones[-1] = 1
            g.create_dataset("rewards", data=rewards)
            g.create_dataset("dones", data=dones)
            g.create_dataset("states", data=np.zeros((T, 45)))
            arrays[f"demo_{i}"] = (eef, quat, act)
        m = f.create_group("mask")
        names = lambda idx: np.array([f"demo_{i}".encode() for i in idx if i < n], dtype="S")  # noqa: E731
        m.create_dataset("train", data=names([0, 1, 2, 3, 4, 5, 6, 7]))
        m.create_dataset("valid", data=names([8, 9]))
        m.create_dataset("better_operator_1", data=names([0, 1]))
        m.create_dataset("better_operator_1_train", data=names([0]))
        m.create_dataset("okay", data=names([2, 3, 8]))
        m.create_dataset("worse_operator_2_valid", data=names([9]))
        m.create_dataset("20_percent", data=names([0, 5]))
    return arrays


def test_reads_mh_layout(tmp_path, rng):
    path = tmp_path / "square_mh.hdf5"
    arrays = _write_mh(path, rng)
    ds = RobomimicDataset(path)
    assert ds.obs_keys == ["robot0_eef_pos", "robot0_eef_quat"]  # the image is skipped
    assert ds.action_dim == 7
    cat = ds.catalog().to_pylist()
    assert [r["episode_id"] for r in cat] == [f"demo_{i}" for i in range(10)]
    assert [r["split"] for r in cat] == ["train"] * 8 + ["holdout"] * 2
    assert [r["tier"] for r in cat] == ["better", "better", "okay", "okay", None, None, None, None, "okay", "worse"]
    assert [r["success"] for r in cat] == [i != 4 for i in range(10)]
    assert [r["return"] for r in cat] == [0.0 if i == 4 else 1.0 for i in range(10)]
    assert {r["task"] for r in cat} == {"NutAssemblySquare"} and {r["source"] for r in cat} == {"square_mh"}
    for ep in ds.episodes():
        eef, quat, act = arrays[ep.episode_id]
        np.testing.assert_array_equal(ep.observations["robot0_eef_pos"], eef.astype(np.float32))
        np.testing.assert_array_equal(ep.observations["robot0_eef_quat"], quat.astype(np.float32))
        np.testing.assert_array_equal(ep.actions, act.astype(np.float32))
    only = RobomimicDataset(path, filter_key="20_percent")
    assert [e.episode_id for e in only.episodes()] == ["demo_0", "demo_5"]
    custom = RobomimicDataset(path, split_map={"train": "train", "valid": "validation"}, success="none")
    assert custom.catalog().column("split").to_pylist()[-1] == "validation"
    assert set(custom.catalog().column("success").to_pylist()) == {None}


def test_success_from_reward(tmp_path, rng):
    path = tmp_path / "x.hdf5"
    _write_mh(path, rng, n=6)
    with h5py.File(path, "r+") as f:
        f["data/demo_2/dones"][-1] = 0  # a success whose done flag was not set
    assert RobomimicDataset(path).catalog().column("success").to_pylist()[2] is False
    assert RobomimicDataset(path, success="reward").catalog().column("success").to_pylist()[2] is True


def test_bad_files(tmp_path, rng):
    path = tmp_path / "bad.hdf5"
    _write_mh(path, rng, n=3)
    with h5py.File(path, "r+") as f:
        f["mask"].create_dataset("okay_2", data=np.array([b"demo_0"]))
        f["mask"].create_dataset("ghost", data=np.array([b"demo_77"]))
    with pytest.raises(FormatError, match="demo_77"):
        RobomimicDataset(path)
    with h5py.File(path, "r+") as f:
        del f["mask/ghost"]
    with pytest.raises(FormatError, match="demo_0 is in filter keys of tiers 'better' and 'okay'"):
        RobomimicDataset(path)
    with h5py.File(path, "r+") as f:
        del f["mask/okay_2"]
        f["data/demo_1"].attrs["num_samples"] = 99
    with pytest.raises(FormatError, match="demo_1.*num_samples=99"):
        RobomimicDataset(path).catalog()
    (tmp_path / "junk.hdf5").write_bytes(b"not hdf5")
    with pytest.raises(FormatError, match="junk.hdf5"):
        RobomimicDataset(tmp_path / "junk.hdf5")


def test_writer_rejects_bad_episodes(tmp_path, rng):
    eps = make_episodes(rng, 3)
    eps[2].observations["state"][1, 2] = np.nan
    with pytest.raises(EpisodeError, match=r"'ep_002'.*'observation.state'"):
        write_robomimic(tmp_path / "x.hdf5", eps)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(EpisodeError, match="length 0"):
        write_robomimic(tmp_path / "x.hdf5", [make_episodes(rng, 1)[0].__class__("e", {}, np.zeros((0, 2)))])
    with pytest.raises(KeyError, match="nope"):
        write_robomimic(tmp_path / "x.hdf5", make_episodes(rng, 2), masks={"train": ["nope"]})


def test_reader_names_bad_demo(tmp_path, rng):
    path = tmp_path / "nan.hdf5"
    _write_mh(path, rng, n=3)
    with h5py.File(path, "r+") as f:
        f["data/demo_1/obs/robot0_eef_pos"][2, 1] = np.nan
    stream = RobomimicDataset(path).episodes()
    assert next(stream).episode_id == "demo_0"
    with pytest.raises(EpisodeError, match=r"episode 'demo_1': field 'observation.robot0_eef_pos': non-finite .* step 2, column 1"):
        next(stream)
    with h5py.File(path, "r+") as f:
        del f["data/demo_2/actions"]
        f["data/demo_2"].create_dataset("actions", data=np.zeros((f["data/demo_2"].attrs["num_samples"], 6)))
    with pytest.raises(EpisodeError, match=r"'demo_2'.*'action'.*width 6, expected 7"):
        list(RobomimicDataset(path).episodes(ids=["demo_2"]))
