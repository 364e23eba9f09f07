"""CUPID: brute-force equality, block independence, and an exact ridge-regression influence."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from cupid_engine.scorers import get_scorer, score
from cupid_engine.scorers.cupid import cupid_scores, rollout_direction
from cupid_engine.scorers.preconditioner import Preconditioner


def _ids(store, split):
    cat = store.catalog()
    return [e for e, s in zip(cat["episode_id"].to_pylist(), cat["split"].to_pylist()) if s == split]


@pytest.mark.parametrize("baseline", ["none", "mean"])
@pytest.mark.parametrize("normalization", ["sum", "mean"])
@pytest.mark.parametrize("returns", ["pm1", "01", "real"])
def test_cupid_equals_brute_force_double_sum(store, normalization, returns, baseline):
    run = store.run("base")
    pre = Preconditioner.from_run(run)
    h_inv = np.linalg.inv(pre.hessian.numpy())
    cat = {r["episode_id"]: r for r in store.catalog().to_pylist()}
    rollouts, demos = _ids(store, "rollout"), _ids(store, "train")

    def ret(e):
        if returns == "real":
            return cat[e]["return"]
        return (1.0 if cat[e]["success"] else -1.0) if returns == "pm1" else float(cat[e]["success"])

    b = float(np.mean([ret(t) for t in rollouts])) if baseline == "mean" else 0.0
    assert len({ret(t) for t in rollouts}) > 1  # the fixture's rollouts have both outcomes
    want = []
    for d in demos:
        xd = run.step_features(d).astype(np.float64)
        total = 0.0
        for t in rollouts:
            xt = run.step_features(t).astype(np.float64)
            pair = sum(float(zp @ h_inv @ z) for zp in xt for z in xd)  # Σ_z' Σ_z a(z', z)
            if normalization == "mean":
                pair /= len(xt) * len(xd)
            total += (ret(t) - b) * pair
        want.append(total / len(rollouts))
    table = score("cupid", store=store, run="base", normalization=normalization, returns=returns, baseline=baseline)
    assert table["episode_id"].to_pylist() == demos
    np.testing.assert_allclose(table["score"].to_numpy(), want, rtol=1e-9, atol=1e-12)


def test_cupid_independent_of_block_size_and_order(store):
    a = get_scorer("cupid")(block=1).score(store, "base")
    b = get_scorer("cupid")(block=1000).score(store, "base")
    # Equal up to float64 rounding of the batched triangular solve (no batch-dependent math).
    np.testing.assert_allclose(a["score"].to_numpy(), b["score"].to_numpy(), rtol=1e-12, atol=1e-13)
    demos = a["episode_id"].to_pylist()
    c = score("cupid", store=store, run="base", episodes=",".join(reversed(demos)))
    by_id = dict(zip(c["episode_id"].to_pylist(), c["score"].to_numpy()))
    np.testing.assert_allclose([by_id[e] for e in demos], a["score"].to_numpy(), rtol=1e-12, atol=1e-13)


def _ridge_problem(seed=0, n=400, p=24, n_demo=30, n_roll=8, lam=0.05):
    """A linear policy θ fit by ridge; demos/rollouts are groups of (x, y) samples."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p))
    y = x @ rng.standard_normal(p) + 0.5 * rng.standard_normal(n)
    h = x.T @ x / n + lam * np.eye(p)  # exact Hessian of mean ½(xᵀθ−y)² + ½λ|θ|²
    theta = np.linalg.solve(h, x.T @ y / n)
    demo_rows = np.array_split(np.arange(n), n_demo)  # demos partition the training set
    xr = rng.standard_normal((60, p))
    yr = xr @ theta + rng.standard_normal(60)
    roll_rows = np.array_split(np.arange(60), n_roll)
    r_tau = np.where(np.arange(n_roll) % 2 == 0, 1.0, -1.0)
    grad = lambda xx, yy: xx * (xx @ theta - yy)[:, None]  # per-sample g = x(xᵀθ − y)
    return x, y, h, theta, lam, demo_rows, grad(x, y), roll_rows, grad(xr, yr), r_tau, xr, yr


def test_ridge_regression_influence_is_exact_and_survives_projection():
    x, y, h, theta, lam, demo_rows, g, roll_rows, gr, r_tau, xr, yr = _ridge_problem()
    n, p = x.shape
    # Closed form from the normal equations: upweighting demo ξ by ε moves θ by
    # dθ/dε = −H⁻¹Σ_{z∈ξ} g(z), so the rollout performance J = Σ_τ R(τ)·(−Σ ℓ(z'))/m moves by
    # dJ/dε = (1/m) Σ_τ R(τ) Σ_{z'} g(z')ᵀ H⁻¹ Σ_z g(z).
    u = np.mean([r * gr[rows].sum(0) for r, rows in zip(r_tau, roll_rows)], axis=0)
    closed = np.array([u @ np.linalg.solve(h, g[rows].sum(0)) for rows in demo_rows])

    # A finite-difference refit confirms the closed form is the real derivative.
    def perf(eps, rows):
        w = np.ones(n)
        w[rows] += eps
        th = np.linalg.solve((x * w[:, None]).T @ x / n + lam * np.eye(p), (x * w[:, None]).T @ y / n)
        return np.mean([r * -0.5 * ((xr[rr] @ th - yr[rr]) ** 2).sum() for r, rr in zip(r_tau, roll_rows)])

    eps = 1e-4
    fd = np.array([(perf(eps, rows) - perf(-eps, rows)) / (2 * eps) for rows in demo_rows[:5]])
    np.testing.assert_allclose(fd * n, closed[:5], rtol=1e-5)  # the weight enters the loss as w/n

    def engine(feat_demo, feat_roll, gram, count, ridge_abs):
        k = gram.shape[0]
        pre = Preconditioner(gram, count, damping=ridge_abs * k / np.trace(gram / count))
        sums_d = np.stack([feat_demo[rows].sum(0) for rows in demo_rows])
        sums_r = np.stack([feat_roll[rows].sum(0) for rows in roll_rows])
        return cupid_scores(pre.whiten(sums_d), rollout_direction(pre.whiten(sums_r), r_tau))

    # Unprojected: Gauss-Newton Gram of the output gradients (x) is the exact Hessian.
    exact = engine(g, gr, x.T @ x, n, lam)
    np.testing.assert_allclose(exact, closed, rtol=1e-6, atol=1e-9 * np.abs(closed).max())

    # k = 4096 seeded Gaussian JL projection of every gradient.
    k = 4096
    proj = np.random.default_rng(7).standard_normal((k, p)) / np.sqrt(k)
    px = x @ proj.T
    projected = engine(g @ proj.T, gr @ proj.T, px.T @ px, n, lam)
    assert spearmanr(projected, closed).statistic >= 0.95


def test_checkpoint_ensemble_is_mean_of_runs(rng):
    from cupid_engine.scorers.arrays import ArrayStore

    ids = [f"d{i}" for i in range(6)] + ["r0", "r1"]
    splits = {e: "rollout" if e.startswith("r") else "train" for e in ids}
    runs = [{e: rng.standard_normal((2 + i % 3, 4)) for i, e in enumerate(ids)} for _ in range(2)]
    st = ArrayStore.from_episodes(runs, splits, success={"r0": True, "r1": False}, dtype=np.float64)
    a, b = (score("cupid", store=st, run=n)["score"].to_numpy() for n in ("ckpt0", "ckpt1"))
    ens = score("cupid", store=st, run="ckpt0", checkpoints=["ckpt0", "ckpt1"])
    np.testing.assert_allclose(ens["score"].to_numpy(), (a + b) / 2, rtol=1e-12)
    # The command line's `--set checkpoints=ckpt0,ckpt1` arrives as one string: the same runs,
    # not its characters.
    from_cli = score("cupid", store=st, run="ckpt0", checkpoints="ckpt0, ckpt1")
    np.testing.assert_array_equal(from_cli["score"].to_numpy(), ens["score"].to_numpy())
    with pytest.raises(ValueError, match="checkpoints must be names"):
        score("cupid", store=st, run="ckpt0", checkpoints=["ckpt0", 3])


def test_mean_baseline_with_one_outcome_uses_zero_and_says_so(store, caplog):
    cat = store.catalog()
    rollouts = [e for e, sp, ok in zip(cat["episode_id"].to_pylist(), cat["split"].to_pylist(),
                                       cat["success"].to_pylist()) if sp == "rollout" and not ok]
    assert rollouts
    ids = ",".join(rollouts)  # failures only: R − R̄ would be zero everywhere
    with caplog.at_level("WARNING", logger="cupid_engine.scorers.cupid"):
        centred = score("cupid", store=store, run="base", rollouts=ids, baseline="mean")
    assert "baseline_used=0" in caplog.text
    paper = score("cupid", store=store, run="base", rollouts=ids, baseline="none")
    np.testing.assert_array_equal(centred["score"].to_numpy(), paper["score"].to_numpy())
    assert np.abs(paper["score"].to_numpy()).max() > 0


def test_mean_baseline_is_a_combination_of_two_paper_scores(store):
    """Linearity, a check independent of the code path: with ±1 returns, (1/m) Σ_τ s_τ =
    2·Ψ₀₁ − Ψ±₁, so Ψ_mean = Ψ±₁ − R̄ (2·Ψ₀₁ − Ψ±₁) (all with b = 0)."""
    cat = {r["episode_id"]: r for r in store.catalog().to_pylist()}
    rbar = float(np.mean([1.0 if cat[e]["success"] else -1.0 for e in _ids(store, "rollout")]))
    pm1 = score("cupid", store=store, run="base", baseline="none")["score"].to_numpy()
    z01 = score("cupid", store=store, run="base", baseline="none", returns="01")["score"].to_numpy()
    mean = score("cupid", store=store, run="base", baseline="mean")["score"].to_numpy()
    np.testing.assert_allclose(mean, pm1 - rbar * (2 * z01 - pm1), rtol=1e-9, atol=1e-12)


def _paired_store(rng, *, k=6, n_states=4, draws=3, shared_scale=50.0):
    """Rollouts in groups of ``draws`` per initial state (equal ``episode_seed``): each
    rollout's steps carry a large component shared by its group plus its own part."""
    steps, splits, success, meta = {}, {}, {}, {}
    for i in range(10):
        steps[f"demo_{i}"] = rng.standard_normal((3 + i % 4, k))
        splits[f"demo_{i}"] = "train"
    steps["demo_big"], splits["demo_big"] = rng.standard_normal((4 * k, k)), "train"
    for g in range(n_states):
        shared = shared_scale * rng.standard_normal(k)
        for d in range(draws):
            e = f"roll_{g}_{d}"
            own = rng.standard_normal((5, k))
            steps[e], splits[e] = own + shared / 5, "rollout"
            success[e] = bool((g + d) % 2)
            meta[e] = {"episode_seed": 1000 + g, "policy_draw": d}
    return steps, splits, success, meta


def test_initial_state_baseline_is_leave_one_out_and_cancels_what_a_start_shares(rng):
    from cupid_engine.scorers.arrays import ArrayStore
    from cupid_engine.scorers.cupid import centred_returns

    r = np.array([1.0, -1.0, -1.0, 1.0, 1.0, 1.0, -1.0])
    g = np.array([0, 0, 0, 1, 1, 2, 2])
    want = [1 - (-2) / 2, -1 - 0 / 2, -1 - 0 / 2, 0.0, 0.0, 1 - (-1), -1 - 1]
    np.testing.assert_array_equal(centred_returns(r, "initial-state", groups=g), want)
    with pytest.raises(ValueError, match=">= 2 rollouts per initial state"):
        centred_returns(r, "initial-state", groups=np.arange(7))
    with pytest.raises(ValueError, match="no contrast"):
        centred_returns(np.ones(4), "initial-state", groups=np.array([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="groups="):
        centred_returns(r, "initial-state")

    steps, splits, success, meta = _paired_store(rng)
    st = ArrayStore.from_episodes(steps, splits, success=success, metadata=meta, dtype=np.float64)
    paired = score("cupid", store=st, run="base", baseline="initial-state")["score"].to_numpy()
    # Brute force from the definition: whitened sums, leave-one-out group means of ±1 returns.
    run, pre = st.run("base"), Preconditioner.from_run(st.run("base"))
    rollouts, demos = _ids(st, "rollout"), _ids(st, "train")
    ret = {e: 1.0 if success[e] else -1.0 for e in rollouts}
    u = np.zeros(pre.hessian.shape[0])
    for e in rollouts:
        mates = [f for f in rollouts if meta[f]["episode_seed"] == meta[e]["episode_seed"] and f != e]
        b = np.mean([ret[f] for f in mates])
        u += (ret[e] - b) * pre.whiten(run.step_features(e).sum(0, keepdims=True)).numpy()[0]
    u /= len(rollouts)
    want = [float(pre.whiten(run.step_features(d).sum(0, keepdims=True)).numpy()[0] @ u) for d in demos]
    np.testing.assert_allclose(paired, want, rtol=1e-9, atol=1e-12)

    # What one start's rollouts share cancels: a different shared part per start changes
    # the mean-baseline score and leaves the initial-state score unchanged.
    moved = dict(steps)
    for grp in range(4):
        shift = 30.0 * rng.standard_normal(steps["demo_0"].shape[1])
        for d in range(3):
            e = f"roll_{grp}_{d}"
            moved[e] = steps[e] + shift / steps[e].shape[0]
    st2 = ArrayStore.from_episodes(moved, splits, success=success, metadata=meta, dtype=np.float64)
    # The preconditioner is built from the demos' (train) rows only, so it is unchanged.
    np.testing.assert_allclose(score("cupid", store=st2, run="base", baseline="initial-state")["score"].to_numpy(),
                               paired, rtol=1e-7, atol=1e-9)
    mean2 = score("cupid", store=st2, run="base", baseline="mean")["score"].to_numpy()
    mean1 = score("cupid", store=st, run="base", baseline="mean")["score"].to_numpy()
    assert np.abs(mean2 - mean1).max() > 1e-3 * np.abs(mean1).max()


def test_initial_state_baseline_names_the_rollout_without_partners(rng):
    from cupid_engine.errors import DataError
    from cupid_engine.scorers.arrays import ArrayStore

    steps, splits, success, meta = _paired_store(rng)
    meta["roll_2_1"] = {"episode_seed": 77, "policy_draw": 0}
    st = ArrayStore.from_episodes(steps, splits, success=success, metadata=meta, dtype=np.float64)
    with pytest.raises(DataError, match="'roll_2_1' is the only rollout from its initial state"):
        score("cupid", store=st, run="base", baseline="initial-state")
    del meta["roll_2_1"]
    st = ArrayStore.from_episodes(steps, splits, success=success, metadata=meta, dtype=np.float64)
    with pytest.raises(DataError, match="'roll_2_1' has no 'episode_seed'"):
        score("cupid-step", store=st, run="base", baseline="initial-state")
