"""Fixtures for the robosuite tests: one environment per task per session (make ≈ 1 s)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MUJOCO_GL", "disable")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

_ENVS: dict = {}


@pytest.fixture(scope="session")
def sim_env():
    """``sim_env(task)`` -> a shared, reusable SimEnv (stock variation)."""
    pytest.importorskip("robosuite")
    from cupid_engine.sim.tasks import SimEnv

    def get(task: str) -> SimEnv:
        if task not in _ENVS:
            _ENVS[task] = SimEnv(task)
        return _ENVS[task]

    yield get
    for env in _ENVS.values():
        env.close()
    _ENVS.clear()

