"""Shared fixtures: every test is seeded, and scratch data lives in tmp_path."""

from __future__ import annotations

import os
import random

# Before torch starts its OpenMP runtime (see cupid_engine/__init__.py for why).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
import torch

# Ray writes an auth token under $HOME unless told not to; tests never need it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(12345)
