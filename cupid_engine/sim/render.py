"""Camera images for the built-in tasks: record states while simulating, render them after.

Rendering inside the control loop is what makes image demonstrations slow: robosuite with
``use_camera_obs=True`` (agentview + eye-in-hand at 84x84) took 188 ms per step on these
machines, against a few ms for the physics alone. So images are produced in two passes:

1. the demonstrations are simulated headless exactly as for state datasets
   (:func:`~cupid_engine.sim.generate.generate_episodes` with a :class:`StateRecordingEnv`,
   which only copies the MuJoCo physics state, ``mj_getState(FULLPHYSICS)``, after every
   reset and step);
2. the recorded states are replayed through MuJoCo's offscreen renderer
   (``mujoco.Renderer``, ``MUJOCO_GL=egl``: Mesa's software EGL on the CPU) in parallel
   worker processes, one ``[T, H, W, 3]`` ``uint8`` array per camera and episode.

Frame ``t`` is the scene in the state the policy observed at step ``t`` (before action
``t``), upright (row 0 is the top of the image), without reflections (see
:func:`_render_job`; robosuite's own camera observations draw them). Camera keys are robosuite's camera names:
``agentview`` (front view of the table and arm) and ``robot0_eye_in_hand`` (wrist). Each
replayed state is checked against the recorded object position (within 5 mm: robosuite's
observation reads positions computed before the last 2 ms physics substep), so a replay
that drifted from the recording fails loudly instead of pairing wrong frames with actions.

Where Mesa's EGL is missing, :func:`check_egl` (called before any worker starts) raises
:class:`RenderUnavailable` in one line naming the Debian packages.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import numpy as np

from cupid_engine.data.episode import Episode
from cupid_engine.errors import UserError
from cupid_engine.sim.tasks import OBJECT_NAME, SimEnv, Variation, canonical_task

logger = logging.getLogger(__name__)

CAMERAS = ("agentview", "robot0_eye_in_hand")
"""Default cameras: the front agent view and the wrist (eye-in-hand) camera."""
DEFAULT_SIZE = 84
EGL_PACKAGES = "libegl-mesa0 libgl1-mesa-dri"
_POSITION_TOLERANCE = 5e-3  # metres; see the module docstring


class RenderUnavailable(UserError, RuntimeError):
    """Offscreen rendering cannot work on this machine (no EGL / Mesa)."""


def check_egl() -> None:
    """Fail fast, in one line, when the libraries ``MUJOCO_GL=egl`` needs are missing.

    Raises:
        RenderUnavailable: Naming the missing library and the Debian packages to install.
    """
    def loads(lib: str) -> bool:
        try:
            ctypes.CDLL(lib)
            return True
        except OSError:
            return False

    # libEGL.so.1 is the dispatcher; a vendor library does the drawing: Mesa's (software,
    # what these CPU machines use) or NVIDIA's on GPU machines.
    missing = [lib for lib in ("libEGL.so.1",) if not loads(lib)]
    if not missing and not any(loads(v) for v in ("libEGL_mesa.so.0", "libEGL_nvidia.so.0")):
        missing = ["libEGL_mesa.so.0"]
    if missing:
        raise RenderUnavailable(
            f"offscreen rendering (MUJOCO_GL=egl) needs Mesa's EGL but {missing[0]} is missing",
            hint=f"install the Debian packages {EGL_PACKAGES}",
        )


class StateRecordingEnv(SimEnv):
    """A :class:`SimEnv` that keeps the MuJoCo physics state after every reset and step.

    ``states`` holds the states of the current episode: ``states[t]`` is the state the
    observation of step ``t`` was read in (``states[0]`` right after the reset).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        import mujoco

        self._mujoco = mujoco
        self._spec = mujoco.mjtState.mjSTATE_FULLPHYSICS
        self._size = mujoco.mj_stateSize(self.env.sim.model._model, self._spec)
        self.states: list[np.ndarray] = []

    def _record(self) -> None:
        state = np.empty(self._size, np.float64)
        self._mujoco.mj_getState(self.env.sim.model._model, self.env.sim.data._data, state, self._spec)
        self.states.append(state)

    def reset(self, seed: int) -> dict[str, np.ndarray]:
        obs = super().reset(seed)
        self.states = []
        self._record()
        return obs

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool]:
        out = super().step(action)
        self._record()
        return out

    def episode_states(self, length: int) -> np.ndarray:
        """``[length, S]`` states of the episode just run (one per recorded step)."""
        if len(self.states) < length:
            raise RuntimeError(f"recorded {len(self.states)} states for an episode of {length} steps")
        return np.stack(self.states[:length])


@dataclasses.dataclass(frozen=True)
class _Job:
    task: str
    variation: dict[str, Any]
    horizon: int
    cameras: tuple[str, ...]
    size: int
    episode_id: str
    knobs: dict[str, float]
    states: np.ndarray
    object_pos: np.ndarray


class CameraRenderer:
    """Frames of a :class:`SimEnv`'s cameras in its current state (live, e.g. for rollouts
    of image policies; the replay workers use it too).

    MuJoCo picks its GL backend when it is first imported, so the process must have
    ``MUJOCO_GL=egl`` before robosuite or mujoco is imported (robosuite's loader in
    ``sim.tasks`` defaults it to ``disable``); otherwise construction raises
    :class:`RenderUnavailable` saying so.

    Args:
        env: The environment whose scene is drawn.
        cameras: Camera names.
        size: Height and width of every frame.
    """

    def __init__(self, env: SimEnv, cameras: Sequence[str] = CAMERAS, size: int = DEFAULT_SIZE) -> None:
        import mujoco

        self._mujoco, self.env, self.cameras, self.size = mujoco, env, tuple(cameras), int(size)
        model = env.env.sim.model._model
        names = {model.camera(i).name for i in range(model.ncam)}
        missing = [c for c in self.cameras if c not in names]
        if missing:
            raise ValueError(f"task {env.task!r} has no camera {missing} (has {sorted(names)})")
        gl = os.environ.get("MUJOCO_GL", "")
        if gl.lower() not in ("egl", "osmesa", "glfw"):
            raise RenderUnavailable(
                f"offscreen rendering needs MUJOCO_GL=egl in this process (it is {gl or 'unset'!r})",
                hint="set it before robosuite/mujoco is first imported, or render with render_episodes (worker processes)",
            )
        if not hasattr(mujoco, "GLContext"):
            # robosuite rewrites MUJOCO_GL to egl after mujoco has read it: the variable can
            # say egl while this process's mujoco has no GL backend.
            raise RenderUnavailable(
                "mujoco was first imported in this process without a GL backend (MUJOCO_GL was 'disable' then)",
                hint="set MUJOCO_GL=egl before robosuite/mujoco is first imported, or render with render_episodes "
                     "(worker processes)",
            )
        try:
            self._renderer = mujoco.Renderer(model, self.size, self.size)
        except Exception as exc:  # EGL/GL failures come as several unrelated types
            raise RenderUnavailable(
                f"cannot create a MUJOCO_GL={gl} offscreen renderer ({type(exc).__name__}: {exc})",
                hint=f"install the Debian packages {EGL_PACKAGES}",
            ) from None
        # Reflections double the cost of software rendering (the scene is drawn twice):
        # without them the table no longer mirrors the arm (Lift agentview: 4.6% of pixels
        # differ, by <= 12 levels; the wrist view is unchanged) at 35 instead of 70 ms CPU
        # per 84x84 frame. Shadows change no pixel of these scenes; off as well.
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False

    def __call__(self) -> dict[str, np.ndarray]:
        """``camera -> uint8 [size, size, 3]`` of the current state (upright)."""
        data = self.env.env.sim.data._data
        out = {}
        for c in self.cameras:
            self._renderer.update_scene(data, camera=c)
            out[c] = self._renderer.render()
        return out

    def close(self) -> None:
        """Release the GL context (explicitly: EGL teardown by the garbage collector is noisy)."""
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None


_WORKER: dict[str, Any] = {}


def _render_job(job: _Job) -> tuple[dict[str, np.ndarray], tuple[float, float]]:
    """Worker side: replay one episode's states through the renderer.

    Returns:
        ``(camera -> uint8 [T, size, size, 3], (wall seconds, CPU seconds) spent rendering)``.
    """
    # Must precede the first mujoco import of this (spawned) process.
    os.environ["MUJOCO_GL"] = "egl"
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    # Parallelism is across worker processes; llvmpipe's own threads would only contend.
    os.environ.setdefault("LP_NUM_THREADS", "1")
    import mujoco

    key = (job.task, repr(sorted(job.variation.items())), job.horizon, job.size, job.cameras)
    if _WORKER.get("key") != key:
        _close_worker()
        env = SimEnv(job.task, variation=Variation.from_dict(job.variation), horizon=job.horizon)
        try:
            renderer = CameraRenderer(env, job.cameras, job.size)
        except BaseException:
            env.close()
            raise
        _WORKER.update(key=key, env=env, renderer=renderer)
        if not _WORKER.get("atexit"):
            import atexit

            # Explicit close: EGL contexts torn down by the garbage collector print noise.
            atexit.register(_close_worker)
            _WORKER["atexit"] = True
    env, renderer = _WORKER["env"], _WORKER["renderer"]
    model, data = env.env.sim.model._model, env.env.sim.data._data
    # Object geometry (size_scale) must be the episode's for the images to show it.
    env.knobs = dict(job.knobs)
    env._apply_physics_knobs()
    spec = mujoco.mjtState.mjSTATE_FULLPHYSICS
    T = job.states.shape[0]
    frames = {c: np.empty((T, job.size, job.size, 3), np.uint8) for c in job.cameras}
    t0, c0 = time.perf_counter(), time.process_time()
    for t in range(T):
        mujoco.mj_setState(model, data, job.states[t], spec)
        mujoco.mj_forward(model, data)
        err = float(np.max(np.abs(data.xpos[env._obj_body] - job.object_pos[t])))
        if err > _POSITION_TOLERANCE:
            raise RuntimeError(
                f"episode {job.episode_id!r}, step {t}: the replayed state puts the object {err:.4f} m "
                "from the recorded observation; the recording does not match this episode"
            )
        for c, frame in renderer().items():
            frames[c][t] = frame
    return frames, (time.perf_counter() - t0, time.process_time() - c0)


def _close_worker() -> None:
    if "renderer" in _WORKER:
        _WORKER.pop("renderer").close()
    if "env" in _WORKER:
        _WORKER.pop("env").close()
    _WORKER.pop("key", None)


def render_episodes(
    recorded: Iterable[tuple[Episode, np.ndarray]],
    *,
    task: str,
    variation: Variation | None = None,
    horizon: int = 1000,
    cameras: Sequence[str] = CAMERAS,
    size: int = DEFAULT_SIZE,
    workers: int = 2,
) -> Iterator[Episode]:
    """Add camera images to episodes by replaying their recorded states, in order.

    At most ``2 * workers`` episodes are in flight, so memory does not grow with the
    number of episodes.

    Args:
        recorded: ``(episode, states [T, S])`` pairs (from :class:`StateRecordingEnv`);
            the episode's metadata must hold ``env_knobs`` when the variation is not stock.
        task: The task the states belong to.
        variation: The variation of the recording environment (object geometry).
        horizon: Horizon of the recording environment.
        cameras: Camera names (default agentview and the wrist camera).
        size: Image height and width in pixels.
        workers: Rendering processes (each builds its own environment and renderer).

    Yields:
        The episodes with ``images = {camera: uint8 [T, size, size, 3]}`` and
        ``metadata["render"]`` (cameras, size, renderer).

    Raises:
        RenderUnavailable: Without Mesa's EGL (checked before any worker starts).
    """
    import multiprocessing

    task = canonical_task(task)
    if int(size) <= 0 or int(workers) <= 0 or not cameras:
        raise ValueError(f"size and workers must be positive and cameras non-empty, got {size}, {workers}, {cameras}")
    check_egl()
    variation_dict = (variation or Variation()).to_dict()
    obj_key = f"{OBJECT_NAME[task]}_pos"
    pending: collections.deque[tuple[Episode, Future]] = collections.deque()
    frames_total, wall_total, cpu_total, started = 0, 0.0, 0.0, time.perf_counter()
    with ProcessPoolExecutor(max_workers=int(workers), mp_context=multiprocessing.get_context("spawn")) as pool:

        def drain_one() -> Episode:
            nonlocal frames_total, wall_total, cpu_total
            ep, fut = pending.popleft()
            images, (wall, cpu) = fut.result()
            frames_total += ep.length * len(cameras)
            wall_total += wall
            cpu_total += cpu
            meta = dict(ep.metadata)
            meta["render"] = {"cameras": list(cameras), "size": int(size), "renderer": "mujoco.Renderer MUJOCO_GL=egl (state replay)"}
            return dataclasses.replace(ep, images=images, metadata=meta)

        for ep, states in recorded:
            states = np.asarray(states, np.float64)
            if states.ndim != 2 or states.shape[0] != ep.length:
                raise ValueError(f"episode {ep.episode_id!r}: states have shape {states.shape}, expected [{ep.length}, S]")
            if obj_key not in ep.observations:
                raise ValueError(f"episode {ep.episode_id!r}: no observation {obj_key!r} to check the replay against")
            job = _Job(
                task=task, variation=variation_dict, horizon=int(horizon), cameras=tuple(cameras), size=int(size),
                episode_id=ep.episode_id, knobs=dict(ep.metadata.get("env_knobs") or _stock_knobs()),
                states=states, object_pos=ep.observations[obj_key].astype(np.float64),
            )
            pending.append((ep, pool.submit(_render_job, job)))
            if len(pending) >= 2 * int(workers):
                yield drain_one()
        while pending:
            yield drain_one()
    if frames_total:
        logger.info(
            "rendered %d frames (%s, %dx%d) in %.1f s wall; per frame and worker %.1f ms wall, %.1f ms CPU",
            frames_total, "+".join(cameras), size, size, time.perf_counter() - started,
            1e3 * wall_total / frames_total, 1e3 * cpu_total / frames_total,
        )


def _stock_knobs() -> dict[str, float]:
    return {"mass_scale": 1.0, "friction_scale": 1.0, "size_scale": 1.0, "placement_scale": 1.0}


def generate_image_episodes(
    task: str,
    *,
    cameras: Sequence[str] = CAMERAS,
    size: int = DEFAULT_SIZE,
    workers: int = 2,
    variation: Variation | None = None,
    horizon: int | None = None,
    **generate_kwargs: Any,
) -> Iterator[Episode]:
    """Scripted demonstrations with camera images (see the module docstring).

    The episodes are those :func:`~cupid_engine.sim.generate.generate_episodes` yields
    for the same arguments (same ids, actions, observations, metadata), plus
    ``images``.

    Args:
        task: ``lift``, ``can`` or ``square``.
        cameras: Camera names.
        size: Image height and width.
        workers: Rendering processes.
        variation: Per-episode environment knob ranges.
        horizon: Step limit (default per task).
        **generate_kwargs: ``demos_per_tier``, ``tiers``, ``seed``, ``keep_failures`` ...
    """
    from cupid_engine.sim.generate import DEFAULT_HORIZON, generate_episodes

    task = canonical_task(task)
    horizon = int(horizon or DEFAULT_HORIZON[task])
    check_egl()
    env = StateRecordingEnv(task, variation=variation, horizon=horizon)

    def recorded() -> Iterator[tuple[Episode, np.ndarray]]:
        try:
            for ep in generate_episodes(task, env=env, horizon=horizon, **generate_kwargs):
                yield ep, env.episode_states(ep.length)
        finally:
            env.close()

    yield from render_episodes(
        recorded(), task=task, variation=variation, horizon=horizon, cameras=cameras, size=size, workers=workers
    )

