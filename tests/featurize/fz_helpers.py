"""Helpers shared by the featuriser tests."""

from __future__ import annotations

import numpy as np

from cupid_engine.data.episode import Episode


def make_episodes(n: int = 6, length: int = 9, obs_dim: int = 5, action_dim: int = 3, seed: int = 0,
                  holdout_every: int = 3) -> list[Episode]:
    """Smooth random-walk episodes; every ``holdout_every``-th is in split ``holdout``."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(obs_dim, action_dim)).astype(np.float32)
    out = []
    for i in range(n):
        T = length + (i % 3)  # odd, unequal lengths
        pos = np.cumsum(rng.normal(scale=0.2, size=(T, obs_dim)), axis=0).astype(np.float32)
        act = (np.tanh(pos @ w) + rng.normal(scale=0.05, size=(T, action_dim))).astype(np.float32)
        split = "holdout" if holdout_every and i % holdout_every == holdout_every - 1 else "train"
        out.append(Episode(episode_id=f"ep{i:03d}", observations={"pos": pos}, actions=act, split=split))
    return out
