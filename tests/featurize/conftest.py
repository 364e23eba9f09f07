"""Fixtures for featuriser tests: tiny policies and episodes, one intra-op thread."""

from __future__ import annotations

import pytest
import torch

from fz_helpers import make_episodes


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def episodes():
    return make_episodes()
