"""Fields a reader leaves out by default are named with their shapes, and logged once."""

from __future__ import annotations

import json
import logging

import h5py
import numpy as np
import zarr

from cupid_engine.data import open_source, write_dataset, write_robomimic
from cupid_engine.data.replay import ReplayBufferDataset

from .helpers import make_episodes


def _replay_with_keypoints(path, rng):
    """A diffusion_policy buffer as its keypoint tasks store it: keypoint [N, 9, 2] beside state."""
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    ends = np.array([4, 9], np.int64)
    n = int(ends[-1])
    kp = rng.standard_normal((n, 9, 2)).astype(np.float32)
    root.create_array("data/keypoint", shape=kp.shape, chunks=(5, 9, 2), dtype="float32")[:] = kp
    root.create_array("data/state", shape=(n, 5), chunks=(5, 5), dtype="float32")[:] = rng.standard_normal((n, 5))
    root.create_array("data/action", shape=(n, 2), chunks=(5, 2), dtype="float32")[:] = rng.standard_normal((n, 2))
    root.create_array("meta/episode_ends", shape=(2,), chunks=(2,), dtype="int64")[:] = ends
    return kp


def test_replay_keypoints_reported_and_selectable(tmp_path, rng, caplog):
    path = tmp_path / "kp.zarr"
    kp = _replay_with_keypoints(path, rng)
    with caplog.at_level(logging.INFO, logger="cupid_engine.data"):
        ds = open_source(path)
        open_source(path)  # listed once, not per open
    assert ds.obs_keys == ["state"]
    assert ds.skipped_fields == {"data/keypoint": "float32 [9, 2] per step (not a vector)"}
    notes = [r.getMessage() for r in caplog.records if "not read" in r.getMessage()]
    assert len(notes) == 1 and "data/keypoint float32 [9, 2]" in notes[0], notes
    chosen = ReplayBufferDataset(path, obs_keys=["state", "keypoint"])
    assert chosen.skipped_fields == {}
    got = list(chosen.episodes())
    np.testing.assert_array_equal(got[1].observations["keypoint"], kp[4:9].reshape(5, 18))


def test_robomimic_depth_maps_reported(tmp_path, rng):
    path = write_robomimic(tmp_path / "lift.hdf5", make_episodes(rng, 2))
    with h5py.File(path, "r+") as f:
        for name in ("demo_0", "demo_1"):
            T = f[f"data/{name}/actions"].shape[0]
            f[f"data/{name}"].create_dataset("obs/agentview_depth", data=np.zeros((T, 4, 4, 1), np.float32))
    ds = open_source(path)
    assert ds.skipped_fields == {"obs/agentview_depth": "float32 [4, 4, 1]"}
    assert ds.obs_keys == ["gripper", "state"]


def test_lerobot_unread_features_reported(tmp_path, rng):
    root = write_dataset(tmp_path / "ds", make_episodes(rng, 2))
    info = json.loads((root / "meta/info.json").read_text())
    info["features"]["next.reward"] = {"dtype": "float32", "shape": [1], "names": None}
    info["features"]["observation.language"] = {"dtype": "string", "shape": [1], "names": None}
    (root / "meta/info.json").write_text(json.dumps(info))
    ds = open_source(root)
    assert ds.skipped_fields == {"next.reward": "float32 [1]", "observation.language": "string [1]"}
    assert open_source(write_dataset(tmp_path / "plain", make_episodes(rng, 2))).skipped_fields == {}
