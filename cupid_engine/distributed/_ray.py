"""Starting or joining Ray, shared by every distributed entry point."""

from __future__ import annotations

import collections
import logging
import os
import pathlib
import time
from typing import Any, Callable

# Environment of every actor process: cupid_engine importable from a source checkout
# that is only on the driver's sys.path, no Ray auth token under $HOME, no MuJoCo
# renderer, and passive OpenMP waiting (see cupid_engine/__init__.py).
_ACTOR_ENV = {"RAY_AUTH_MODE": "disabled", "MUJOCO_GL": "disable", "OMP_WAIT_POLICY": "PASSIVE",
              "MKL_CBWR": os.environ.get("MKL_CBWR", "AUTO,STRICT")}


# Variables that carry object-store endpoints and credentials: forwarded from the
# driver's environment to every worker (Ray workers on other nodes do not inherit it).
_CREDENTIAL_PREFIXES = ("AWS_", "FSSPEC_", "GOOGLE_", "GCSFS_", "AZURE_STORAGE_")


def credentials_env(*urls: Any) -> dict[str, str]:
    """The driver's object-store variables (``AWS_*``, ``FSSPEC_*``, ``GOOGLE_*`` ...).

    ``FSSPEC_<PROTOCOL>`` holds the ``--storage-options`` of this process
    (``store.options.apply_storage_options``), so workers open ``s3://`` URLs with the same
    endpoint and credentials. Values are secrets: never logged.
    """
    return {k: v for k, v in os.environ.items() if k.startswith(_CREDENTIAL_PREFIXES)}


def ensure_ray(address: str | None, workers: int, env: dict[str, str] | None = None) -> bool:
    """Start a local Ray instance with ``workers`` CPUs, or join ``address``.

    Args:
        address: Cluster address (None: start a local instance).
        workers: CPUs of a local instance.
        env: Extra environment variables of every worker (the Ray ``runtime_env``), e.g.
            :func:`credentials_env`; the driver's are always forwarded.

    Returns:
        True when this call started Ray (so the caller should shut it down), False
        when Ray was already initialised in this process (its runtime_env stays; a
        caller that needs credentials there must have passed them when starting it).
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if ray.is_initialized():
        return False
    root = str(pathlib.Path(__file__).resolve().parents[2])
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    runtime_env = {"env_vars": {**credentials_env(), **(env or {}), "PYTHONPATH": pythonpath, **_ACTOR_ENV}}
    if address is None:
        ray.init(num_cpus=max(1, int(workers)), include_dashboard=False, runtime_env=runtime_env, log_to_driver=False)
    else:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    return True


# Errors that mean "the worker (or its node) is gone", not "the task is wrong": the item
# goes back to the queue and runs on a surviving worker.
def _lost_worker_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex

    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError",
             "ObjectLostError", "OwnerDiedError", "LocalRayletDiedError", "ActorUnschedulableError")
    return tuple(getattr(rex, n) for n in names if hasattr(rex, n))


def resources_message(per_worker: dict[str, float]) -> str:
    """``needs {...} per worker; cluster has {...} in total, {...} free, N node(s) alive``."""
    import ray

    def fmt(res: dict[str, float]) -> str:
        keys = sorted(set(per_worker) | {"CPU"})
        return "{" + ", ".join(f"{k}: {res.get(k, 0):g}" for k in keys) + "}"

    try:
        alive = sum(1 for n in ray.nodes() if n.get("Alive"))
        return (f"needs {fmt(per_worker)} per worker; the cluster has {fmt(ray.cluster_resources())} in total, "
                f"{fmt(ray.available_resources())} free, {alive} node(s) alive")
    except Exception as exc:  # the message must not hide the original problem
        return f"needs {fmt(per_worker)} per worker (cluster resources unavailable: {exc})"


def pool_size(requested: int, items: int, per_worker: dict[str, float]) -> int:
    """Workers to start: ``requested``, capped by the items and by what the cluster can hold.

    A pool larger than the cluster's resources would leave actors pending forever (Ray
    queues them silently); the cap is logged.
    """
    import ray

    total = ray.cluster_resources()
    fit = min((int(total.get(k, 0) // v) for k, v in per_worker.items() if v > 0), default=requested)
    n = max(1, min(int(requested), int(items), fit if fit > 0 else 1))
    if fit < min(int(requested), int(items)):
        logging.getLogger(__name__).warning(
            "the cluster holds %d worker(s) of %s (has %s): starting %d instead of %d",
            fit, per_worker, {k: total.get(k, 0) for k in per_worker}, n, requested,
        )
    return n


class WorkerPool:
    """Run items on a pool of Ray actors that may die; items are tasks, not actor-pinned.

    The driver keeps the queue. An item whose actor (or node) is lost goes back to the
    queue and runs on a survivor; a lost actor is replaced while ``max_restarts`` allows
    and the cluster has room. Actors that cannot be placed within ``start_timeout``
    seconds never block the work: the pool runs with those that started, and only when
    none is left does it raise, naming the resources the cluster lacks.

    Args:
        make_actor: ``make_actor() -> handle`` creates one actor (not yet started).
        ready: ``ready(handle) -> ObjectRef`` of a cheap call that returns once the actor
            runs (its ``info``), resolving to a dict.
        submit: ``submit(handle, item) -> ObjectRef`` of one item.
        per_worker: Resources one actor asks for (error messages).
        max_retries: Times an item may be re-queued after losing its worker; beyond that
            the run fails with one line naming the items.
        max_restarts: Replacement actors started in total over the run.
        start_timeout: Seconds to wait for at least one actor to run.
        in_flight: Items queued per actor.
    """

    START_GRACE = 10.0
    """Seconds the other actors get to start once the first one runs."""

    def __init__(self, make_actor: Callable[[], Any], ready: Callable[[Any], Any], submit: Callable[[Any, Any], Any], *,
                 per_worker: dict[str, float], max_retries: int = 3, max_restarts: int = 3,
                 start_timeout: float = 120.0, in_flight: int = 2) -> None:
        self.make_actor, self.ready, self.submit = make_actor, ready, submit
        self.per_worker = dict(per_worker)
        self.max_retries, self.restarts_left = int(max_retries), int(max_restarts)
        self.start_timeout, self.in_flight = float(start_timeout), max(1, int(in_flight))
        self.starting: dict[Any, tuple[Any, float]] = {}  # info ref -> (actor, created at)
        self.actors: dict[Any, dict[str, Any]] = {}  # actor -> info
        self.lost: list[dict[str, Any]] = []  # infos of actors that died
        self.start_errors: list[str] = []  # why actors failed to start (import errors, ...)
        self.log = logging.getLogger(__name__)

    def start(self, n: int, on_started: Callable[[list[dict[str, Any]]], None] | None = None) -> None:
        """Create ``n`` actors and wait (bounded) for the first to run; then up to
        ``start_timeout`` for the others, continuing without those that cannot be placed."""
        import ray

        for _ in range(n):
            self._spawn()
        deadline = time.monotonic() + self.start_timeout
        while self.starting and time.monotonic() < deadline:
            ready, _ = ray.wait(list(self.starting), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            for ref in ready:
                if self._started(ref) and len(self.actors) == 1:
                    # One runs: the others get a short grace period, not the full timeout (an
                    # actor the cluster cannot place would pend forever); late ones join the
                    # pool from run() as they start.
                    deadline = min(deadline, time.monotonic() + self.START_GRACE)
        if not self.actors and self.start_errors:
            self.shutdown()
            raise RuntimeError(f"Ray workers failed to start: {self.start_errors[-1]}")
        if not self.actors:
            self.shutdown()
            raise TimeoutError(f"no Ray worker started within {self.start_timeout:g} s: each "
                               f"{resources_message(self.per_worker)}")
        if self.starting:
            self.log.warning("%d of %d worker(s) not started yet (%s); continuing with %d",
                             len(self.starting), n, resources_message(self.per_worker), len(self.actors))
        if on_started is not None:
            on_started(list(self.actors.values()))

    def _spawn(self) -> None:
        actor = self.make_actor()
        self.starting[self.ready(actor)] = (actor, time.monotonic())

    def _started(self, ref: Any) -> bool:
        import ray

        actor, _ = self.starting.pop(ref)
        try:
            self.actors[actor] = ray.get(ref)
            return True
        except _lost_worker_errors() as exc:
            self.start_errors.append(_one_line(exc))
            self.log.warning("a worker died while starting: %s", self.start_errors[-1])
            self._kill(actor)
            return False

    def _kill(self, actor: Any) -> None:
        import ray

        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already gone
            pass

    def run(self, items: list[Any], on_result: Callable[[Any, Any], None]) -> None:
        """Run every item once (to success); ``on_result(item, value)`` in completion order.

        Raises:
            RuntimeError: items lost their worker more than ``max_retries`` times, or every
                worker died and no replacement could be placed; a task's own error (bad
                data, a bug) is re-raised at once, naming the item.
        """
        import ray

        lost_errors = _lost_worker_errors()
        queue = collections.deque(items)
        running: dict[Any, tuple[Any, Any]] = {}  # task ref -> (actor, item)
        load: dict[Any, int] = {a: 0 for a in self.actors}
        failures: collections.Counter = collections.Counter()
        failed: list[Any] = []
        last_error = ""
        stalled_since: float | None = None
        while queue or running:
            for actor in list(self.actors):
                while queue and load.get(actor, 0) < self.in_flight:
                    item = queue.popleft()
                    running[self.submit(actor, item)] = (actor, item)
                    load[actor] = load.get(actor, 0) + 1
            if not running:
                if not self.starting:
                    if self.restarts_left > 0:
                        self.restarts_left -= 1
                        self._spawn()
                    else:
                        raise RuntimeError(
                            f"every Ray worker died and no restart is left: items {sorted(queue)} not done "
                            f"(last error: {last_error}); {resources_message(self.per_worker)}")
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > self.start_timeout:
                    raise TimeoutError(
                        f"no Ray worker could be (re)started within {self.start_timeout:g} s for items "
                        f"{sorted(queue)}: each {resources_message(self.per_worker)}")
            else:
                stalled_since = None
            waiting = list(running) + list(self.starting)
            ready, _ = ray.wait(waiting, num_returns=1, timeout=5.0)
            for ref in ready:
                if ref in self.starting:
                    if self._started(ref):
                        load[next(reversed(self.actors))] = 0
                    continue
                actor, item = running.pop(ref)
                load[actor] = load.get(actor, 1) - 1
                try:
                    value = ray.get(ref)
                except lost_errors as exc:
                    last_error = _one_line(exc)
                    failures[item] += 1
                    if actor in self.actors:  # first failure seen from this actor: replace it
                        info = self.actors.pop(actor)
                        self.lost.append(info)
                        load.pop(actor, None)
                        self.log.warning("worker %s on %s lost (%s); re-queueing its items", info.get("pid"),
                                         info.get("host"), last_error)
                        self._kill(actor)
                        if self.restarts_left > 0:
                            self.restarts_left -= 1
                            self._spawn()
                    if failures[item] > self.max_retries:
                        failed.append(item)
                    else:
                        queue.append(item)
                    continue
                except ray.exceptions.RayTaskError as exc:
                    self.shutdown()
                    raise RuntimeError(f"item {item!r} failed: {_one_line(exc.cause if exc.cause else exc)}") from exc
                on_result(item, value)
            if failed:
                self.shutdown()
                raise RuntimeError(
                    f"items {sorted(failed)} lost their worker {self.max_retries + 1} times; giving up "
                    f"(last error: {last_error})")

    def infos(self) -> list[dict[str, Any]]:
        """Fresh ``info()`` of every live actor (peak RSS at the end of the run)."""
        import ray

        refs = {self.ready(a): a for a in self.actors}
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=30.0)
        out = []
        for ref in done:
            try:
                out.append(ray.get(ref))
            except Exception:
                pass
        return out

    def shutdown(self) -> None:
        for actor in list(self.actors) + [a for a, _ in self.starting.values()]:
            self._kill(actor)
        self.actors.clear()
        self.starting.clear()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = next((line for line in text if line.strip()), type(exc).__name__)
    return f"{type(exc).__name__}: {first[:300]}"
