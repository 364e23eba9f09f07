"""Fixtures for datamodel tests: one intra-op thread per test."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models on shared cores: extra intra-op threads only add synchronisation
    # (two threads made tiny models ~50x slower on the shared 2-core machine).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

