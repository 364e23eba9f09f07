"""Clusters from (episode, step) and the weighted proxy metric."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dm_helpers import make_episodes

from cupid_engine.policies import MLPPolicyConfig, TrainConfig, build_samples, train_policy
from cupid_engine.datamodels.clusters import ClusterConfig, make_clusters
from cupid_engine.datamodels.metrics import ProxyMetric, RolloutMetric


def test_trajectory_and_subtrajectory_clusters():
    eps = make_episodes(n=3, length=7)
    samples = build_samples(eps)
    traj = make_clusters(samples)
    assert traj.names == ["ep000", "ep001", "ep002"]
    np.testing.assert_array_equal(traj.ids, np.repeat([0, 1, 2], 7))
    sub = make_clusters(samples, ClusterConfig(mode="subtrajectory", window=3))
    # Windows [0,3), [3,6), [6,7) per episode.
    assert sub.num_clusters == 9
    assert sub.names[:3] == ["ep000@0", "ep000@3", "ep000@6"]
    np.testing.assert_array_equal(sub.ids[:7], [0, 0, 0, 1, 1, 1, 2])
    np.testing.assert_array_equal(sub.sizes()[:3], [3, 3, 1])
    np.testing.assert_array_equal(sub.episode_scores(np.arange(9.0)), [3.0, 12.0, 21.0])
    # Ids follow (episode, step), not sample positions.
    perm = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0))
    shuffled = make_clusters(samples.subset(perm), ClusterConfig(mode="subtrajectory", window=3))
    np.testing.assert_array_equal(shuffled.ids, sub.ids[perm.numpy()])
    with pytest.raises(ValueError):
        ClusterConfig(mode="task")


def test_proxy_metric_weights_and_targets():
    train = make_episodes(n=3, length=5)
    target = make_episodes(n=2, length=4, seed=1, prefix="tg")
    policy = train_policy(MLPPolicyConfig(hidden_sizes=(8,)), train, TrainConfig(steps=5, batch_size=8),
                          progress=False)
    batch = policy.make_batch(build_samples(target))
    with torch.no_grad():
        losses = policy.per_sample_loss(batch).double().numpy()
    assert ProxyMetric(target)(policy) == pytest.approx(-losses.mean(), rel=1e-6)
    pregrasp = lambda eid, step: 2.0 if step >= 2 else 1.0  # noqa: E731
    w = np.tile([1.0, 1.0, 2.0, 2.0], 2)
    assert ProxyMetric(target, step_weights=pregrasp)(policy) == pytest.approx(-(w * losses).mean(), rel=1e-6)
    assert ProxyMetric(target, step_weights=w)(policy) == pytest.approx(-(w * losses).mean(), rel=1e-6)
    per = ProxyMetric(target, per_episode=True)(policy)
    np.testing.assert_allclose(per, [-losses[:4].mean(), -losses[4:].mean()], rtol=1e-6)
    # The fingerprint sees weight values, not callables' identity.
    assert ProxyMetric(target, step_weights=pregrasp).fingerprint() == ProxyMetric(target, step_weights=w).fingerprint()
    assert ProxyMetric(target).fingerprint() != ProxyMetric(target, step_weights=w).fingerprint()
    with pytest.raises(ValueError, match="step_weights"):
        ProxyMetric(target, step_weights=np.ones(3))(policy)


def test_rollout_metric_is_pluggable():
    calls = []
    metric = RolloutMetric(lambda policy: calls.append(policy) or 0.75, name="fake-success")
    assert metric("policy") == 0.75 and calls == ["policy"]
    assert metric.fingerprint() != RolloutMetric(lambda p: 0.0, name="other").fingerprint()


@pytest.mark.sim
def test_sim_success_metric_runs_on_the_executor(tmp_path):
    """Rollouts of the success metric run on the given executor (out of process: from a
    temporary checkpoint of the policy) and give the in-process value."""
    pytest.importorskip("robosuite")
    from cupid_engine.datamodels.metrics import sim_success_metric
    from cupid_engine.distributed import RayExecutor
    from cupid_engine.executor import Processes
    from cupid_engine.policies import MLPPolicy
    from cupid_engine.sim.tasks import OBS_KEYS

    class Recording(Processes):
        def _run(self, factory, items, done, gpus):
            self.seen = (factory, list(items))
            super()._run(factory, items, done, gpus)

    torch.manual_seed(0)
    policy = MLPPolicy(MLPPolicyConfig.tiny(obs_dim=sum(d for _, d in OBS_KEYS["lift"]), action_dim=7))
    executor = Recording(2)
    local = sim_success_metric("lift", episodes=2, seed=1, horizon=15)
    remote = sim_success_metric("lift", episodes=2, seed=1, horizon=15, executor=executor)
    assert remote(policy) == local(policy)
    factory, items = executor.seen
    assert len(items) == 2 and isinstance(factory.args[1], str)  # a checkpoint path, never the model
    assert remote.fingerprint() == local.fingerprint() != sim_success_metric("lift", episodes=2, seed=1).fingerprint()
    with pytest.raises(ValueError, match="this machine"):
        sim_success_metric("lift", executor=RayExecutor(2, address="127.0.0.1:1"))


@pytest.mark.parametrize("head", ["deterministic", "gaussian"])
def test_reference_action_scale_changes_units_exactly(head):
    train = make_episodes(n=3, length=5)
    target = make_episodes(n=1, length=5, seed=2, prefix="tg")
    policy = train_policy(MLPPolicyConfig(hidden_sizes=(8,), head=head), train, TrainConfig(steps=3, batch_size=8),
                          progress=False)
    own = policy.normalizer.action_scale.double()
    base = ProxyMetric(target)(policy)
    assert ProxyMetric(target, action_scale=own)(policy) == pytest.approx(base, rel=1e-6)
    half = ProxyMetric(target).with_action_scale(own / 2)(policy)
    if head == "deterministic":  # MSE in units half as large: 4x
        assert half == pytest.approx(4 * base, rel=1e-5)
    else:  # NLL gains log 2 per element
        assert half == pytest.approx(base - np.log(2), rel=1e-5)
    assert ProxyMetric(target, action_scale=own).fingerprint() != ProxyMetric(target).fingerprint()
