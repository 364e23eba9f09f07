"""Fixtures for the data tests: small seeded episodes."""

from __future__ import annotations

import pytest

from .helpers import make_episodes


@pytest.fixture
def episodes(rng):
    return make_episodes(rng, 7)
