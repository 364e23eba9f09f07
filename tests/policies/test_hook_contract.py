"""The hook-path contract: per-row Linear/Conv1d gradients from one batched backward,
summed over each sample's group of draw rows, equal that sample's own gradient."""

from __future__ import annotations

import pytest
import torch

from cupid_engine.policies.diffusion import DiffusionPolicy, DiffusionPolicyConfig
from cupid_engine.policies.mlp import MLPPolicy, MLPPolicyConfig
from cupid_engine.policies.outputs import expand_for_output, get_output, output_from_expanded, reduce_groups
from cupid_engine.policies.samples import build_samples
from cupid_engine.policies.tracking import tracked_modules


def _per_row_weight_grads(module, x, delta):
    """Per-row weight gradient of a Linear ([R, in], [R, out]) or Conv1d with kernel 1
    ([R, C_in, L], [R, C_out, L])."""
    if isinstance(module, torch.nn.Linear):
        return torch.einsum("ro,ri->roi", delta, x)
    assert module.kernel_size == (1,)
    return torch.einsum("rol,ril->roi", delta, x).unsqueeze(-1)


@pytest.mark.parametrize("kind,name", [("diffusion", "square"), ("mlp", "logprob")], ids=["diffusion", "mlp"])
def test_hook_rows_sum_to_per_sample_gradients(episodes, kind, name):
    if kind == "diffusion":
        policy = DiffusionPolicy(DiffusionPolicyConfig.tiny(obs_dim=6, action_dim=3))
        track = ["model.final_conv", "model.diffusion_step_encoder.1"]
    else:
        policy = MLPPolicy(MLPPolicyConfig.tiny(obs_dim=6, action_dim=3, head="gaussian", std_mode="predicted"))
        track = ["trunk.0", "mean_head", "log_std_head"]
    cfg = policy.config
    s = build_samples(episodes[:2], n_obs_steps=cfg.n_obs_steps, horizon=cfg.horizon)
    policy.normalizer.fit(s.obs, s.action)
    batch = policy.normalizer.normalize_batch(s.batch([1, 9, 20, 33]))
    modules = tracked_modules(policy, track, hook_compatible=True)

    captured: dict[str, dict[str, torch.Tensor]] = {n: {} for n, _ in modules}
    handles = []

    def hook(mod, inp, out, n):
        captured[n]["x"] = inp[0].detach()
        out.register_hook(lambda g: captured[n].__setitem__("d", g))

    for n, m in modules:
        handles.append(m.register_forward_hook(lambda mod, inp, out, n=n: hook(mod, inp, out, n)))
    expanded, groups = expand_for_output(policy, batch, name, draws=6, seed=11)
    output_from_expanded(policy, expanded, name).sum().backward()
    for h in handles:
        h.remove()

    for n, m in modules:
        rows = _per_row_weight_grads(m, captured[n]["x"], captured[n]["d"])
        per_sample = torch.stack([rows[groups == b].sum(0) for b in range(4)])
        for b in (0, 3):
            policy.zero_grad()
            get_output(name)(policy, {k: v[b : b + 1] for k, v in batch.items()}, seed=11, draws=6).sum().backward()
            torch.testing.assert_close(per_sample[b], m.weight.grad, rtol=1e-4, atol=1e-6, msg=f"{n} sample {b}")
    assert reduce_groups(torch.ones(groups.numel()), groups, 4).tolist() == [float((groups == b).sum()) for b in range(4)]
