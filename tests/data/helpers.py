"""Helpers for the data tests: small seeded episodes and exact comparison."""

from __future__ import annotations

import numpy as np

from cupid_engine.data import Episode


def make_episodes(
    rng: np.random.Generator,
    n: int,
    *,
    obs_dims: dict[str, int] | None = None,
    action_dim: int = 3,
    prefix: str = "ep",
    splits: tuple[str, ...] = ("train", "holdout"),
    tiers: tuple[str | None, ...] = ("better", "okay", "worse", None),
) -> list[Episode]:
    """``n`` episodes of odd lengths with every episode-level field filled in."""
    obs_dims = {"state": 5, "gripper": 1} if obs_dims is None else obs_dims
    out = []
    for i in range(n):
        T = int(rng.integers(2, 9))
        success = bool(i % 3 != 2)
        out.append(
            Episode(
                episode_id=f"{prefix}_{i:03d}",
                observations={k: rng.standard_normal((T, d)).astype(np.float32) for k, d in obs_dims.items()},
                actions=rng.standard_normal((T, action_dim)).astype(np.float32),
                split=splits[i % len(splits)],
                source="unit",
                task="lift" if i % 2 else "stack",
                success=success,
                return_=1.0 if success else 0.0,
                tier=tiers[i % len(tiers)],
                metadata={"i": i, "noise": 0.5 * i},
            )
        )
    return out


def assert_same_episode(a: Episode, b: Episode, *, fields=("episode_id", "split", "source", "task", "success", "return_", "tier", "metadata")) -> None:
    """Exact equality of arrays and of the named scalar fields."""
    for f in fields:
        assert getattr(a, f) == getattr(b, f), (a.episode_id, f, getattr(a, f), getattr(b, f))
    assert sorted(a.observations) == sorted(b.observations), a.episode_id
    for k in a.observations:
        assert a.observations[k].dtype == b.observations[k].dtype == np.float32
        np.testing.assert_array_equal(a.observations[k], b.observations[k], err_msg=f"{a.episode_id} {k}")
    np.testing.assert_array_equal(a.actions, b.actions, err_msg=a.episode_id)


