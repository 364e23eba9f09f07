"""Shared helpers for datamodel tests (a unique module name: tests dirs are not packages)."""

from __future__ import annotations

import numpy as np

from cupid_engine.data.episode import Episode


def make_episodes(n: int = 6, length: int = 12, obs_dim: int = 3, action_dim: int = 2, seed: int = 0,
                  prefix: str = "ep") -> list[Episode]:
    """Episodes whose action is a smooth function of the state plus noise (learnable)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(obs_dim, action_dim))
    out = []
    for i in range(n):
        start = rng.normal(size=obs_dim)
        vel = rng.normal(scale=0.2, size=obs_dim)
        pos = start + np.arange(length)[:, None] * vel
        act = np.tanh(pos @ w) + rng.normal(scale=0.3, size=(length, action_dim))
        out.append(Episode(episode_id=f"{prefix}{i:03d}", observations={"pos": pos.astype(np.float32)},
                           actions=act.astype(np.float32)))
    return out
