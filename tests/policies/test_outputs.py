"""Output functions: per-sample independence, vmap equivalence, seeded square draws."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, vmap

from cupid_engine.policies.diffusion import DiffusionPolicy, DiffusionPolicyConfig, seeded_diffusion_noise
from cupid_engine.policies.mlp import MLPPolicy, MLPPolicyConfig
from cupid_engine.policies.outputs import (
    expand_for_output,
    functional_output,
    get_output,
    output_from_expanded,
    reduce_groups,
)
from cupid_engine.policies.samples import build_samples

CASES = [
    ("mlp_det", "loss"),
    ("mlp_det", "energy"),
    ("mlp_gauss", "loss"),
    ("mlp_gauss", "logprob"),
    ("mlp_gauss_pred", "logprob"),
    ("diffusion", "loss"),
    ("diffusion", "square"),
    ("diffusion", "energy"),
]


def _policy(kind: str, episodes):
    if kind == "diffusion":
        cfg = DiffusionPolicyConfig.tiny(obs_dim=6, action_dim=3)
        policy = DiffusionPolicy(cfg)
    else:
        head = "deterministic" if kind == "mlp_det" else "gaussian"
        std = "predicted" if kind == "mlp_gauss_pred" else "state_independent"
        cfg = MLPPolicyConfig.tiny(obs_dim=6, action_dim=3, head=head, std_mode=std, init_log_std=-0.5)
        policy = MLPPolicy(cfg)
    s = build_samples(episodes[:3], n_obs_steps=cfg.n_obs_steps, horizon=cfg.horizon)
    policy.normalizer.fit(s.obs, s.action)
    idx = torch.tensor([0, 7, 13, 30, 41, 55])
    return policy, policy.normalizer.normalize_batch(s.batch(idx))


def _take(batch, idx):
    return {k: v[idx] for k, v in batch.items()}


@pytest.mark.parametrize("kind,name", CASES, ids=[f"{k}-{n}" for k, n in CASES])
def test_outputs_independent_of_batch_composition(episodes, kind, name):
    policy, batch = _policy(kind, episodes)
    fn = get_output(name)
    full = fn(policy, batch, seed=5, draws=8)
    assert full.shape == (6,)
    perm = torch.tensor([4, 2, 5, 0, 3, 1])
    torch.testing.assert_close(fn(policy, _take(batch, perm), seed=5, draws=8), full[perm], rtol=1e-6, atol=1e-6)
    one_at_a_time = torch.cat([fn(policy, _take(batch, [i]), seed=5, draws=8) for i in range(6)])
    torch.testing.assert_close(one_at_a_time, full, rtol=1e-6, atol=1e-6)
    # Perturbing other samples' inputs leaves a sample's output unchanged (hook path).
    other = {k: v.clone() for k, v in batch.items()}
    other["obs"][1:] += 1.0
    other["action"][1:] -= 1.0
    torch.testing.assert_close(fn(policy, other, seed=5, draws=8)[0], full[0])


@pytest.mark.parametrize("kind,name", CASES, ids=[f"{k}-{n}" for k, n in CASES])
def test_vmap_grads_equal_per_sample_autograd(episodes, kind, name):
    policy, batch = _policy(kind, episodes)
    params = {k: v.detach() for k, v in policy.named_parameters()}

    def f(p, sample):
        one = {k: v.unsqueeze(0) for k, v in sample.items()}
        return functional_output(policy, p, one, name, seed=3, draws=4)[0]

    values = vmap(f, in_dims=(None, 0))(params, batch)
    grads = vmap(grad(f), in_dims=(None, 0))(params, batch)
    torch.testing.assert_close(values, get_output(name)(policy, batch, seed=3, draws=4), rtol=1e-5, atol=1e-6)
    for i in (0, 4):
        policy.zero_grad()
        policy(_take(batch, [i]), output=name, seed=3, draws=4).sum().backward()
        for k, p in policy.named_parameters():
            ref = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(grads[k][i], ref, rtol=1e-4, atol=1e-6, msg=f"{k} sample {i}")


@pytest.mark.parametrize("kind,name", [("diffusion", "square"), ("mlp_gauss", "logprob")])
def test_expanded_rows_sum_to_sample_outputs(episodes, kind, name):
    policy, batch = _policy(kind, episodes)
    expanded, groups = expand_for_output(policy, batch, name, draws=5, seed=1)
    rows = output_from_expanded(policy, expanded, name)
    expected_rows = 6 * 5 if kind == "diffusion" else 6
    assert rows.shape == (expected_rows,) and groups.shape == (expected_rows,)
    torch.testing.assert_close(reduce_groups(rows, groups, 6), get_output(name)(policy, batch, seed=1, draws=5))


def test_square_draws_reproducible_and_seeded(episodes):
    policy, batch = _policy("diffusion", episodes)
    fn = get_output("square")
    a = fn(policy, batch, seed=0, draws=16)
    torch.testing.assert_close(fn(policy, batch, seed=0, draws=16), a, rtol=0, atol=0)
    # Split into two batches in another order: identical per-sample values.
    first, second = torch.tensor([5, 1, 3]), torch.tensor([2, 0, 4])
    parts = torch.empty(6)
    parts[first] = fn(policy, _take(batch, first), seed=0, draws=16).detach()
    parts[second] = fn(policy, _take(batch, second), seed=0, draws=16).detach()
    torch.testing.assert_close(parts, a.detach(), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(fn(policy, batch, seed=1, draws=16), a)


def test_seeded_noise_statistics():
    keys = torch.arange(64, dtype=torch.int64) * 7919
    steps = torch.arange(64, dtype=torch.int64)
    noise, t = seeded_diffusion_noise(keys, steps, seed=0, draws=32, horizon=8, action_dim=3, num_train_timesteps=100)
    assert noise.shape == (64, 32, 8, 3) and t.shape == (64, 32)
    assert abs(noise.mean().item()) < 0.02 and abs(noise.std().item() - 1) < 0.02
    assert t.min() >= 0 and t.max() <= 99 and t.unique().numel() == 100
    # A sample's draws depend on (seed, episode_key, step) only.
    n2, t2 = seeded_diffusion_noise(keys[10:12], steps[10:12], seed=0, draws=32, horizon=8, action_dim=3,
                                    num_train_timesteps=100)
    torch.testing.assert_close(n2, noise[10:12], rtol=0, atol=0)
    torch.testing.assert_close(t2, t[10:12], rtol=0, atol=0)


def test_unsupported_outputs_raise_clearly(episodes):
    diff, batch = _policy("diffusion", episodes)
    with pytest.raises(ValueError, match="logprob.*square"):
        get_output("logprob")(diff, batch)
    mlp, mbatch = _policy("mlp_det", episodes)
    with pytest.raises(ValueError, match="logprob needs an MLP with head='gaussian'"):
        get_output("logprob")(mlp, mbatch)
    with pytest.raises(ValueError, match="square is the diffusion surrogate"):
        get_output("square")(mlp, mbatch)
    with pytest.raises(ValueError, match="unknown output function"):
        get_output("likelihood")
    with pytest.raises(ValueError, match="episode_key"):
        get_output("square")(diff, {k: v for k, v in batch.items() if k != "episode_key"})
    with pytest.raises(ValueError, match=r"batch field 'obs' must be \[B, 1, 6\]"):
        get_output("loss")(mlp, {**mbatch, "obs": mbatch["obs"][:, :, :4]})
