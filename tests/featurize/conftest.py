"""Fixtures for featuriser tests: tiny policies and episodes (one intra-op thread: tests/conftest.py)."""

from __future__ import annotations

import pytest

from fz_helpers import make_episodes


@pytest.fixture
def episodes():
    return make_episodes()
