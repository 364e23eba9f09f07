"""Policy rollouts with success labels, in-process or on Ray actors.

A rollout is a pure function of ``(task, policy, variation, horizon, episode seed)``: the
episode seed is split into the environment reset seed and the seed of the policy's
sampling generator, so the same seed gives the same episode in any worker, in any order,
with 1 or W workers. :func:`run_rollouts` derives episode ``i``'s seed from
``(seed, i)`` and returns episodes ordered by ``i``.

Policies are duck-typed: anything with ``predict_action(obs_window [n_obs, D], *,
generator=None) -> [n_action_steps, A]`` (unnormalised actions) and, optionally, a
``config`` with ``n_obs_steps`` and ``obs_keys``. The policy may be given as

* a checkpoint path, loaded with ``cupid_engine.policies.checkpoint.load_policy`` once per
  worker (the only form that crosses process boundaries for trained policies: a model is
  never pickled);
* a zero-argument callable (a picklable factory, e.g. ``functools.partial``) called once per
  worker;
* a policy object (in-process only).

Policies without ``config.obs_keys`` get the task's keys in sorted order (the
``Episode.obs_vector`` default they were trained with); the window is padded at the start
by repeating the first observation.

**Your own environment** (``env=`` here, ``cupid-engine rollout --env module:factory``):
a zero-argument factory (or ``"package.module:factory"``) returning an object with

* ``obs_keys``: the ordered observation keys (tuple of str);
* ``reset(seed: int) -> dict[str, array]``: start an episode that depends only on
  ``seed``; returns the observation (each key a 1-D array);
* ``step(action [A]) -> (obs dict, reward: float, success: bool)``: the per-step success
  criterion; with ``success_mode`` ``any``/``final`` the episode's success is any step's /
  the last step's, with ``first`` the episode stops at the first successful step;
* optional ``action_dim`` (default 7), ``knobs`` (dict stored in the metadata), ``close()``.

The generator handed to ``predict_action`` is a ``torch.Generator`` for torch modules, the
result of ``policy.make_generator(seed)`` where defined, else a
``numpy.random.Generator``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cupid_engine.data.episode import Episode
from cupid_engine.sim.tasks import ACTION_DIM, CONTROL_FREQ, OBS_KEYS, SimEnv, Variation, canonical_task

logger = logging.getLogger(__name__)

PolicyLike = Any
"""A checkpoint path, a zero-argument policy factory, or a policy object."""


def resolve_policy(policy: PolicyLike) -> Any:
    """Turn a path, factory or object into a policy object (loading a path once)."""
    if hasattr(policy, "predict_action"):
        return policy
    if isinstance(policy, (str, os.PathLike)):
        from cupid_engine.policies.checkpoint import load_policy

        return load_policy(policy)
    if callable(policy):
        obj = policy()
        if not hasattr(obj, "predict_action"):
            raise TypeError(f"policy factory {policy!r} returned {type(obj).__name__} without predict_action")
        return obj
    raise TypeError(
        f"policy must be a checkpoint path, a zero-argument factory or an object with "
        f"predict_action, got {type(policy).__name__}"
    )


def episode_seed(seed: int, index: int) -> int:
    """Seed of rollout ``index`` under base seed ``seed`` (63-bit int)."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


def _make_generator(policy: Any, seed: int) -> Any:
    if hasattr(policy, "make_generator"):
        return policy.make_generator(seed)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(policy, torch.nn.Module):
        return torch.Generator().manual_seed(int(seed))
    return np.random.default_rng(seed)


class RolloutWorker:
    """One environment and one policy, loaded once, running seeded episodes.

    Args:
        task: ``lift``, ``can`` or ``square`` (robosuite names accepted).
        policy: Checkpoint path, zero-argument factory or policy object.
        horizon: Step limit per episode.
        variation: Per-episode environment knob ranges.
        source: ``Episode.source`` of the rollouts (default ``rollout:{task}``).
        success_mode: ``first`` (stop at the first successful step, the default),
            ``any`` (run to the horizon; success if any step succeeded) or ``final`` (run
            to the horizon; success of the last step), see
            :data:`cupid_engine.sim.scenarios.SUCCESS_MODES`.
    """

    def __init__(
        self,
        task: str,
        policy: PolicyLike,
        *,
        horizon: int,
        variation: Variation | None = None,
        source: str | None = None,
        success_mode: str = "first",
        env: Any = None,
    ):
        from cupid_engine.sim.scenarios import SUCCESS_MODES

        self.task = canonical_task(task) if env is None else str(task)
        self.horizon = int(horizon)
        if self.horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        if env is not None and variation is not None:
            raise ValueError("variation applies to the built-in tasks only; configure your own env in its factory")
        if success_mode not in SUCCESS_MODES:
            raise ValueError(f"success_mode must be one of {SUCCESS_MODES}, got {success_mode!r}")
        self.success_mode = success_mode
        self.policy = resolve_policy(policy)
        self.env = SimEnv(self.task, variation=variation, horizon=self.horizon) if env is None else make_user_env(env)
        self.action_dim = int(getattr(self.env, "action_dim", ACTION_DIM))
        cfg = getattr(self.policy, "config", None)
        self.n_obs_steps = int(getattr(cfg, "n_obs_steps", 1) or 1)
        keys = getattr(cfg, "obs_keys", None)
        # A policy without explicit keys was trained on Episode.obs_vector's default:
        # the sorted observation keys.
        self.obs_keys = tuple(keys) if keys else tuple(sorted(self.env.obs_keys))
        missing = [k for k in self.obs_keys if k not in self.env.obs_keys]
        if missing:
            raise ValueError(
                f"policy obs_keys {missing} are not in task {self.task!r}'s observation "
                f"vector {self.env.obs_keys}"
            )
        if env is None:
            dim = sum(d for k, d in OBS_KEYS[self.task] if k in self.obs_keys)
        else:  # a user env declares keys, not widths: read them off one observation
            first = self.env.reset(0)
            dim = sum(int(np.asarray(first[k]).size) for k in self.obs_keys)
        want = int(getattr(cfg, "obs_dim", 0) or 0)
        if want and want != dim:
            raise ValueError(
                f"policy expects obs_dim {want} but keys {self.obs_keys} give {dim} on task {self.task!r}"
            )
        self.source = source or f"rollout:{self.task}"

    def run(self, episode_seeds: Sequence[int], episode_ids: Sequence[str] | None = None) -> list[Episode]:
        """Run one episode per seed (ids default to ``{task}_rollout_s{seed}``)."""
        if episode_ids is None:
            episode_ids = [f"{self.task}_rollout_s{int(s)}" for s in episode_seeds]
        if len(episode_ids) != len(episode_seeds):
            raise ValueError("episode_ids and episode_seeds differ in length")
        return [self.run_one(s, i) for s, i in zip(episode_seeds, episode_ids)]

    def run_one(self, seed: int, episode_id: str) -> Episode:
        """Run one episode from ``seed``; it stops at the horizon (or the first success
        when ``success_mode`` is ``first``)."""
        env_ss, policy_ss = np.random.SeedSequence(int(seed)).spawn(2)
        obs = self.env.reset(int(env_ss.generate_state(1)[0]))
        generator = _make_generator(self.policy, int(policy_ss.generate_state(1)[0]))
        env_keys = self.env.obs_keys
        rows: dict[str, list[np.ndarray]] = {k: [] for k in env_keys}
        # Window of past observation vectors; padded at the start with the first one
        # (as diffusion_policy and robomimic do).
        window = [np.concatenate([obs[k] for k in self.obs_keys])] * self.n_obs_steps
        actions: list[np.ndarray] = []
        success, reward_sum, queries, t = False, 0.0, 0, 0
        stop_early = self.success_mode == "first"
        ever = False
        while t < self.horizon and not (success and stop_early):
            chunk = np.asarray(self.policy.predict_action(np.stack(window), generator=generator), np.float32)
            queries += 1
            if chunk.ndim == 1:
                chunk = chunk[None]
            if chunk.ndim != 2 or chunk.shape[1] != self.action_dim or len(chunk) == 0:
                raise ValueError(
                    f"episode {episode_id!r}: policy returned actions of shape {chunk.shape}, "
                    f"expected [n_action_steps, {self.action_dim}]"
                )
            for action in chunk:
                if t >= self.horizon or (success and stop_early):
                    break
                for k in env_keys:
                    rows[k].append(obs[k])
                actions.append(action)
                obs, reward, success = self.env.step(action)
                reward_sum += reward
                ever = ever or success
                t += 1
                window = window[1:] + [np.concatenate([obs[k] for k in self.obs_keys])]
        if self.success_mode == "any":
            success = ever
        return Episode(
            episode_id=episode_id,
            observations={k: np.stack(v) for k, v in rows.items()},
            actions=np.stack(actions),
            split="rollout",
            source=self.source,
            task=self.task,
            success=bool(success),
            return_=1.0 if success else 0.0,
            tier=None,
            metadata={
                "episode_seed": int(seed),
                "horizon": self.horizon,
                "fps": CONTROL_FREQ,
                "obs_keys": list(env_keys),
                "policy_obs_keys": list(self.obs_keys),
                "n_obs_steps": self.n_obs_steps,
                "policy_queries": queries,
                "env_knobs": dict(getattr(self.env, "knobs", {}) or {}),
                "reward_sum": float(reward_sum),
                "success_mode": self.success_mode,
            },
        )

    def close(self) -> None:
        """Release the simulation."""
        if hasattr(self.env, "close"):
            self.env.close()


def make_user_env(factory: Any) -> Any:
    """Build a user environment from a factory or a ``"module:factory"`` string and check
    the protocol (see the module docstring).

    Raises:
        ValueError: A bad spec, or an object missing ``obs_keys``/``reset``/``step``.
    """
    if isinstance(factory, str):
        import importlib

        mod, sep, name = factory.partition(":")
        if not sep or not mod or not name:
            raise ValueError(f"env must be 'module:factory', got {factory!r}")
        try:
            factory = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot load env factory {mod}:{name} ({e})") from None
    env = factory()
    missing = [a for a in ("obs_keys", "reset", "step") if not hasattr(env, a)]
    if missing:
        raise ValueError(f"env from {factory!r} lacks {missing} (needs obs_keys, reset(seed), step(action))")
    return env


def run_rollouts(
    policy: PolicyLike,
    task: str,
    *,
    episodes: int,
    seed: int = 0,
    workers: int = 1,
    horizon: int | None = None,
    variation: Variation | None = None,
    address: str | None = None,
    progress: Callable[[Episode], None] | None = None,
    success_mode: str = "first",
    env: Any = None,
) -> list[Episode]:
    """Roll a policy out for ``episodes`` seeded episodes.

    Args:
        policy: Checkpoint path, zero-argument factory or policy object (objects only
            with ``workers == 1``: models are never pickled to workers).
        task: ``lift``, ``can`` or ``square``.
        episodes: Number of episodes M.
        seed: Base seed; episode ``i`` uses :func:`episode_seed(seed, i) <episode_seed>`.
        workers: 1 runs in this process; W > 1 runs W Ray actors
            (:mod:`cupid_engine.distributed.rollouts`).
        horizon: Step limit (default per task, ``generate.DEFAULT_HORIZON``).
        variation: Per-episode environment knob ranges.
        address: Ray cluster address to join (default: a local Ray instance).
        progress: Called with each finished episode (in completion order).
        success_mode: ``first``, ``any`` or ``final`` (see :class:`RolloutWorker`); only
            ``first`` with ``workers > 1`` (the Ray actors build default workers).
        env: Your own environment: a factory or ``"module:factory"`` (protocol in the
            module docstring; in-process only); ``task`` is then just a name.

    Returns:
        ``episodes`` episodes with ids ``{task}_rollout_{i:04d}``, ordered by ``i``;
        identical for any ``workers``.
    """
    from cupid_engine.sim.generate import DEFAULT_HORIZON

    task = canonical_task(task) if env is None else str(task)
    if episodes < 0:
        raise ValueError(f"episodes must be >= 0, got {episodes}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if env is not None and not horizon:
        raise ValueError("a user env needs an explicit horizon")
    horizon = int(horizon or DEFAULT_HORIZON[task])
    seeds = [episode_seed(seed, i) for i in range(episodes)]
    ids = [f"{task}_rollout_{i:04d}" for i in range(episodes)]
    if workers == 1 and address is None:
        worker = RolloutWorker(
            task, policy, horizon=horizon, variation=variation, success_mode=success_mode, env=env
        )
        out = []
        try:
            for s, i in zip(seeds, ids):
                ep = worker.run_one(s, i)
                out.append(ep)
                if progress is not None:
                    progress(ep)
        finally:
            worker.close()
        return out
    if success_mode != "first" or env is not None:
        raise ValueError(
            f"success_mode={success_mode!r} / a user env run in-process only (workers=1); the Ray "
            "rollout actors (cupid_engine.distributed.rollouts) build built-in tasks that stop at the first success"
        )
    if hasattr(policy, "predict_action"):
        raise TypeError(
            "workers > 1 needs a checkpoint path or a picklable zero-argument factory; "
            "policy objects are not shipped to Ray actors"
        )
    from cupid_engine.distributed.rollouts import run_rollouts_ray

    return run_rollouts_ray(
        policy,
        task,
        seeds=seeds,
        episode_ids=ids,
        workers=workers,
        horizon=horizon,
        variation=variation,
        address=address,
        progress=progress,
    )
