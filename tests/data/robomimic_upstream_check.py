"""robomimic 0.3.0's own loaders against the engine's robomimic reader (manual check).

Not a pytest module: robomimic 0.3.0 imports torchvision, which does not import beside
the project's torch, so step 2 runs in another environment (docs/lerobot_roundtrip.md, "Other upstream tools")::

    .venv/bin/python tests/data/robomimic_upstream_check.py write OUT_DIR      # MH-layout file + the engine's selections
    OTHER_VENV/bin/python tests/data/robomimic_upstream_check.py robomimic OUT_DIR
"""

from __future__ import annotations

import json
import pathlib
import sys


def write(out: pathlib.Path) -> None:
    import numpy as np

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
    from cupid_engine.data.robomimic import RobomimicDataset
    from tests.data.test_robomimic import _write_real_mh

    out.mkdir(parents=True, exist_ok=True)
    path = out / "can_mh.hdf5"
    path.unlink(missing_ok=True)
    masks = _write_real_mh(path, np.random.default_rng(11), per_tier=10)
    ours = {key: [e for e in RobomimicDataset(path, filter_key=key).catalog().column("episode_id").to_pylist()] for key in masks}
    tiers = RobomimicDataset(path).catalog().select(["episode_id", "tier"]).to_pylist()
    (out / "engine_selection.json").write_text(json.dumps({"filter_keys": ours, "tiers": tiers}))
    print(f"wrote {path} with {len(masks)} filter keys")
    # and a file the engine writes, for robomimic to load
    from cupid_engine.data import write_robomimic
    from tests.data.helpers import make_episodes

    eps = make_episodes(np.random.default_rng(12), 6)
    write_robomimic(out / "engine_written.hdf5", eps, env_args={"env_name": "Lift", "type": 1, "env_kwargs": {}}, overwrite=True)
    arrays = {f"{e.episode_id}/{k}": v for e in eps for k, v in {**e.observations, "actions": e.actions}.items()}
    np.savez(out / "engine_written.npz", **arrays, **{f"{e.episode_id}/split": np.array(e.split) for e in eps})


def robomimic_side(out: pathlib.Path) -> None:
    import h5py
    import numpy as np
    import robomimic
    import robomimic.utils.file_utils as FileUtils
    import robomimic.utils.obs_utils as ObsUtils
    from robomimic.utils.dataset import SequenceDataset

    path = str(out / "can_mh.hdf5")
    ours = json.loads((out / "engine_selection.json").read_text())
    ObsUtils.initialize_obs_utils_with_obs_specs({"obs": {"low_dim": ["object"]}})
    for key, engine_ids in ours["filter_keys"].items():
        upstream = FileUtils.get_demos_for_filter_key(path, key)
        assert sorted(upstream) == sorted(engine_ids) and len(upstream) == len(engine_ids), key
        ds = SequenceDataset(
            hdf5_path=path, obs_keys=("object",), dataset_keys=("actions",), filter_by_attribute=key,
            hdf5_cache_mode=None, hdf5_use_swmr=False, load_next_obs=False,
        )
        assert list(ds.demos) == engine_ids, (key, ds.demos, engine_ids)  # same demos, same order
    # the tiers: every demo of the single-tier keys, as robomimic lists them
    tier_of = {d: t for t in ("better", "okay", "worse") for d in FileUtils.get_demos_for_filter_key(path, t)}
    assert {r["episode_id"]: r["tier"] for r in ours["tiers"]} == tier_of
    ours_path = str(out / "engine_written.hdf5")
    truth = np.load(out / "engine_written.npz")
    ObsUtils.initialize_obs_utils_with_obs_specs({"obs": {"low_dim": ["gripper", "state"]}})
    n = 0
    for key, split in (("train", "train"), ("valid", "holdout")):
        ds = SequenceDataset(hdf5_path=ours_path, obs_keys=("gripper", "state"), dataset_keys=("actions", "rewards", "dones"),
                             filter_by_attribute=key, hdf5_cache_mode=None, hdf5_use_swmr=False, load_next_obs=True)
        for i, demo in enumerate(ds.demos):
            traj = ds.get_trajectory_at_index(i)
            with h5py.File(ours_path, "r") as f:
                eid = f[f"data/{demo}"].attrs["episode_id"]
            assert str(truth[f"{eid}/split"]) == split
            for k in ("gripper", "state"):
                assert (traj["obs"][k] == truth[f"{eid}/{k}"]).all(), (demo, k)
            assert (traj["actions"] == truth[f"{eid}/actions"]).all(), demo
            n += 1
    assert n == len({k.split("/")[0] for k in truth.files})
    print(f"robomimic SequenceDataset loads the engine's file: {n} demos through its train/valid filter keys, observations and actions equal")
    print(f"robomimic {robomimic.__version__}: get_demos_for_filter_key and SequenceDataset(filter_by_attribute=...) "
          f"select exactly the engine's demos, in the same order, for all {len(ours['filter_keys'])} filter keys; tiers agree")


if __name__ == "__main__":
    step, out = sys.argv[1], pathlib.Path(sys.argv[2])
    {"write": write, "robomimic": robomimic_side}[step](out)
