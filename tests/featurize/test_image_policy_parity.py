"""The engine's image policies (policies/diffusion_image.py, policies/transformer.py) are
hook-featurised over EVERY parameter (ResNet-18-GN encoder: Conv2d + GroupNorm; transformer:
patch Linear, token Embeddings, LayerNorm, attention from Linear layers), and the sketch
equals the hashed exact per-sample gradients (float64, odd image size)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cupid_engine.data.episode import Episode
from cupid_engine.featurize import Featurizer, ProjectionConfig
from cupid_engine.policies import build_policy

from fz_helpers import explicit_sketch


def _episodes():
    rng = np.random.default_rng(0)
    return [
        Episode(f"e{i}", {"s": rng.normal(size=(5, 3)).astype(np.float32)}, rng.normal(size=(5, 2)).astype(np.float32),
                images={"cam": rng.integers(0, 255, (5, 21, 21, 3), dtype=np.uint8)}, task="pick up the cube")
        for i in range(2)
    ]


def _config(kind):
    if kind == "diffusion-image":
        from cupid_engine.policies.diffusion_image import DiffusionImagePolicyConfig

        return DiffusionImagePolicyConfig.tiny(obs_dim=3, action_dim=2, image_keys=("cam",), image_shape=(21, 21, 3))
    from cupid_engine.policies.transformer import TransformerPolicyConfig

    return TransformerPolicyConfig.tiny(obs_dim=3, action_dim=2, image_keys=("cam",), image_shape=(21, 21, 3),
                                        patch_size=7)


@pytest.mark.parametrize("kind", ["diffusion-image", "transformer"])
def test_every_parameter_hook_featurised_and_exact(kind):
    torch.manual_seed(0)
    policy = build_policy(_config(kind))
    batch = policy.build_batch(_episodes())
    policy = policy.double()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    f = Featurizer(policy, "square", ProjectionConfig(k=64, seed=1), draws=2, seed=3)
    assert f.untracked == {} and f.num_tracked == sum(p.numel() for p in policy.parameters())
    got = f(batch)
    want = explicit_sketch(policy, policy, batch, "square", k=64, seed=1, draws=2, noise_seed=3)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    kinds = {type(m).__name__ for _, m in f.modules}
    assert {"Conv2d", "GroupNorm"} <= kinds if kind == "diffusion-image" else {"Embedding", "LayerNorm"} <= kinds
