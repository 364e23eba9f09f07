"""CUPID-Step: brute force per-step double sum, exact reduction to CUPID, baseline contract."""

from __future__ import annotations

import numpy as np
import pytest

from cupid_engine.scorers import score
from cupid_engine.scorers.cupid_step import step_direction
from cupid_engine.scorers.preconditioner import Preconditioner


def _ids(store, split):
    cat = store.catalog()
    return [e for e, s in zip(cat["episode_id"].to_pylist(), cat["split"].to_pylist()) if s == split]


@pytest.mark.parametrize("baseline", ["none", "mean"])
def test_no_step_norm_equals_cupid_with_the_same_baseline(store, baseline):
    a = score("cupid", store=store, run="base", baseline=baseline)
    b = score("cupid-step", store=store, run="base", step_norm="none", baseline=baseline)
    assert a["episode_id"].to_pylist() == b["episode_id"].to_pylist()
    np.testing.assert_allclose(b["score"].to_numpy(), a["score"].to_numpy(), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("step_norm", ["rollout", "both"])
@pytest.mark.parametrize("baseline", ["none", "mean"])
def test_equals_brute_force_per_step_sum(store, step_norm, baseline):
    run = store.run("base")
    pre = Preconditioner.from_run(run)
    l_inv = np.linalg.inv(pre.chol.numpy())  # ψ = L⁻¹φ
    cat = {r["episode_id"]: r for r in store.catalog().to_pylist()}
    rollouts, demos = _ids(store, "rollout"), _ids(store, "train")
    r = np.array([1.0 if cat[e]["success"] else -1.0 for e in rollouts])
    w = r - r.mean() if baseline == "mean" else r

    def psi(e):
        return run.step_features(e).astype(np.float64) @ l_inv.T

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    want = []
    for d in demos:
        xd = psi(d) if step_norm == "rollout" else unit(psi(d))
        total = 0.0
        for wt, t in zip(w, rollouts):
            xt = unit(psi(t))
            total += wt * sum(float(zp @ z) for zp in xt for z in xd)
        want.append(total / len(rollouts))
    got = score("cupid-step", store=store, run="base", step_norm=step_norm, baseline=baseline)
    assert got["episode_id"].to_pylist() == demos
    np.testing.assert_allclose(got["score"].to_numpy(), want, rtol=1e-9, atol=1e-12)


def test_step_norm_bounds_each_rollout_step(store_factory, rng):
    """A rollout step scaled ×1e6 (an out-of-distribution blow-up) changes nothing after normalisation."""
    store = store_factory(rng)
    a = score("cupid-step", store=store, run="base")
    rid = _ids(store, "rollout")[0]
    # Same store content, one rollout step blown up: only its direction survives normalisation.
    steps = {e: store.run("base").step_features(e).astype(np.float64) for e in store.catalog()["episode_id"].to_pylist()}
    steps[rid] = steps[rid] * 1e6
    cat = store.catalog().to_pylist()
    from cupid_engine.scorers.arrays import ArrayStore

    big = ArrayStore.from_episodes(
        steps,
        {c["episode_id"]: c["split"] for c in cat},
        success={c["episode_id"]: c["success"] for c in cat},
        returns={c["episode_id"]: c["return"] for c in cat},
        tiers={c["episode_id"]: c["tier"] for c in cat},
        dtype=np.float64,
    )
    b = score("cupid-step", store=big, run="base")
    np.testing.assert_allclose(b["score"].to_numpy(), a["score"].to_numpy(), rtol=1e-9)
    c = score("cupid", store=big, run="base")
    assert not np.allclose(c["score"].to_numpy(), score("cupid", store=store, run="base")["score"].to_numpy())


def test_mean_baseline_needs_both_outcomes():
    sums = np.ones((3, 4))
    with pytest.raises(ValueError, match="different returns"):
        step_direction(__import__("torch").as_tensor(sums), np.ones(3), "mean")
    u = step_direction(__import__("torch").as_tensor(sums), np.array([1.0, -1.0, -1.0]), "mean")
    np.testing.assert_allclose(u.numpy(), 0.0, atol=1e-15)  # identical rollouts: no contrast
