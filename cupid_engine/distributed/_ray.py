"""Starting or joining Ray, shared by every distributed entry point."""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable

# Environment of every actor process: cupid_engine importable from a source checkout
# that is only on the driver's sys.path, no Ray auth token under $HOME, no MuJoCo
# renderer, and passive OpenMP waiting (see cupid_engine/__init__.py).
_ACTOR_ENV = {"RAY_AUTH_MODE": "disabled", "MUJOCO_GL": "disable", "OMP_WAIT_POLICY": "PASSIVE",
              "MKL_CBWR": os.environ.get("MKL_CBWR", "AUTO,STRICT")}


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


def run_on_actors(
    actors: list[Any],
    n_items: int,
    call: Callable[[Any, int], Any],
    *,
    on_result: Callable[[int, Any], None] | None = None,
) -> list[Any]:
    """Run items ``0 .. n_items-1`` on a pool of actors, one item per actor at a time.

    Args:
        actors: Ray actor handles.
        n_items: Number of items.
        call: ``call(actor, i)`` submits item ``i`` and returns an ObjectRef resolving
            to ``(i, value)``.
        on_result: Called with ``(i, value)`` in completion order.

    Returns:
        The values in item order (independent of scheduling). A failed item raises.
    """
    import ray

    results: list[Any] = [None] * n_items
    pending: dict[Any, Any] = {}
    next_index = 0

    def submit(actor: Any) -> None:
        nonlocal next_index
        pending[call(actor, next_index)] = actor
        next_index += 1

    for actor in actors:
        if next_index < n_items:
            submit(actor)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        actor = pending.pop(done[0])
        index, value = ray.get(done[0])  # a failed item raises here, naming its error
        results[index] = value
        if on_result is not None:
            on_result(index, value)
        if next_index < n_items:
            submit(actor)
    return results
