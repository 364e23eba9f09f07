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


class SlowPlanted:
    """Synthetic subset function (picklable, importable by a subprocess): metric = Σ effects
    of kept clusters; sleeps per call so a test can kill a run midway; appends one line per
    call to ``log_path`` so trainings can be counted across processes."""

    def __init__(self, effects, log_path, delay: float = 0.0) -> None:
        self.effects = np.asarray(effects, dtype=np.float64)
        self.log_path = str(log_path)
        self.delay = delay

    def fingerprint(self) -> str:
        return "slow-planted-" + str(len(self.effects))

    def __call__(self, mask):
        import time

        time.sleep(self.delay)
        with open(self.log_path, "a") as f:
            f.write("1\n")
        return float(np.asarray(mask, dtype=np.float64) @ self.effects)
