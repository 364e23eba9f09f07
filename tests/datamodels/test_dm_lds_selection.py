"""LDS of exact influence on ridge regression, the LDS runner, selection and co-training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dm_helpers import make_episodes

from cupid_engine.policies import MLPPolicyConfig, TrainConfig, build_samples
from cupid_engine.datamodels.clusters import make_clusters
from cupid_engine.datamodels.lds import linear_datamodeling_score, run_lds
from cupid_engine.datamodels.regression import fraction_masks
from cupid_engine.datamodels.selection import CoTrainSampler, cotrain_policy, select_top, selected_samples
from cupid_engine.scorers.table import make_table


def _ridge(x, y, lam, w=None):
    w = np.ones(len(y)) if w is None else w
    return np.linalg.solve(x.T @ (w[:, None] * x) + lam * np.eye(x.shape[1]), x.T @ (w * y))


def _ridge_problem(seed=0, n=120, d=6, targets=3, lam=1.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=d) + rng.normal(size=n)
    xt = rng.normal(size=(targets, d))
    yt = xt @ rng.normal(size=d)
    return x, y, xt, yt, lam


def _metric(theta, xt, yt):
    # Per-target model output x_tᵀθ, [T]: the measurement function of TRAK's LDS. (A squared
    # error is not additive near its minimum: a well-fit target has zero first-order effects.)
    return xt @ theta


@pytest.mark.parametrize("estimator", ["influence", "loo"])
def test_lds_of_exact_influence_on_ridge(estimator):
    x, y, xt, yt, lam = _ridge_problem()
    n = len(y)
    theta = _ridge(x, y, lam)
    if estimator == "influence":
        # dM_t/dw_i at w = 1: dθ/dw_i = H⁻¹ x_i r_i with H = XᵀX + λI, and dM_t/dθ = x_t.
        h = x.T @ x + lam * np.eye(x.shape[1])
        dtheta = np.linalg.solve(h, (x * (y - x @ theta)[:, None]).T)  # [d, n]
        scores = (xt @ dtheta).T  # [n, T]
    else:
        full = _metric(theta, xt, yt)
        scores = np.stack([full - _metric(_ridge(np.delete(x, i, 0), np.delete(y, i), lam), xt, yt)
                           for i in range(n)])
    masks = fraction_masks(n, 64, fraction=0.5, seed=1)
    measured = np.stack([_metric(_ridge(x[m], y[m], lam), xt, yt) for m in masks])  # closed-form retraining
    res = linear_datamodeling_score(scores, masks, measured, bootstrap=200)
    assert res.per_target.shape == (3,)
    assert res.mean >= 0.95, res.per_target
    assert res.ci_low <= res.mean <= res.ci_high
    # Random scores carry no information.
    rnd = linear_datamodeling_score(np.random.default_rng(0).normal(size=n), masks, measured, bootstrap=0)
    assert abs(rnd.mean) < 0.4


def test_lds_accepts_tables_and_mappings():
    masks = fraction_masks(4, 10, fraction=0.5, seed=0)
    ids = ["a", "b", "c", "d"]
    s = np.array([3.0, -1.0, 0.5, 2.0])
    measured = masks @ s + 0.01 * np.arange(10)
    table = make_table(ids, s, method="datamodel")
    by_table = linear_datamodeling_score(table, masks, measured, ids=ids, bootstrap=0)
    by_map = linear_datamodeling_score(dict(zip(ids, s)), masks, measured, ids=ids, bootstrap=0)
    assert by_table.mean == by_map.mean == pytest.approx(linear_datamodeling_score(s, masks, measured).mean)
    with pytest.raises(ValueError, match="ids"):
        linear_datamodeling_score(table, masks, measured)


def test_run_lds_end_to_end_uses_cache(tmp_path):
    train = make_episodes(n=6, length=6)
    target = make_episodes(n=2, length=6, seed=5, prefix="tg")
    tc = TrainConfig(steps=8, batch_size=8, lr=0.01)
    scores = {e.episode_id: float(i) for i, e in enumerate(train)}
    res = run_lds(scores, MLPPolicyConfig(hidden_sizes=(8,)), train, target, tc, num_subsets=5, cache_dir=tmp_path,
                  bootstrap=20)
    distinct = len(np.unique(res.masks, axis=0))
    assert res.measured.shape == (5, 2) and res.info["trained"] == distinct
    again = run_lds(scores, MLPPolicyConfig(hidden_sizes=(8,)), train, target, tc, num_subsets=5,
                    cache_dir=tmp_path, bootstrap=20)
    assert again.info == {**res.info, "trained": 0, "cached": distinct}
    np.testing.assert_array_equal(again.measured, res.measured)


def test_select_top_and_cotrain_sampler():
    np.testing.assert_array_equal(select_top(np.array([0.1, 3.0, 2.0, 3.0]), 0.5), [1, 3])
    assert len(select_top(np.arange(10.0), 0.01)) == 1
    sampler = CoTrainSampler(10, 1000, 4000, alpha=0.5, seed=0)
    b = sampler.batch(3)
    assert torch.equal(b, sampler.batch(3)) and not torch.equal(b, sampler.batch(4))
    frac = (b < 10).double().mean().item()
    assert abs(frac - 0.5) < 0.03  # target drawn w.p. alpha whatever the set sizes
    assert (CoTrainSampler(10, 1000, 500, alpha=1.0).batch(0) < 10).all()


def test_cotrain_policy_trains_on_union():
    train = build_samples(make_episodes(n=4, length=8))
    target = build_samples(make_episodes(n=2, length=8, seed=3, prefix="tg"))
    clusters = make_clusters(train)
    chosen = select_top(np.array([1.0, -1.0, 0.5, 0.0]), 0.5)
    sel = selected_samples(train, clusters, chosen)
    assert set(np.unique(sel.episode_index.numpy())) == {0, 2}
    policy = cotrain_policy(MLPPolicyConfig(hidden_sizes=(8,)), target, sel,
                            TrainConfig(steps=20, batch_size=8, lr=0.01), alpha=0.5)
    losses = policy.train_info["step_losses"]
    assert len(losses) == 20 and np.mean(losses[-5:]) < np.mean(losses[:5])
