"""Diffusion policy architecture and sampling; tracked-module selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cupid_engine.policies.diffusion import DiffusionPolicy, DiffusionPolicyConfig, squared_cosine_alphas_cumprod
from cupid_engine.policies.mlp import MLPPolicy, MLPPolicyConfig
from cupid_engine.policies.registry import build_policy, make_policy_config
from cupid_engine.policies.tracking import tracked_modules, tracked_parameters


def test_default_sizes():
    diff = DiffusionPolicy(DiffusionPolicyConfig(obs_dim=40, action_dim=7))
    assert 0.8e6 < diff.num_parameters() < 1.6e6
    mlp = MLPPolicy(MLPPolicyConfig(obs_dim=40, action_dim=7))
    assert 0.4e6 < mlp.num_parameters() < 0.6e6
    big = MLPPolicy(MLPPolicyConfig.large(obs_dim=40, action_dim=7))
    assert 8.0e6 < big.num_parameters() < 9.0e6
    # The default MLP and diffusion policies are fully hook-featurisable.
    tracked_modules(mlp, "all", hook_compatible=True)
    tracked_modules(diff, "all", hook_compatible=True)


def test_schedule_and_unet_shapes():
    abar = squared_cosine_alphas_cumprod(100)
    assert abar.shape == (100,) and torch.all(abar[1:] < abar[:-1]) and 0 < abar[-1] < 1e-3 < abar[0] <= 1
    cfg = DiffusionPolicyConfig.tiny(obs_dim=5, action_dim=3, down_dims=(8, 16, 16), horizon=12, n_groups=4)
    policy = DiffusionPolicy(cfg)
    out = policy.predict_noise(torch.randn(4, 12, 3), torch.tensor([0, 5, 50, 99]), torch.randn(4, 2, 5))
    assert out.shape == (4, 12, 3)
    with pytest.raises(ValueError, match="divisible"):
        DiffusionPolicyConfig.tiny(horizon=6, down_dims=(8, 16, 32), n_groups=4)


def test_ddim_sampling_deterministic_for_fixed_generator():
    cfg = DiffusionPolicyConfig.tiny(obs_dim=5, action_dim=3)
    policy = DiffusionPolicy(cfg)
    obs = np.random.default_rng(0).normal(size=(2, 5)).astype(np.float32)
    a = policy.predict_action(obs, generator=torch.Generator().manual_seed(7))
    b = policy.predict_action(obs, generator=torch.Generator().manual_seed(7))
    c = policy.predict_action(obs, generator=torch.Generator().manual_seed(8))
    assert a.shape == (cfg.n_action_steps, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    batched = policy.predict_action(np.stack([obs, obs]), generator=torch.Generator().manual_seed(7))
    assert batched.shape == (2, cfg.n_action_steps, 3)
    # Clipping in normalised space bounds the raw actions by the normaliser's box.
    assert np.all(np.abs(a) <= 1.0 + 1e-5)
    with pytest.raises(ValueError, match=r"obs_window must be \[2, 5\]"):
        policy.predict_action(np.zeros((3, 5), np.float32))


def test_tracking_selection_and_hook_compatibility():
    mlp = MLPPolicy(MLPPolicyConfig.tiny(obs_dim=4, action_dim=2, head="gaussian"))
    assert [n for n, _ in tracked_modules(mlp, "head")] == ["mean_head", "log_std_head"]
    assert [n for n, _ in tracked_modules(mlp, ["trunk"])] == ["trunk.0", "trunk.2"]
    assert set(tracked_parameters(mlp, "head")) == {"mean_head.weight", "mean_head.bias", "log_std_head.weight"}
    assert len(tracked_parameters(mlp, "all")) == len(list(mlp.parameters()))
    with pytest.raises(ValueError, match="unknown module names"):
        tracked_modules(mlp, ["decoder"])

    # Affine GroupNorm is hook-compatible (its per-sample formula is exact); the head alone too.
    affine = DiffusionPolicy(DiffusionPolicyConfig.tiny(obs_dim=4, action_dim=2, group_norm_affine=True))
    assert any(isinstance(m, nn.GroupNorm) for _, m in tracked_modules(affine, "all", hook_compatible=True))
    assert [n for n, _ in tracked_modules(affine, "head", hook_compatible=True)] == ["model.final_conv"]

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(3, 2, max_norm=1.0)
            self.attn = nn.MultiheadAttention(4, 2)
            self.pos = nn.Parameter(torch.zeros(4))
            self.lin = nn.Linear(2, 2)
            self.conv = nn.Conv2d(2, 2, 3, groups=2)
            self.act = nn.ReLU()

    with pytest.raises(ValueError) as err:
        tracked_modules(Mixed(), "all", hook_compatible=True)
    msg = str(err.value)
    for needle in ("emb (Embedding: nn.Embedding with max_norm", "attn (MultiheadAttention: nn.MultiheadAttention uses "
                   "its packed in_proj_weight", "<root> (Mixed:", "conv (Conv2d: Conv2d with groups=2"):
        assert needle in msg, (needle, msg)
    assert "lin (" not in msg
    assert [n for n, _ in tracked_modules(Mixed(), ["lin", "act"], hook_compatible=True)] == ["lin"]


def test_registry_and_bad_configs():
    assert isinstance(build_policy(make_policy_config("mlp", obs_dim=3, action_dim=2)), MLPPolicy)
    with pytest.raises(ValueError, match="unknown policy kind"):
        make_policy_config("no-such-policy")
    with pytest.raises(ValueError, match="obs_dim and action_dim must be set"):
        MLPPolicy(MLPPolicyConfig())
    with pytest.raises(ValueError, match="activation"):
        MLPPolicyConfig(activation="swish2")
    with pytest.raises(ValueError, match="head"):
        MLPPolicyConfig(head="mixture")
    cfg = DiffusionPolicyConfig(obs_dim=3, action_dim=2)
    assert DiffusionPolicyConfig.from_dict(cfg.to_dict()) == cfg
    assert MLPPolicyConfig.from_dict(MLPPolicyConfig.large().to_dict()) == MLPPolicyConfig.large()


def test_float64_policy_embeds_timesteps_in_float64():
    # The timestep embedding follows the module dtype (it has no parameters of its own), so a
    # float64 diffusion policy runs end to end in float64 (the datamodel metagradient needs it).
    cfg = DiffusionPolicyConfig.tiny(obs_dim=5, action_dim=3)
    policy = DiffusionPolicy(cfg)
    t = torch.tensor([0, 7, 99])
    emb32 = policy.model.diffusion_step_encoder[0](t)
    assert emb32.dtype == torch.float32
    policy = policy.double()
    emb64 = policy.model.diffusion_step_encoder[0](t)
    assert emb64.dtype == torch.float64
    torch.testing.assert_close(emb64.float(), emb32)
    batch = {"obs": torch.randn(3, cfg.n_obs_steps, 5, dtype=torch.float64),
             "action": torch.randn(3, cfg.horizon, 3, dtype=torch.float64),
             "episode_key": torch.tensor([1, 2, 3]), "step": torch.tensor([0, 1, 2])}
    loss = policy.per_sample_loss(batch)
    assert loss.dtype == torch.float64 and torch.isfinite(loss).all()
    # Not a checkpoint entry: state dicts are unchanged by the dtype carrier.
    assert not any("dtype_probe" in k for k in policy.state_dict())
