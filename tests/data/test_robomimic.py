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
        f["mask"].create_dataset("okay_operator_3", data=np.array([b"demo_0"]))
        f["mask"].create_dataset("ghost", data=np.array([b"demo_77"]))
    with pytest.raises(FormatError, match="demo_77"):
        RobomimicDataset(path)
    with h5py.File(path, "r+") as f:
        del f["mask/ghost"]
    with pytest.raises(FormatError, match="demo_0 is in filter keys of tiers 'better' and 'okay' .'better_operator_1' and 'okay_operator_3'"):
        RobomimicDataset(path)
    with h5py.File(path, "r+") as f:
        f["mask"].create_dataset("twice", data=np.array([b"demo_1", b"demo_1"]))
    with pytest.raises(FormatError, match="mask/twice lists demo_1 more than once"):
        RobomimicDataset(path)
    with h5py.File(path, "r+") as f:
        del f["mask/twice"]
    with h5py.File(path, "r+") as f:
        del f["mask/okay_operator_3"]
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


def _write_real_mh(path, rng, per_tier=4):
    """Every filter key robomimic's MH files carry, built the way robomimic builds them.

    Tiers ``better``/``okay``/``worse`` with two operators each (``<tier>_operator_<n>``),
    the combined tiers ``okay_better``/``worse_better``/``worse_okay`` (unions), subsets
    ``20_percent``/``50_percent``, global ``train``/``valid``, and ``K_train``/``K_valid``
    for every key ``K``, each drawn independently as ``split_train_val.py`` does.
    """
    tiers = ("better", "okay", "worse")
    n = per_tier * len(tiers)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "PickPlaceCan", "type": 1, "env_kwargs": {}})
        for i in range(n):
            T = int(rng.integers(2, 6))
            g = data.create_group(f"demo_{i}")
            g.attrs["num_samples"] = T
            g.create_dataset("obs/object", data=rng.standard_normal((T, 14)))
            g.create_dataset("actions", data=rng.uniform(-1, 1, (T, 7)))
            g.create_dataset("rewards", data=np.r_[np.zeros(T - 1), 1.0])
            g.create_dataset("dones", data=np.r_[np.zeros(T - 1, np.int64), 1])
        masks = {}
        order = rng.permutation(n)  # demos of a tier are not contiguous in real files
        for t, tier in enumerate(tiers):
            members = sorted(int(d) for d in order[t * per_tier : (t + 1) * per_tier])
            masks[tier] = members
            half = per_tier // 2
            masks[f"{tier}_operator_1"], masks[f"{tier}_operator_2"] = members[:half], members[half:]
        masks["okay_better"] = sorted(masks["okay"] + masks["better"])
        masks["worse_better"] = sorted(masks["worse"] + masks["better"])
        masks["worse_okay"] = sorted(masks["worse"] + masks["okay"])
        masks["20_percent"] = sorted(int(d) for d in rng.choice(n, max(1, n // 5), replace=False))
        masks["50_percent"] = sorted(int(d) for d in rng.choice(n, n // 2, replace=False))
        valid = sorted(int(d) for d in rng.choice(n, max(1, n // 10), replace=False))
        masks["train"], masks["valid"] = [d for d in range(n) if d not in valid], valid
        for key in [k for k in masks if k not in ("train", "valid")]:
            members = list(masks[key])
            val = sorted(int(d) for d in rng.choice(members, max(1, len(members) // 10), replace=False))
            masks[f"{key}_train"], masks[f"{key}_valid"] = [d for d in members if d not in val], val
        m = f.create_group("mask")
        for key, members in masks.items():
            # robomimic stores the names in no particular order; shuffle to prove we do not rely on it
            names = [f"demo_{d}" for d in rng.permutation(members)]
            m.create_dataset(key, data=np.array([x.encode() for x in names], dtype="S"))
    return masks


def _get_demos_for_filter_key(path, key):
    """robomimic.utils.file_utils.get_demos_for_filter_key, restated: the names in mask/<key>."""
    with h5py.File(path, "r") as f:
        return [elem.decode("utf-8") for elem in np.array(f[f"mask/{key}"][:])]


def test_reads_every_mh_filter_key_layout(tmp_path, rng):
    path = tmp_path / "can_mh.hdf5"
    masks = _write_real_mh(path, rng)
    ds = RobomimicDataset(path)  # combined keys beside tier keys used to be refused
    cat = ds.catalog().to_pylist()
    tier_of = {f"demo_{d}": t for t in ("better", "okay", "worse") for d in masks[t]}
    assert [r["tier"] for r in cat] == [tier_of[r["episode_id"]] for r in cat]
    valid = {f"demo_{d}" for d in masks["valid"]}
    assert [r["split"] for r in cat] == ["holdout" if r["episode_id"] in valid else "train" for r in cat]
    meta = {r["episode_id"]: json.loads(r["metadata"]) for r in cat}
    for d in range(len(cat)):
        keys = sorted(k for k, members in masks.items() if d in members)
        assert meta[f"demo_{d}"]["filter_keys"] == keys
        op = next(f"{tier_of[f'demo_{d}']}_operator_{i}" for i in (1, 2) if d in masks[f"{tier_of[f'demo_{d}']}_operator_{i}"])
        assert meta[f"demo_{d}"]["operator"] == op
    for key in masks:
        sel = RobomimicDataset(path, filter_key=key)
        want = _get_demos_for_filter_key(path, key)
        got = [e.episode_id for e in sel.episodes()]
        assert sorted(got) == sorted(want) and len(got) == len(want), key
        assert got == sorted(got, key=lambda x: int(x[5:])), key  # robomimic's demo order
        # tiers come from the whole file, whatever is selected
        assert sel.catalog().column("tier").to_pylist() == [tier_of[e] for e in got], key
    better = RobomimicDataset(path, filter_key="better").catalog()
    better_valid = {f"demo_{d}" for d in masks["better_valid"]}
    assert better.column("split").to_pylist() == [
        "holdout" if e in better_valid else "train" for e in better.column("episode_id").to_pylist()
    ]
    assert set(RobomimicDataset(path, filter_key="okay_better_valid").catalog().column("split").to_pylist()) == {"holdout"}
    assert set(RobomimicDataset(path, filter_key="worse_okay_train").catalog().column("split").to_pylist()) == {"train"}
    untiered = RobomimicDataset(path, tier_prefixes=())
    assert set(untiered.catalog().column("tier").to_pylist()) == {None}


def test_classify_filter_key():
    from cupid_engine.data.robomimic import classify_filter_key

    tiers = ("better", "okay", "worse")
    assert classify_filter_key("valid", tiers) == ("split", None, "valid")
    assert classify_filter_key("okay_valid", tiers) == ("tier", "okay", "okay")
    assert classify_filter_key("worse_operator_2_train", tiers) == ("operator", "worse", "worse_operator_2")
    assert classify_filter_key("worse_better", tiers) == ("combined", None, "worse_better")
    assert classify_filter_key("okay_okay", tiers) == ("other", None, "okay_okay")
    assert classify_filter_key("50_percent_train", tiers) == ("other", None, "50_percent")
    assert classify_filter_key("expert_operator_1", tiers) == ("other", None, "expert_operator_1")
