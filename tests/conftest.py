"""Shared fixtures: every test is seeded, and scratch data lives in tmp_path."""

from __future__ import annotations

import os
import random
from pathlib import Path

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


# Test folders whose tests run with one torch intra-op thread. Their models are tiny, so
# extra threads only add synchronisation: on the shared 2-core machine two threads made
# tiny models (DDIM sampling, subset trainings) ~50x slower than one.
ONE_THREAD_DIRS = frozenset({"cli", "datamodels", "distributed", "featurize", "policies"})
_TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _one_thread(request):
    """One torch intra-op thread for the tests under :data:`ONE_THREAD_DIRS` (restored after)."""
    parts = Path(request.path).resolve().relative_to(_TESTS).parts
    if len(parts) < 2 or parts[0] not in ONE_THREAD_DIRS:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(12345)
