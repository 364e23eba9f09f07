"""Tiny synthetic episodes for policy tests: a few hundred samples in all."""

from __future__ import annotations

import numpy as np
import pytest

from cupid_engine.data.episode import Episode


def make_episodes(n: int = 8, length: int = 25, obs_dim: int = 5, action_dim: int = 3, seed: int = 0) -> list[Episode]:
    """Episodes whose action is a fixed linear map of the state plus small noise (learnable),
    with one near-constant observation dimension (``quat``)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(obs_dim, action_dim)).astype(np.float32)
    episodes = []
    for i in range(n):
        # A smooth trajectory so that action chunks are predictable from the state.
        start = rng.normal(size=obs_dim)
        vel = rng.normal(scale=0.1, size=obs_dim)
        pos = (start + np.arange(length)[:, None] * vel).astype(np.float32)
        act = np.tanh(pos @ w) + rng.normal(scale=0.01, size=(length, action_dim))
        quat = np.full((length, 1), 0.7071, np.float32) + rng.normal(scale=1e-6, size=(length, 1)).astype(np.float32)
        episodes.append(
            Episode(episode_id=f"ep{i:03d}", observations={"pos": pos, "quat": quat}, actions=act.astype(np.float32))
        )
    return episodes


@pytest.fixture
def episodes() -> list[Episode]:
    return make_episodes()


@pytest.fixture
def episode_factory():
    """``make_episodes`` itself, for tests that need other sizes."""
    return make_episodes
