"""A real tiny run for the explorer: an image dataset, an MLP, a gradient store, scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cupid_engine.data import write_dataset
from cupid_engine.data.episode import Episode


def _frames(rng: np.random.Generator, T: int, hue: int) -> np.ndarray:
    """A coloured square moving over a grey background: never blank, different per step."""
    img = np.full((T, 20, 24, 3), 90, np.uint8)
    for t in range(T):
        y, x = 2 + (t % 12), 2 + (3 * t) % 16
        img[t, y : y + 6, x : x + 6] = (hue, 255 - hue, (37 * t) % 256)
    img += rng.integers(0, 8, size=img.shape, dtype=np.uint8)
    return img


def make_episodes(seed: int = 0, n_train: int = 12, n_rollout: int = 4) -> tuple[list[Episode], list[Episode]]:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(4, 2)).astype(np.float32)
    demos, rollouts = [], []
    for i in range(n_train + n_rollout):
        T = 7 + (i % 4)
        obs = np.cumsum(rng.normal(scale=0.3, size=(T, 4)), axis=0).astype(np.float32)
        act = (np.tanh(obs @ w) + rng.normal(scale=0.05, size=(T, 2))).astype(np.float32)
        if i < n_train:
            strategy = "majority" if i % 3 else "minority"
            demos.append(Episode(episode_id=f"demo_{i:02d}", observations={"state": obs}, actions=act, split="train",
                                 tier=("better", "okay", "worse")[i % 3], metadata={"strategy": strategy},
                                 images={"agentview": _frames(rng, T, 40 * (i % 6))}))
        else:
            j = i - n_train
            rollouts.append(Episode(episode_id=f"roll_{j:02d}", observations={"state": obs}, actions=act,
                                    split="rollout", success=bool(j % 2), return_=float(j % 2),
                                    images={"agentview": _frames(rng, T, 200)}))
    return demos, rollouts


@pytest.fixture(scope="session")
def explorer_run(tmp_path_factory):
    """Paths of a real featurised run: datasets, store, score tables."""
    import cupid_engine as ce
    from cupid_engine.data import open_dataset
    from cupid_engine.featurize import FeaturizeConfig, ProjectionConfig, featurize
    from cupid_engine.policies import MLPPolicy, MLPPolicyConfig
    from cupid_engine.scorers import write_table
    from cupid_engine.store import GradientStore

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("explorer_run")
    demos, rollouts = make_episodes()
    write_dataset(root / "demos", demos)
    write_dataset(root / "rollouts", rollouts)
    policy = MLPPolicy(MLPPolicyConfig.tiny(obs_dim=4, action_dim=2))
    store = GradientStore.create(str(root / "store.zarr"))
    cfg = FeaturizeConfig(output="energy", projection=ProjectionConfig(method="tensorsketch", k=32, seed=0))
    featurize(open_dataset(root / "demos"), store, "base", policy=policy, config=cfg)
    featurize(open_dataset(root / "rollouts"), store, "base", policy=policy, config=cfg)
    scores = {}
    for method in ("cupid", "length", "random"):
        table = ce.score(method, store=str(root / "store.zarr"), run="base")
        scores[method] = root / "scores" / f"{method}.parquet"
        write_table(table, scores[method])
    audit = root / "audit.json"
    audit.write_text(json.dumps({
        "decisions": [{"method": "cupid", "ratio": 0.3, "verdict": "do not claim", "reason": "gate 1 fails"}],
        "comparisons": [{"block": "primary", "rule": "cupid", "comparator": "random", "ratio": 0.3,
                         "stats": {"mean": -0.02, "ci_low": -0.1, "ci_high": 0.05, "n": 3}}],
    }))
    return {"root": root, "store": str(root / "store.zarr"), "data": [root / "demos", root / "rollouts"],
            "scores": scores, "audit": audit, "demos": demos, "rollouts": rollouts}
