"""Starting or joining Ray, shared by every distributed entry point."""

from __future__ import annotations

import os
import pathlib

# Environment of every actor process: cupid_engine importable from a source checkout
# that is only on the driver's sys.path, no Ray auth token under $HOME, no MuJoCo
# renderer, and passive OpenMP waiting (see cupid_engine/__init__.py).
_ACTOR_ENV = {"RAY_AUTH_MODE": "disabled", "MUJOCO_GL": "disable", "OMP_WAIT_POLICY": "PASSIVE"}


def ensure_ray(address: str | None, workers: int) -> bool:
    """Start a local Ray instance with ``workers`` CPUs, or join ``address``.

    Returns:
        True when this call started Ray (so the caller should shut it down), False
        when Ray was already initialised in this process.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if ray.is_initialized():
        return False
    root = str(pathlib.Path(__file__).resolve().parents[2])
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    runtime_env = {"env_vars": {"PYTHONPATH": pythonpath, **_ACTOR_ENV}}
    if address is None:
        ray.init(num_cpus=max(1, int(workers)), include_dashboard=False, runtime_env=runtime_env, log_to_driver=False)
    else:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    return True
