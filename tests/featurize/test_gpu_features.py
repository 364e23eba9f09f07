"""On a CUDA machine: the featuriser gives the same features on the GPU as on the CPU.

The store mixes features from any device, so a policy featurised on a GPU must give the
CPU's features to float32 rounding: hooks + tensorsketch (MLP ``loss`` and the UNet's
seeded ``square`` output, whose noise must not depend on the device) and the vmap path.
Skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from cupid_engine.featurize import Featurizer, ProjectionConfig
from cupid_engine.policies import DiffusionPolicy, DiffusionPolicyConfig, MLPPolicy, MLPPolicyConfig, build_samples

from fz_helpers import make_episodes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _setup(kind: str):
    if kind == "unet":
        policy, output = DiffusionPolicy(DiffusionPolicyConfig.tiny(obs_dim=5, action_dim=3)), "square"
    else:
        policy, output = MLPPolicy(MLPPolicyConfig.tiny(obs_dim=5, action_dim=3)), "loss"
    c = policy.config
    samples = build_samples(make_episodes(), n_obs_steps=c.n_obs_steps, horizon=c.horizon)
    policy.normalizer.fit(samples.obs, samples.action)
    return policy.eval(), output, policy.make_batch(samples, list(range(0, 40, 3)))


@pytest.mark.parametrize("kind,path,method", [("mlp", "hooks", "tensorsketch"), ("unet", "hooks", "tensorsketch"),
                                              ("mlp", "vmap", "sparse")])
def test_gpu_features_equal_cpu_features(kind, path, method):
    policy, output, batch = _setup(kind)
    cfg = ProjectionConfig(method=method, k=512, seed=3)
    cpu = Featurizer(policy, output, cfg, path=path, draws=4, seed=7)(batch)
    gpu_policy = policy.cuda()
    gb = {key: v.cuda() for key, v in batch.items()}
    gpu = Featurizer(gpu_policy, output, cfg, path=path, draws=4, seed=7)(gb)
    assert gpu.device.type == "cuda"
    rel = float((gpu.cpu().double() - cpu.double()).norm() / cpu.double().norm())
    assert rel < 1e-4, rel
