"""Synthetic in-memory stores for scorer tests: ragged episodes, every split."""

from __future__ import annotations

import numpy as np
import pytest

from cupid_engine.scorers.arrays import ArrayStore


def make_store(rng: np.random.Generator, *, k: int = 8, n_train: int = 9, n_holdout: int = 3, n_rollout: int = 5,
               n_target: int = 2, lengths: tuple[int, ...] = (1, 2, 3, 5, 7), path: str | None = None,
               dtype=np.float64) -> ArrayStore:
    """Episodes with odd/ragged lengths (including length 1) in every split."""
    steps, splits, success, returns, tiers = {}, {}, {}, {}, {}
    plan = [("train", n_train), ("holdout", n_holdout), ("rollout", n_rollout), ("target", n_target)]
    j = 0
    for split, count in plan:
        for i in range(count):
            eid = f"{split}_{i:03d}"
            steps[eid] = rng.standard_normal((lengths[j % len(lengths)], k))
            splits[eid] = split
            success[eid] = bool(i % 2 == 0)
            returns[eid] = float(rng.uniform(-1, 2))
            tiers[eid] = ("better", "okay", "worse")[i % 3]
            j += 1
    # Enough training rows that the Gram is full rank even without damping.
    steps["train_big"] = rng.standard_normal((3 * k, k))
    splits["train_big"], success["train_big"], returns["train_big"], tiers["train_big"] = "train", True, 0.0, "okay"
    return ArrayStore.from_episodes(steps, splits, success=success, returns=returns, tiers=tiers, path=path,
                                   dtype=dtype)


@pytest.fixture
def store(rng: np.random.Generator) -> ArrayStore:
    return make_store(rng)


@pytest.fixture
def store_factory():
    """``make_store`` as a fixture, for tests that need non-default shapes."""
    return make_store
