"""Fixtures for the Ray featurisation tests: a tiny policy checkpoint, a synthetic source."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def checkpoint(tmp_path):
    from cupid_engine.policies import MLPPolicy, MLPPolicyConfig, save_policy

    torch.manual_seed(0)
    policy = MLPPolicy(MLPPolicyConfig.tiny(obs_dim=6, action_dim=2))
    return str(save_policy(policy, tmp_path / "policy"))
