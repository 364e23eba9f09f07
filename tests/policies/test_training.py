"""Training: loss goes down, zero cluster weight == removal, determinism, errors."""

from __future__ import annotations

import pytest
import torch

from cupid_engine.policies.diffusion import DiffusionPolicyConfig
from cupid_engine.policies.mlp import MLPPolicyConfig
from cupid_engine.policies.samples import build_samples
from cupid_engine.policies.training import TrainConfig, sample_weight_vector, train_policy


def _same_params(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize(
    "config",
    [MLPPolicyConfig.tiny(), MLPPolicyConfig.tiny(head="gaussian"), DiffusionPolicyConfig.tiny()],
    ids=["mlp-det", "mlp-gauss", "diffusion"],
)
def test_loss_decreases(episodes, config):
    steps = 60 if isinstance(config, DiffusionPolicyConfig) else 40
    policy = train_policy(config, episodes, TrainConfig(steps=steps, batch_size=32, lr=3e-3), progress=False)
    losses = policy.train_info["step_losses"]
    assert len(losses) == steps and policy.train_info["steps"] == steps
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # Absolute drop: the Gaussian NLL can go negative, so a ratio would be meaningless.
    assert first - last > 0.25, (first, last)
    assert not policy.training
    assert policy.config.obs_dim == 6 and policy.config.action_dim == 3
    assert policy.config.obs_keys == ("pos", "quat")
    obs = build_samples(episodes[:1], n_obs_steps=config.n_obs_steps, horizon=config.horizon).obs[3].numpy()
    act = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))
    assert act.shape == (config.n_action_steps, 3)


@pytest.mark.parametrize("kind", ["mlp", "diffusion"])
def test_zero_cluster_weight_equals_removal(episodes, kind):
    config = DiffusionPolicyConfig.tiny() if kind == "diffusion" else MLPPolicyConfig.tiny()
    cfg = TrainConfig(steps=12, batch_size=16, lr=1e-2, seed=3)
    drop = {"ep002", "ep005"}
    weighted = train_policy(config, episodes, cfg, cluster_weights={e: 0.0 for e in drop}, progress=False)
    removed = train_policy(config, [e for e in episodes if e.episode_id not in drop], cfg, progress=False)
    _same_params(weighted, removed)
    assert weighted.train_info["num_kept"] == removed.train_info["num_samples"]
    # Explicit integer clusters and a weight vector give the same result.
    samples = build_samples(episodes, n_obs_steps=config.n_obs_steps, horizon=config.horizon)
    clusters = samples.episode_index.clone()
    vector = torch.ones(len(episodes))
    vector[[2, 5]] = 0
    again = train_policy(config, samples, cfg, cluster_weights=vector, clusters=clusters, progress=False)
    _same_params(again, removed)


def test_training_is_deterministic_and_seed_dependent(episodes):
    cfg = TrainConfig(steps=8, batch_size=16, seed=1)
    a = train_policy(MLPPolicyConfig.tiny(), episodes, cfg, progress=False)
    b = train_policy(MLPPolicyConfig.tiny(), episodes, cfg, progress=False)
    _same_params(a, b)
    c = train_policy(MLPPolicyConfig.tiny(), episodes, cfg.replace(seed=2), progress=False)
    assert not torch.equal(a.trunk[0].weight, c.trunk[0].weight)


def test_weights_change_training_and_ema_runs(episodes):
    cfg = TrainConfig(steps=8, batch_size=16, seed=1, ema_decay=0.9, grad_clip=1.0, optimizer="adam")
    plain = train_policy(MLPPolicyConfig.tiny(), episodes, cfg, progress=False)
    n = sum(e.length for e in episodes)
    w = torch.linspace(0.5, 2.0, n)
    weighted = train_policy(MLPPolicyConfig.tiny(), episodes, cfg, sample_weights=w, progress=False)
    assert not torch.equal(plain.mean_head.weight, weighted.mean_head.weight)
    assert weighted.train_info["train_config"]["ema_decay"] == 0.9
    # The returned weights are the EMA, not the last iterate.
    no_ema = train_policy(MLPPolicyConfig.tiny(), episodes, cfg.replace(ema_decay=None), progress=False)
    assert not torch.equal(plain.mean_head.weight, no_ema.mean_head.weight)


def test_sample_weight_vector_and_errors(episodes):
    samples = build_samples(episodes)
    w = sample_weight_vector(samples, sample_weights=torch.full((len(samples),), 2.0), cluster_weights={"ep001": 0.5})
    rows = samples.episode_slices()["ep001"]
    assert torch.all(w[rows] == 1.0) and w.sum() == 2.0 * len(samples) - 1.0 * rows.numel()
    with pytest.raises(ValueError, match="unknown cluster 'nope'"):
        sample_weight_vector(samples, cluster_weights={"nope": 0.0})
    with pytest.raises(ValueError, match="sample_weights must be"):
        sample_weight_vector(samples, sample_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match=">= 0"):
        sample_weight_vector(samples, sample_weights=-torch.ones(len(samples)))
    with pytest.raises(ValueError, match="nothing to train"):
        train_policy(MLPPolicyConfig.tiny(), samples, TrainConfig(steps=1), sample_weights=torch.zeros(len(samples)),
                     progress=False)
    with pytest.raises(ValueError, match="horizon"):
        train_policy(DiffusionPolicyConfig.tiny(), samples, TrainConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match="obs_dim=4 but the samples have 6"):
        train_policy(MLPPolicyConfig.tiny(obs_dim=4), samples, TrainConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lion")
    with pytest.raises(ValueError, match="n_action_steps"):
        MLPPolicyConfig(horizon=2, n_action_steps=3)


@pytest.mark.parametrize("kind", ["mlp", "diffusion"])
def test_given_normalizer_replaces_the_subset_fit(episodes, kind):
    from cupid_engine.policies.normalizer import Normalizer

    config = MLPPolicyConfig.tiny() if kind == "mlp" else DiffusionPolicyConfig.tiny()
    config = config.replace(obs_keys=("pos", "quat"))
    samples = build_samples(episodes, n_obs_steps=config.n_obs_steps, horizon=config.horizon, obs_keys=config.obs_keys)
    full = Normalizer(samples.obs_dim, samples.action_dim, mode=config.normalizer_mode,
                      min_spread=config.normalizer_min_spread).fit(samples.obs, samples.action)
    tc = TrainConfig(steps=3, batch_size=16)
    weights = {e.episode_id: 0.0 for e in episodes[:-2]}  # train on the last two episodes only
    own = train_policy(config, samples, tc, cluster_weights=weights, progress=False)
    shared = train_policy(config, samples, tc, cluster_weights=weights, normalizer=full, progress=False)
    for name, buf in full.named_buffers():
        torch.testing.assert_close(getattr(shared.normalizer, name), buf)
    # The subset's own fit differs (most episodes are left out of its statistics).
    assert any(not torch.allclose(getattr(own.normalizer, n), b) for n, b in full.named_buffers() if n != "fitted")
    other_mode = Normalizer(samples.obs_dim, samples.action_dim, mode="minmax" if kind == "mlp" else "gaussian")
    with pytest.raises(ValueError, match="mode"):
        train_policy(config, samples, tc, normalizer=other_mode.fit(samples.obs, samples.action), progress=False)
    with pytest.raises(ValueError, match="not fitted"):
        train_policy(config, samples, tc, normalizer=Normalizer(samples.obs_dim, samples.action_dim,
                                                                 mode=config.normalizer_mode), progress=False)


def test_ema_update_is_public():
    from cupid_engine.policies.training import ema_update
    from cupid_engine.policies.mlp import MLPPolicy

    a = MLPPolicy(MLPPolicyConfig.tiny(obs_dim=2, action_dim=1))
    b = MLPPolicy(MLPPolicyConfig.tiny(obs_dim=2, action_dim=1))
    before = [p.clone() for p in a.parameters()]
    ema_update(a, b, 0.9, 0)  # warm-up decay at step 0: min(0.9, 1/10) = 0.1
    for pa, p0, pb in zip(a.parameters(), before, b.parameters()):
        torch.testing.assert_close(pa, 0.1 * p0 + 0.9 * pb)


@pytest.mark.parametrize("ema", [None, 0.9], ids=["plain", "ema"])
def test_checkpoints_are_the_weights_of_a_shorter_run_and_change_nothing(episodes, ema):
    cfg = TrainConfig(steps=9, batch_size=16, seed=4, ema_decay=ema)
    seen = {}
    with_ckpt = train_policy(DiffusionPolicyConfig.tiny(), episodes, cfg, progress=False, checkpoint_every=4,
                             on_checkpoint=lambda step, p: seen.setdefault(step, p))
    plain = train_policy(DiffusionPolicyConfig.tiny(), episodes, cfg, progress=False)
    _same_params(with_ckpt, plain)  # snapshots draw no random numbers
    assert sorted(seen) == [4, 8]  # every 4 steps, below the total of 9
    for step, snap in seen.items():
        assert not snap.training and snap.train_info["steps"] == step
        # The step-k checkpoint equals a run stopped after k steps (same data order and noise).
        _same_params(snap, train_policy(DiffusionPolicyConfig.tiny(), episodes, cfg.replace(steps=step),
                                        progress=False))
    assert any(not torch.equal(a, b) for a, b in zip(seen[4].parameters(), plain.parameters()))


def test_checkpoint_every_needs_a_callback_and_a_positive_period(episodes):
    cfg = TrainConfig(steps=3, batch_size=16)
    with pytest.raises(ValueError, match="checkpoint_every"):
        train_policy(MLPPolicyConfig.tiny(), episodes, cfg, progress=False, checkpoint_every=2)
    with pytest.raises(ValueError, match="checkpoint_every"):
        train_policy(MLPPolicyConfig.tiny(), episodes, cfg, progress=False, checkpoint_every=0,
                     on_checkpoint=lambda s, p: None)
