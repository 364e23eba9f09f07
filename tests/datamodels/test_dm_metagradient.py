"""Metagradient estimator on small MLP policies: unroll == checkpoint, memory, FD, parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dm_helpers import make_episodes

from cupid_engine.policies import MLPPolicyConfig, TrainConfig, build_samples, train_policy
# Submodule imports: they resolve even where an editable install predates the package.
from cupid_engine.datamodels.clusters import ClusterConfig, make_clusters
from cupid_engine.datamodels.metagradient import MetagradientConfig, metagradient_scores
from cupid_engine.datamodels.metrics import ProxyMetric


def _setup(mode="trajectory", n=5, length=10):
    episodes = make_episodes(n=n, length=length)
    target = make_episodes(n=2, length=length, seed=7, prefix="tg")
    samples = build_samples(episodes)
    clusters = make_clusters(samples, ClusterConfig(mode=mode, window=4))
    return samples, clusters, ProxyMetric(target)


POLICY = MLPPolicyConfig(hidden_sizes=(8,), activation="tanh")


@pytest.mark.parametrize("optimizer,momentum", [("sgd", 0.9), ("adam", 0.0)], ids=["sgd-momentum", "adam"])
def test_unroll_equals_checkpointed_segments(optimizer, momentum):
    samples, clusters, metric = _setup(mode="subtrajectory")
    tc = TrainConfig(steps=12, batch_size=16, lr=0.05, optimizer=optimizer, seed=3)
    ref = metagradient_scores(POLICY, samples, clusters, metric, tc,
                              MetagradientConfig(mode="unroll", dtype="float64", momentum=momentum))
    for segments in (1, 4, 12):
        got = metagradient_scores(POLICY, samples, clusters, metric, tc,
                                  MetagradientConfig(segments=segments, dtype="float64", momentum=momentum))
        np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-10, atol=1e-12)
        assert got.metric == ref.metric
    assert np.abs(ref.scores).max() > 0


def test_checkpoint_memory_grows_with_segments_not_steps():
    samples, clusters, metric = _setup()
    info = {}
    for steps, segments in [(8, 2), (32, 2), (32, 8)]:
        tc = TrainConfig(steps=steps, batch_size=16, lr=0.05, optimizer="sgd", seed=0)
        info[steps, segments] = metagradient_scores(
            POLICY, samples, clusters, metric, tc, MetagradientConfig(segments=segments, dtype="float64")).info
    # Stored states: one per segment, whatever the number of updates.
    assert info[8, 2]["checkpoint_bytes"] == info[32, 2]["checkpoint_bytes"]
    assert info[32, 8]["checkpoint_bytes"] == 4 * info[32, 2]["checkpoint_bytes"]
    assert info[32, 8]["num_checkpoints"] == 8
    # The largest live graph is one segment's: 32 updates in 8 segments hold what 8 in 2 hold.
    assert info[32, 8]["peak_graph_bytes"] == info[8, 2]["peak_graph_bytes"]
    unroll = metagradient_scores(POLICY, samples, clusters, metric,
                                 TrainConfig(steps=32, batch_size=16, lr=0.05, optimizer="sgd"),
                                 MetagradientConfig(mode="unroll", dtype="float64")).info
    assert unroll["peak_graph_bytes"] >= 3.5 * info[32, 8]["peak_graph_bytes"]


def test_policy_metagradient_matches_finite_differences():
    samples, clusters, metric = _setup(n=4, length=8)
    tc = TrainConfig(steps=10, batch_size=12, lr=0.05, optimizer="adam", seed=1)
    mc = MetagradientConfig(segments=3, dtype="float64")
    res = metagradient_scores(POLICY, samples, clusters, metric, tc, mc)
    # Finite differences through the same functional trainer with perturbed weights.
    from cupid_engine.datamodels.metagradient import _functional_problem

    prob = _functional_problem(POLICY, samples, clusters, metric, tc, mc)
    eps = 1e-6
    for c in range(clusters.num_clusters):
        vals = []
        for sign in (1, -1):
            w = torch.ones(clusters.num_clusters, dtype=torch.float64)
            w[c] += sign * eps
            vals.append(prob.metric_at(w))
        fd = (vals[0] - vals[1]) / (2 * eps)
        assert abs(res.scores[c] - fd) <= 1e-4 * abs(fd) + 1e-10, (c, res.scores[c], fd)


def test_forward_matches_train_policy_at_unit_weights():
    samples, clusters, metric = _setup()
    tc = TrainConfig(steps=15, batch_size=16, lr=0.01, optimizer="adamw", weight_decay=0.01, seed=2)
    res = metagradient_scores(POLICY, samples, clusters, metric, tc, MetagradientConfig(segments=3))
    ref = train_policy(POLICY, samples, tc, progress=False)
    for (name, p), (_, q) in zip(res.policy.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    assert res.metric == pytest.approx(metric(ref), rel=1e-4)


def test_last_k_injected_batch_scores_every_cluster():
    samples, clusters, metric = _setup(mode="subtrajectory")
    tc = TrainConfig(steps=12, batch_size=16, lr=0.05, optimizer="sgd", seed=0)
    res = metagradient_scores(POLICY, samples, clusters, metric, tc,
                              MetagradientConfig(last_k=3, inject_per_cluster=2, segments=2, dtype="float64"))
    assert res.info["differentiated_steps"] == 3
    assert res.scores.shape == (clusters.num_clusters,)
    # Every cluster is in the injected batch, so every cluster gets a non-zero score.
    assert (np.abs(res.scores) > 0).all()


def test_diffusion_policy_seeded_noise_checkpoint_matches_unroll():
    # Diffusion runs in float32 (the policy's timestep embedding is float32), so the two
    # modes agree to float32 rounding of differently ordered adjoint sums.
    from cupid_engine.policies import DiffusionPolicyConfig

    cfg = DiffusionPolicyConfig.tiny(horizon=4, n_obs_steps=2)
    samples = build_samples(make_episodes(n=3, length=6), n_obs_steps=2, horizon=4)
    clusters = make_clusters(samples)
    metric = ProxyMetric(make_episodes(n=1, length=6, seed=3, prefix="tg"), draws=2)
    tc = TrainConfig(steps=4, batch_size=8, lr=1e-3, optimizer="adam")
    a = metagradient_scores(cfg, samples, clusters, metric, tc, MetagradientConfig(mode="unroll"))
    b = metagradient_scores(cfg, samples, clusters, metric, tc, MetagradientConfig(segments=2))
    c = metagradient_scores(cfg, samples, clusters, metric, tc, MetagradientConfig(segments=2))
    np.testing.assert_array_equal(b.scores, c.scores)  # per-update seeded noise: reproducible
    np.testing.assert_allclose(b.scores, a.scores, rtol=1e-3, atol=1e-6)
    assert a.metric == b.metric


def test_diffusion_metagradient_in_float64_matches_float32():
    # float64 diffusion policies used to fail (the timestep embedding stayed float32).
    from cupid_engine.policies.diffusion import DiffusionPolicyConfig
    from cupid_engine.datamodels.scorer import datamodel_scores

    train = make_episodes(n=4, length=10)
    target = make_episodes(n=2, length=10, seed=5, prefix="tg")
    tc = TrainConfig(steps=4, batch_size=8, optimizer="sgd", lr=1e-2)
    out = {}
    for dtype in ("float32", "float64"):
        table = datamodel_scores(train, target, DiffusionPolicyConfig.tiny(), tc, estimator="metagradient",
                                 metagradient=MetagradientConfig(segments=2, dtype=dtype))
        out[dtype] = table.column("score").to_numpy()
    assert np.isfinite(out["float64"]).all() and np.abs(out["float64"]).max() > 0
    np.testing.assert_allclose(out["float32"], out["float64"], rtol=1e-4, atol=1e-4 * np.abs(out["float64"]).max())
