"""A tiny curation loop on disk, built once per module through the real command line.

Dataset (LeRobot v3): 12 training demos at a fixed horizon of 12 steps, 8 of strategy
``majority`` and 4 of ``minority`` (a metadata label the scorers never read), 2 holdout
demos and 6 rollouts (3 successes) of unequal lengths. A tiny deterministic MLP is trained
on it (`cupid-engine train`) and featurised into a store (`cupid-engine featurize`, default
output) with k = 16 float32 features.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cupid_engine.data.episode import Episode

OBS, ACT = 5, 3


def make_loop_episodes(seed: int = 3) -> list[Episode]:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(OBS, ACT)).astype(np.float32)
    out = []

    def ep(eid, length, split, **kw):
        start, vel = rng.normal(size=OBS), rng.normal(scale=0.1, size=OBS)
        pos = (start + np.arange(length)[:, None] * vel).astype(np.float32)
        act = (np.tanh(pos @ w) + rng.normal(scale=0.05, size=(length, ACT))).astype(np.float32)
        return Episode(episode_id=eid, observations={"pos": pos}, actions=act, split=split, **kw)

    for i in range(12):
        strategy = "majority" if i % 3 else "minority"
        out.append(ep(f"demo_{i:02d}", 12, "train", metadata={"strategy": strategy}))
    for i in range(2):
        out.append(ep(f"hold_{i}", 10 + i, "holdout", metadata={"strategy": "minority"}))
    for i in range(6):
        out.append(ep(f"roll_{i}", 6 + i, "rollout", success=bool(i % 2 == 0), return_=float(i % 2 == 0)))
    return out


@pytest.fixture(scope="session")
def loop(tmp_path_factory):
    """``dict(data=, policy=, store=, dir=)`` of a trained, featurised tiny loop."""
    from cupid_engine.cli import main
    from cupid_engine.data.lerobot import write_dataset

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("loop")
    data = str(write_dataset(root / "data", make_loop_episodes()))
    policy = str(root / "policy")
    assert main(["train", "--data", data, "--policy", "mlp", "--size", "tiny", "--out", policy,
                 "--steps", "30", "--batch-size", "32", "--no-progress"]) == 0
    store = str(root / "store.zarr")
    assert main(["featurize", "--policy", policy, "--data", data, "--store", store, "--run", "base",
                 "--k", "16", "--dtype", "float32", "--no-progress"]) == 0
    return {"data": data, "policy": policy, "store": store, "dir": root}
