"""The featuriser's two paths against the definitions: hooks == explicit sketch of
materialised per-sample gradients, vmap == single-sample autograd, order independence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cupid_engine import ops
from cupid_engine.featurize import FeaturizeConfig, Featurizer, ProjectionConfig, fused_tensorsketch, layer_seed
from cupid_engine.featurize.hooks import check_sample_independent, unfold_conv1d
from cupid_engine.featurize.vmap import per_sample_grads
from cupid_engine.ops import reference
from cupid_engine.policies import (
    DiffusionPolicy,
    DiffusionPolicyConfig,
    MLPPolicy,
    MLPPolicyConfig,
    build_samples,
    get_output,
    tracked_modules,
    tracked_parameters,
)

from fz_helpers import make_episodes

K = 128


def _policy(kind: str, dtype=None):
    """A tiny policy with a fitted normaliser, its output and samples. float64 except the
    UNet: its sinusoidal timestep embedding is float32 whatever the model dtype."""
    if kind == "mlp":
        policy = MLPPolicy(MLPPolicyConfig.tiny(obs_dim=5, action_dim=3, head="gaussian", std_mode="predicted"))
        output = "logprob"
    elif kind == "mlp_loss":
        policy = MLPPolicy(MLPPolicyConfig.tiny(obs_dim=5, action_dim=3))
        output = "loss"
    else:
        policy = DiffusionPolicy(DiffusionPolicyConfig.tiny(obs_dim=5, action_dim=3))
        output = "square"
    c = policy.config
    samples = build_samples(make_episodes(), n_obs_steps=c.n_obs_steps, horizon=c.horizon)
    policy.normalizer.fit(samples.obs, samples.action)
    if dtype is None:
        dtype = torch.float32 if kind == "diffusion" else torch.float64
    policy = policy.to(dtype)
    return policy, output, samples


def _batch(policy, samples, idx):
    dtype = next(policy.parameters()).dtype
    b = policy.make_batch(samples, idx)
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in b.items()}


def _explicit_sketch(policy, batch, output, track, *, k, seed, draws, noise_seed):
    """Materialise per-sample gradients (vmap), hash each layer's [O, I(+1)] gradient with
    the reference CountSketch and the same per-layer seed, sum over layers."""
    params = tracked_parameters(policy, track)
    grads = per_sample_grads(policy, params, batch, output, seed=noise_seed, draws=draws)
    B = batch["obs"].shape[0]
    total = torch.zeros(B, k, dtype=torch.float64)
    for name, module in tracked_modules(policy, track, hook_compatible=True):
        w = grads[f"{name}.weight" if name else "weight"].reshape(B, module.weight.shape[0], -1)
        if module.bias is not None:
            w = torch.cat((w, grads[f"{name}.bias"].unsqueeze(-1)), dim=-1)
        O = w.shape[1]
        # G = sum_t e_t G[t]^T: the reference hashes exactly the matrix G.
        eye = torch.eye(O, dtype=w.dtype).expand(B, O, O)
        total += reference.tensorsketch_materialized(eye, w, k=k, seed=layer_seed(seed, name))
    return total


def p_dtype(policy):
    return next(policy.parameters()).dtype


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind,track", [("mlp", "all"), ("mlp_loss", "head"), ("diffusion", "all"),
                                        ("diffusion", "head")], ids=["mlp-all", "mlp-head", "unet-all", "unet-head"])
def test_hooks_equal_explicit_sketch(kind, track):
    policy, output, samples = _policy(kind)
    batch = _batch(policy, samples, [0, 3, 11, 17, 30, 40])
    draws = 4
    f = Featurizer(policy, output, ProjectionConfig(k=K, seed=5), track=track, draws=draws, seed=9)
    got = f(batch)
    dtype = next(policy.parameters()).dtype
    assert got.dtype == dtype and got.shape == (6, K)
    want = _explicit_sketch(policy, batch, output, track, k=K, seed=5, draws=draws, noise_seed=9)
    assert _rel(got, want.to(dtype)) < 1e-5
    if kind == "diffusion" and track == "all":
        # The UNet really exercises Conv1d (T > 1) and Linear layers.
        assert any(isinstance(m, nn.Conv1d) and m.kernel_size[0] > 1 for _, m in f.modules)
        assert any(isinstance(m, nn.Linear) for _, m in f.modules)


@pytest.mark.parametrize("strategy", ["auto", "fft", "dense"])
def test_fused_equals_sum_of_ops_tensorsketch(strategy):
    policy, output, samples = _policy("diffusion", torch.float32)
    f = Featurizer(policy, output, ProjectionConfig(k=K, seed=1), draws=2)
    batch = _batch(policy, samples, list(range(7)))
    factors = f.layer_factors(batch)
    want = sum(ops.tensorsketch(d, x, k=K, seed=layer_seed(1, n)) for n, d, x in factors)
    got = fused_tensorsketch([(layer_seed(1, n), d, x) for n, d, x in factors], k=K, strategy=strategy)
    assert got.dtype == torch.float32
    assert _rel(got, want) < 1e-5
    if strategy == "auto":
        torch.testing.assert_close(f(batch), got)


@pytest.mark.parametrize("strategy", ["auto", "fft", "dense"])
def test_fused_float64_mixed_widths(strategy):
    """Narrow factors (direct DFT), wide ones (C++ count sketch + FFT), T = 1 and T > 1."""
    g = torch.Generator().manual_seed(3)
    shapes = [(3, 7, 41), (1, 100, 90), (20, 9, 30), (1, 65, 64)]
    facs = [(17 + i, torch.randn(5, T, O, generator=g, dtype=torch.float64),
             torch.randn(5, T, I, generator=g, dtype=torch.float64)) for i, (T, O, I) in enumerate(shapes)]
    want = sum(ops.tensorsketch(d, x, k=256, seed=s) for s, d, x in facs)
    got = fused_tensorsketch(facs, k=256, strategy=strategy)
    assert got.dtype == torch.float64 and _rel(got, want) < 1e-12


@pytest.mark.parametrize("kind", ["mlp", "diffusion"])
def test_vmap_grads_equal_single_sample_autograd(kind):
    policy, output, samples = _policy(kind)
    batch = _batch(policy, samples, [2, 8, 21])
    params = tracked_parameters(policy, "all")
    grads = per_sample_grads(policy, params, batch, output, seed=3, draws=3)
    for b in range(3):
        policy.zero_grad()
        one = {k: v[b : b + 1] for k, v in batch.items()}
        get_output(output)(policy, one, seed=3, draws=3).sum().backward()
        for name, p in params.items():
            assert not grads[name].requires_grad
            if p_dtype(policy) == torch.float64:
                torch.testing.assert_close(grads[name][b], p.grad, rtol=1e-9, atol=1e-12, msg=name)
            else:  # float32 UNet: compare as a whole, relative to the gradient's norm
                assert _rel(grads[name][b], p.grad) < 1e-5, name


@pytest.mark.parametrize("method", ["sparse", "dense", "signshift"])
def test_vmap_path_projects_flat_gradient(method):
    policy, output, samples = _policy("mlp")
    batch = _batch(policy, samples, [1, 4, 9])
    f = Featurizer(policy, output, ProjectionConfig(method=method, k=64, seed=2), path="vmap")
    params = tracked_parameters(policy, "all")
    grads = per_sample_grads(policy, params, batch, output)
    flat = torch.cat([grads[n].reshape(3, -1) for n in params], dim=1)  # documented order
    want = reference.project(flat, k=64, method=method, seed=2)
    assert _rel(f(batch), want) < 1e-6


@pytest.mark.parametrize("path", ["hooks", "vmap"])
def test_square_features_reproducible_and_order_independent(path):
    policy, output, samples = _policy("diffusion", torch.float32)
    method = "tensorsketch" if path == "hooks" else "sparse"
    f = Featurizer(policy, "square", ProjectionConfig(method=method, k=64, seed=0), path=path, draws=8, seed=4)
    idx = torch.tensor([0, 5, 9, 14, 22, 31, 40, 47])
    base = f.featurize_samples(samples, idx)
    torch.testing.assert_close(f.featurize_samples(samples, idx), base, rtol=0, atol=0)
    perm = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])
    shuffled = f.featurize_samples(samples, idx[perm])
    # float32: equal up to rounding (per-row relative error), not bitwise across batch shapes.
    assert max(_rel(shuffled[i], base[perm][i]) for i in range(8)) < 1e-5
    # Batch size does not matter either: two halves equal the whole.
    halves = torch.cat([f.featurize_samples(samples, idx[:3]), f.featurize_samples(samples, idx[3:])])
    assert max(_rel(halves[i], base[i]) for i in range(8)) < 1e-5


def test_unsupported_parametrised_layer_is_named():
    # Affine GroupNorm is hook-featurisable now; a ConvTranspose1d is not, and is named.
    policy = DiffusionPolicy(DiffusionPolicyConfig.tiny(obs_dim=5, action_dim=3, group_norm_affine=True))
    Featurizer(policy, "square", ProjectionConfig(k=64))
    policy.model.final_block[0] = nn.ConvTranspose1d(16, 16, 5, padding=2)
    with pytest.raises(ValueError, match=r"model\.final_block\.0 \(ConvTranspose1d"):
        Featurizer(policy, "square", ProjectionConfig(k=64))
    # The head alone is hook-compatible; the vmap path takes any parameter.
    Featurizer(policy, "square", ProjectionConfig(k=64), track="head")
    Featurizer(policy, "square", ProjectionConfig(method="sparse", k=64), path="vmap")


def test_batch_statistics_batchnorm_refused():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(ValueError, match=r"1 \(BatchNorm1d\)"):
        check_sample_independent(net.eval())
    check_sample_independent(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval())


def test_method_path_mismatch_refused():
    policy, output, _ = _policy("mlp")
    with pytest.raises(ValueError, match="needs path 'vmap'"):
        Featurizer(policy, output, ProjectionConfig(method="sparse", k=64), path="hooks")
    with pytest.raises(ValueError, match="needs path 'hooks'"):
        FeaturizeConfig(path="vmap")
    with pytest.raises(ValueError, match="output 'square'"):
        Featurizer(policy, "square", ProjectionConfig(k=64))


@pytest.mark.parametrize("stride,dilation,padding", [(1, 1, 2), (2, 1, 1), (1, 2, 3), (3, 2, 0)])
def test_conv1d_unfold_gives_weight_gradient(stride, dilation, padding):
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 4, 5, stride=stride, dilation=dilation, padding=padding).double()
    x = torch.randn(2, 3, 17, dtype=torch.float64)
    out = conv(x)
    delta = torch.randn_like(out)
    (out * delta).sum().backward()
    xu = unfold_conv1d(conv, x)  # [B, L_out, C_in * K]
    G = torch.einsum("blo,bli->oi", delta.transpose(1, 2), xu)
    torch.testing.assert_close(G, conv.weight.grad.reshape(4, -1))
    xb = unfold_conv1d(conv, x, append_one=True)  # bias input appended in the same pass
    assert torch.equal(xb[..., :-1], xu) and torch.equal(xb[..., -1], torch.ones_like(xb[..., -1]))
    torch.testing.assert_close(torch.einsum("blo,bl->o", delta.transpose(1, 2), xb[..., -1]), conv.bias.grad)


def test_grouped_conv_refused():
    with pytest.raises(ValueError, match="groups=2"):
        unfold_conv1d(nn.Conv1d(4, 4, 3, groups=2), torch.zeros(1, 4, 8))


def test_describe_and_config_roundtrip():
    policy, output, _ = _policy("mlp")
    cfg = FeaturizeConfig.for_method("tensorsketch", k=256, output=output, track=["mean_head"])
    assert FeaturizeConfig.from_dict(cfg.to_dict()) == cfg
    f = Featurizer.from_config(policy, cfg)
    d = f.describe()
    assert d["projection"] == {"method": "tensorsketch", "k": 256, "seed": 0, "s": 1}
    assert d["tracked_modules"] == ["mean_head"] and d["output"] == "logprob" and d["path"] == "hooks"
    assert len(d["policy_hash"]) > 8
    import json

    json.dumps(d, allow_nan=False)
