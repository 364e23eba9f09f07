"""Policy rollouts with success labels, in this process or on an executor's workers.

A rollout is a pure function of ``(task, policy, variation, horizon, episode seed)``: the
episode seed is split into the environment reset seed and the seed of the policy's
sampling generator, so the same seed gives the same episode in any worker, in any order,
with 1 or W workers. :func:`run_rollouts` derives episode ``i``'s seed from
``(seed, i)`` and returns episodes ordered by ``i``; where they run is the caller's
choice of executor (``cupid_engine.executor``: in this process by default, Ray actors with
``cupid_engine.distributed.RayExecutor``), each worker a :class:`RolloutWorker` built once.

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

**Image policies** (a ``config.image_keys``, e.g. ``diffusion-image``): every step the
policy's cameras are rendered live (:class:`~cupid_engine.sim.render.CameraRenderer` at the
config's ``image_shape``), and each query gets the raw batch ``{"obs": [1, n_obs, D],
"image": uint8 [1, n_obs, K, H, W, C]}`` through ``predict_action_batch`` (windows padded at
the start like the low-dim one). The episode keeps every frame it was shown in ``images``
(``camera -> uint8 [T, H, W, 3]``, frame ``t`` before action ``t``). Rendering needs
``MUJOCO_GL=egl`` before mujoco is imported, so :func:`run_rollouts` runs image rollouts of
a checkpoint in the executor's number of spawned processes (with ``MUJOCO_GL=egl``) unless
this process already renders with EGL and the executor is in-process; episodes are the
same either way.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cupid_engine.data.episode import Episode
from cupid_engine.executor import Executor, InProcess, Processes
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
        # Image policies see their cameras rendered live (module docstring).
        self.cameras = tuple(getattr(cfg, "image_keys", None) or ())
        self.renderer = None
        if self.cameras:
            if env is not None:
                raise ValueError("image policies roll out on the built-in tasks only (a user env has no cameras)")
            from cupid_engine.sim.render import CameraRenderer

            shape = tuple(getattr(cfg, "image_shape", ()) or ())
            if len(shape) != 3 or shape[0] != shape[1]:
                raise ValueError(f"image policy config has image_shape {shape}; rollouts render square frames [S, S, 3]")
            try:
                self.renderer = CameraRenderer(self.env, self.cameras, int(shape[0]))
            except BaseException:
                self.env.close()
                raise

    def run(self, episode_seeds: Sequence[int], episode_ids: Sequence[str] | None = None) -> list[Episode]:
        """Run one episode per seed (ids default to ``{task}_rollout_s{seed}``)."""
        if episode_ids is None:
            episode_ids = [f"{self.task}_rollout_s{int(s)}" for s in episode_seeds]
        if len(episode_ids) != len(episode_seeds):
            raise ValueError("episode_ids and episode_seeds differ in length")
        return [self.run_one(s, i) for s, i in zip(episode_seeds, episode_ids)]

    def __call__(self, job: tuple[int, str] | tuple[int, str, int]) -> Episode:
        """``run_one(*job)``: the executor's item is ``(seed, episode_id[, draw])``."""
        return self.run_one(*job)

    def run_one(self, seed: int, episode_id: str, draw: int = 0) -> Episode:
        """Run one episode from ``seed``; it stops at the horizon (or the first success
        when ``success_mode`` is ``first``). Image policies see live frames, which the
        episode keeps in ``images``.

        ``draw`` > 0 keeps the initial state (and the environment's knobs) of ``seed`` and
        gives the policy's sampling generator another seed: repeated draws of a stochastic
        policy from one initial state. ``draw`` 0 is the episode of ``seed`` itself.
        """
        env_ss, policy_ss = np.random.SeedSequence(int(seed)).spawn(2)
        obs = self.env.reset(int(env_ss.generate_state(1)[0]))
        policy_seed = int(policy_ss.generate_state(1)[0])
        if draw:
            policy_seed = int(np.random.SeedSequence([policy_seed, int(draw)]).generate_state(1)[0])
        generator = _make_generator(self.policy, policy_seed)
        env_keys = self.env.obs_keys
        rows: dict[str, list[np.ndarray]] = {k: [] for k in env_keys}
        frames: dict[str, list[np.ndarray]] = {c: [] for c in self.cameras}
        shot = self.renderer() if self.renderer is not None else {}
        # Windows of past observation vectors (and camera frames [K, H, W, 3], cameras in
        # the policy's order); padded at the start with the first one (as diffusion_policy
        # and robomimic do).
        window = [self._obs_vector(obs)] * self.n_obs_steps
        image_window = [self._frame_stack(shot)] * self.n_obs_steps if self.renderer is not None else []
        actions: list[np.ndarray] = []
        success, reward_sum, queries, t = False, 0.0, 0, 0
        stop_early = self.success_mode == "first"
        ever = False
        while t < self.horizon and not (success and stop_early):
            chunk = self._query(window, image_window, generator, episode_id)
            queries += 1
            for action in chunk:
                if t >= self.horizon or (success and stop_early):
                    break
                for k in env_keys:
                    rows[k].append(obs[k])
                for c in self.cameras:
                    frames[c].append(shot[c])
                actions.append(action)
                obs, reward, success = self.env.step(action)
                reward_sum += reward
                ever = ever or success
                t += 1
                window = window[1:] + [self._obs_vector(obs)]
                if self.renderer is not None:
                    shot = self.renderer()
                    image_window = image_window[1:] + [self._frame_stack(shot)]
        if self.success_mode == "any":
            success = ever
        images = render = None
        if self.renderer is not None:
            images = {c: np.stack(v) for c, v in frames.items()}
            render = {"cameras": list(self.cameras), "size": int(self.renderer.size),
                      "renderer": "mujoco.Renderer MUJOCO_GL=egl (live, the policy's input)"}
        return self._episode(episode_id, seed, rows, actions, success, env_keys, queries, reward_sum,
                             images=images, render=render, draw=draw)

    def _obs_vector(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """The policy's observation vector ``[D]`` (its keys, in its order)."""
        return np.concatenate([obs[k] for k in self.obs_keys])

    def _frame_stack(self, shot: dict[str, np.ndarray]) -> np.ndarray:
        """One step's frames ``uint8 [K, H, W, 3]``, cameras in the policy's order."""
        return np.stack([shot[c] for c in self.cameras])

    def _query(self, window: list[np.ndarray], image_window: list[np.ndarray], generator: Any,
               episode_id: str) -> np.ndarray:
        """One policy query: the action chunk ``[n_action_steps, A]`` float32.

        State policies get ``predict_action(obs_window [n_obs, D])``; image policies
        ``predict_action_batch({"obs": [1, n_obs, D], "image": uint8 [1, n_obs, K, H, W, C]})``.

        Raises:
            ValueError: naming the episode, when the chunk is not ``[n_action_steps, A]``.
        """
        if self.renderer is None:
            chunk = np.asarray(self.policy.predict_action(np.stack(window), generator=generator), np.float32)
            if chunk.ndim == 1:
                chunk = chunk[None]
            what, expected = "policy", f"[n_action_steps, {self.action_dim}]"
        else:
            import torch

            batch = {
                "obs": torch.from_numpy(np.stack(window)[None].astype(np.float32)),
                "image": torch.from_numpy(np.stack(image_window)[None]),
            }
            chunk = self.policy.predict_action_batch(batch, generator=generator)
            chunk = np.asarray(chunk.detach().cpu().numpy() if hasattr(chunk, "detach") else chunk, np.float32)
            if chunk.ndim == 3:
                chunk = chunk[0]
            what, expected = "image policy", f"[1, n_action_steps, {self.action_dim}]"
        if chunk.ndim != 2 or chunk.shape[1] != self.action_dim or len(chunk) == 0:
            raise ValueError(
                f"episode {episode_id!r}: {what} returned actions of shape {chunk.shape}, expected {expected}"
            )
        return chunk

    def _episode(self, episode_id: str, seed: int, rows: dict, actions: list, success: bool, env_keys: Any,
                 queries: int, reward_sum: float, *, images: dict | None = None,
                 render: dict | None = None, draw: int = 0) -> Episode:
        """The rollout episode and its metadata (state and image rollouts alike)."""
        metadata = {
            # Episodes with equal ``episode_seed`` start from the same initial state;
            # ``policy_draw`` tells their policy sampling apart (``run_rollouts(repeats=)``).
            "episode_seed": int(seed),
            "policy_draw": int(draw),
            "horizon": self.horizon,
            "fps": CONTROL_FREQ,
            "obs_keys": list(env_keys),
            "policy_obs_keys": list(self.obs_keys),
            "n_obs_steps": self.n_obs_steps,
            "policy_queries": queries,
            "env_knobs": dict(getattr(self.env, "knobs", {}) or {}),
            "reward_sum": float(reward_sum),
            "success_mode": self.success_mode,
        }
        if render is not None:
            metadata["render"] = render
        return Episode(
            episode_id=episode_id,
            observations={k: np.stack(v) for k, v in rows.items()},
            actions=np.stack(actions),
            images=images or {},
            split="rollout",
            source=self.source,
            task=self.task,
            success=bool(success),
            return_=1.0 if success else 0.0,
            tier=None,
            metadata=metadata,
        )

    def close(self) -> None:
        """Release the renderer and the simulation."""
        if getattr(self, "renderer", None) is not None:
            self.renderer.close()
            self.renderer = None
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
    executor: Executor | None = None,
    horizon: int | None = None,
    variation: Variation | None = None,
    progress: Callable[[Episode], None] | None = None,
    success_mode: str = "first",
    env: Any = None,
    repeats: int = 1,
) -> list[Episode]:
    """Roll a policy out for ``episodes`` seeded episodes.

    Args:
        policy: Checkpoint path, zero-argument factory or policy object (objects only
            with an in-process executor: models are never pickled to workers).
        task: ``lift``, ``can`` or ``square``.
        episodes: Number of episodes M.
        seed: Base seed; episode ``i`` uses :func:`episode_seed(seed, i) <episode_seed>`.
        executor: Where episodes run (``cupid_engine.executor``; default in this
            process); ``cupid_engine.distributed.executor_for(W, address)`` gives W Ray
            actors. Image policies (module docstring) run in ``executor.workers`` spawned
            rendering processes on this machine instead (in this process when it renders
            with EGL and the executor is in-process).
        horizon: Step limit (default per task, ``generate.DEFAULT_HORIZON``).
        variation: Per-episode environment knob ranges.
        progress: Called with each finished episode (in completion order).
        success_mode: ``first``, ``any`` or ``final`` (see :class:`RolloutWorker`).
        env: Your own environment: a factory or ``"module:factory"`` (protocol in the
            module docstring); ``task`` is then just a name. Out of this process the
            factory is pickled to every worker: give a ``"module:factory"`` string or a
            module-level callable that the workers can import.
        repeats: Policy draws per initial state R. Episode ``i`` starts from initial
            state ``i // R`` (seed :func:`episode_seed(seed, i // R) <episode_seed>`)
            with policy draw ``i % R``; so ``episodes`` must be a multiple of R. With
            R = 1 (default) every episode has its own initial state, as before. Repeated
            draws let the ``cupid`` scorer's ``baseline="initial-state"`` contrast
            successes and failures from the same start.

    Returns:
        ``episodes`` episodes with ids ``{task}_rollout_{i:04d}``, ordered by ``i``;
        identical for any executor.
    """
    from cupid_engine.sim.generate import DEFAULT_HORIZON

    task = canonical_task(task) if env is None else str(task)
    if episodes < 0:
        raise ValueError(f"episodes must be >= 0, got {episodes}")
    repeats = int(repeats)
    if repeats < 1 or episodes % repeats:
        raise ValueError(f"repeats must be >= 1 and divide episodes ({episodes}), got {repeats}")
    executor = executor or InProcess()
    if env is not None and not horizon:
        raise ValueError("a user env needs an explicit horizon")
    horizon = int(horizon or DEFAULT_HORIZON[task])
    seeds = [episode_seed(seed, i // repeats) for i in range(episodes)]
    ids = [f"{task}_rollout_{i:04d}" for i in range(episodes)]
    jobs = [(s, e, i % repeats) for i, (s, e) in enumerate(zip(seeds, ids))]
    cameras = policy_cameras(policy)
    # Image policies render in spawned EGL processes unless this process renders and runs them.
    rendering = bool(cameras) and (not executor.in_process or not _renders_here())
    if rendering:
        if not executor.local or env is not None:
            raise ValueError("image policies roll out on local processes and the built-in tasks "
                             f"(not on {executor!r}, no env=)")
        if hasattr(policy, "predict_action"):
            raise TypeError(
                f"image policy (cameras {list(cameras)}) objects roll out in-process only, which needs MUJOCO_GL=egl "
                "set before mujoco is first imported (this process cannot render) and the in-process executor; "
                "pass a checkpoint path to roll out in spawned rendering processes"
            )
    elif not executor.in_process and hasattr(policy, "predict_action"):
        raise TypeError(
            f"{executor!r} needs a checkpoint path or a picklable zero-argument factory; "
            "policy objects are not shipped to workers"
        )
    if isinstance(policy, os.PathLike):
        policy = os.fspath(policy)
    factory = functools.partial(
        RolloutWorker, task, policy, horizon=horizon, variation=variation, success_mode=success_mode, env=env
    )
    if rendering:
        executor, factory = _rendering_processes(executor.workers, factory)
    return executor.map(
        factory, jobs, on_result=None if progress is None else (lambda job, ep: progress(ep))
    )


def policy_cameras(policy: PolicyLike) -> tuple[str, ...]:
    """Camera keys an image policy reads (``config.image_keys``); ``()`` for state policies.

    Checkpoint paths are judged from their ``config.json`` without loading the model;
    factories are not called here (an image policy from a factory rolls out in-process).
    """
    if hasattr(policy, "predict_action"):
        return tuple(getattr(getattr(policy, "config", None), "image_keys", None) or ())
    if isinstance(policy, (str, os.PathLike)):
        import json
        from pathlib import Path

        from cupid_engine.policies.checkpoint import CONFIG_FILE

        cfg_path = Path(policy) / CONFIG_FILE
        if not cfg_path.is_file():
            return ()  # load_policy names what is missing when the worker loads it
        try:
            meta = json.loads(cfg_path.read_text())
        except ValueError:
            return ()  # likewise: load_policy raises naming the file
        keys = (meta.get("policy_config") or {}).get("image_keys") if isinstance(meta, dict) else None
        return tuple(keys or ())
    return ()


def _renders_here() -> bool:
    """Whether this process can create an offscreen renderer (mujoco imported with a GL backend)."""
    mj = sys.modules.get("mujoco")
    if mj is not None:
        # robosuite rewrites MUJOCO_GL after mujoco read it, so ask mujoco, not the variable.
        return hasattr(mj, "GLContext")
    return os.environ.get("MUJOCO_GL", "").lower() in ("egl", "osmesa")


def _one_thread_worker(factory: Callable[[], RolloutWorker]) -> RolloutWorker:
    """The worker of a spawned rendering process (``MUJOCO_GL=egl`` is set before it is built)."""
    import torch

    # Parallelism is across processes; one thread each also makes the policy's float
    # arithmetic (hence the episode) independent of the number of workers.
    torch.set_num_threads(1)
    return factory()


def _rendering_processes(workers: int, factory: Callable[[], RolloutWorker]) -> tuple[Executor, Callable[[], Any]]:
    """The executor and worker factory of image rollouts: ``workers`` spawned processes of
    this machine that render with EGL, one torch thread each."""
    from cupid_engine.sim.render import check_egl

    check_egl()
    # MUJOCO_GL must be set before the process's first mujoco import (render.CameraRenderer).
    process_env = {"MUJOCO_GL": "egl", "PYOPENGL_PLATFORM": os.environ.get("PYOPENGL_PLATFORM", "egl"),
                   "LP_NUM_THREADS": os.environ.get("LP_NUM_THREADS", "1")}
    return Processes(workers, env=process_env), functools.partial(_one_thread_worker, factory)
