"""Headless robosuite tasks with fixed low-dimensional observation vectors.

Three tasks mirror the robomimic benchmark: ``lift`` (robosuite ``Lift``), ``can``
(robosuite ``PickPlaceCan``) and ``square`` (robosuite ``NutAssemblySquare``), all with a
Panda arm and the BASIC composite controller (delta OSC pose on the arm): a 7-dim action
``(dx, dy, dz, drx, dry, drz, gripper)`` where ±1 maps to ±0.05 m / ±0.5 rad per step and
the gripper is −1 open, +1 close.

Every task has a FIXED, ordered observation vector (:data:`OBS_KEYS`); policies
concatenate these keys in this order, so datasets and rollouts stay interchangeable:

==========  ====================================================================  ===
task        keys (dims)                                                           D
==========  ====================================================================  ===
lift        robot0_eef_pos (3), robot0_eef_quat (4), robot0_gripper_qpos (2),      19
            cube_pos (3), cube_quat (4), gripper_to_cube_pos (3)
can         robot0_eef_pos (3), robot0_eef_quat (4), robot0_gripper_qpos (2),      19
            Can_pos (3), Can_quat (4), Can_to_robot0_eef_pos (3)
square      robot0_eef_pos (3), robot0_eef_quat (4), robot0_gripper_qpos (2),      19
            SquareNut_pos (3), SquareNut_quat (4), SquareNut_to_robot0_eef_pos (3)
==========  ====================================================================  ===

The bin target (can) and the peg (square) do not move between episodes, so they are not
part of the vector.

One robosuite environment is built per :class:`SimEnv` (≈1 s) and reused across episodes
with ``hard_reset=False`` (a reset is then a cheap ``mj_resetData``, ≈0.1 s). Because a soft
reset keeps model edits, every reset re-applies all variation knobs from stored defaults,
and re-seeds every random stream robosuite uses (robot initial-joint noise and object
placement samplers) from the episode seed, so an episode depends only on its seed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import numpy as np

from cupid_engine.config import Config, check, field

logger = logging.getLogger(__name__)

TASKS = ("lift", "can", "square")
"""Short task names accepted everywhere in ``cupid_engine.sim``."""

ROBOSUITE_ENV = {"lift": "Lift", "can": "PickPlaceCan", "square": "NutAssemblySquare"}
"""Short task name -> robosuite environment name."""

_ALIASES = {
    "lift": "lift",
    "can": "can",
    "pickplacecan": "can",
    "pick_place_can": "can",
    "square": "square",
    "nutassemblysquare": "square",
    "nut_assembly_square": "square",
}

OBJECT_NAME = {"lift": "cube", "can": "Can", "square": "SquareNut"}
"""The manipulated object's observation prefix per task."""

_ROBOT_KEYS = (("robot0_eef_pos", 3), ("robot0_eef_quat", 4), ("robot0_gripper_qpos", 2))

OBS_KEYS: dict[str, tuple[tuple[str, int], ...]] = {
    "lift": _ROBOT_KEYS + (("cube_pos", 3), ("cube_quat", 4), ("gripper_to_cube_pos", 3)),
    "can": _ROBOT_KEYS + (("Can_pos", 3), ("Can_quat", 4), ("Can_to_robot0_eef_pos", 3)),
    "square": _ROBOT_KEYS
    + (("SquareNut_pos", 3), ("SquareNut_quat", 4), ("SquareNut_to_robot0_eef_pos", 3)),
}
"""Task -> ordered ``(key, dim)`` pairs of the fixed observation vector."""

ACTION_DIM = 7
"""BASIC controller action size: delta position (3), delta rotation (3), gripper (1)."""

CONTROL_FREQ = 20
"""Control frequency in Hz (also the dataset fps)."""

# Body holding the manipulated object's free joint, per task (robosuite naming).
_OBJECT_BODY = {"lift": "cube_main", "can": "Can_main", "square": "SquareNut_main"}


def canonical_task(task: str) -> str:
    """Map a task name or robosuite alias (``PickPlaceCan``) to ``lift``/``can``/``square``.

    Raises:
        ValueError: For an unknown task.
    """
    key = str(task).lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS} (or robosuite names)")
    return _ALIASES[key]


def obs_keys(task: str) -> tuple[str, ...]:
    """The ordered observation keys of ``task``'s fixed vector."""
    return tuple(k for k, _ in OBS_KEYS[canonical_task(task)])


def obs_dim(task: str) -> int:
    """Length D of ``task``'s fixed observation vector."""
    return sum(d for _, d in OBS_KEYS[canonical_task(task)])


def obs_vector(obs: dict[str, np.ndarray], keys: tuple[str, ...] | list[str]) -> np.ndarray:
    """Concatenate ``keys`` of one observation dict into a ``[D]`` float32 vector."""
    return np.concatenate([np.asarray(obs[k], np.float32).reshape(-1) for k in keys])


@dataclasses.dataclass(frozen=True)
class Variation(Config):
    """Ranges of the per-episode environment knobs; each is drawn uniformly per episode.

    A range ``(a, a)`` pins the knob; the default ``(1.0, 1.0)`` everywhere is the stock
    robosuite task.
    """

    mass_scale: tuple[float, float] = field((1.0, 1.0), help="object mass multiplier range")
    friction_scale: tuple[float, float] = field(
        (1.0, 1.0), help="object sliding-friction multiplier range"
    )
    size_scale: tuple[float, float] = field(
        (1.0, 1.0), help="object size multiplier range (primitive-geom objects only: lift)"
    )
    placement_scale: tuple[float, float] = field(
        (1.0, 1.0), help="multiplier of the initial object placement x/y range (about its centre)"
    )
    # size_scale rescales the collision geoms in place; robosuite still places the object
    # with its stock bottom offset, so a scaled cube starts up to a few mm into or above
    # the table and settles in the first steps.

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            lo, hi = getattr(self, f.name)
            check(0.0 <= lo <= hi, f"Variation.{f.name} must be (lo, hi) with 0 <= lo <= hi")
        check(self.mass_scale[0] > 0 and self.size_scale[0] > 0, "scales must be > 0")

    def sample(self, rng: np.random.Generator) -> dict[str, float]:
        """Draw one episode's knob values (always four draws, so streams stay aligned)."""
        return {
            f.name: float(rng.uniform(*getattr(self, f.name))) for f in dataclasses.fields(self)
        }


def parse_variation(specs: list[str] | tuple[str, ...] | None) -> Variation | None:
    """Parse CLI knob specs ``KNOB=LO:HI`` or ``KNOB=VALUE`` into a :class:`Variation`.

    Example: ``["mass_scale=0.5:2", "placement_scale=1.5"]``. None/empty -> None.
    """
    if not specs:
        return None
    names = {f.name for f in dataclasses.fields(Variation)}
    kwargs: dict[str, tuple[float, float]] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or name not in names:
            raise ValueError(f"bad variation {spec!r}: expected KNOB=LO:HI with KNOB in {sorted(names)}")
        lo, _, hi = value.partition(":")
        try:
            kwargs[name] = (float(lo), float(hi or lo))
        except ValueError:
            raise ValueError(f"bad variation {spec!r}: LO and HI must be numbers") from None
    return Variation(**kwargs)


def _load_robosuite():
    # robosuite prints macro warnings on import and numba caches compiled code; neither
    # matters to us, but headless rendering must be off before mujoco is imported.
    os.environ.setdefault("MUJOCO_GL", "disable")
    logging.getLogger("robosuite_logs").setLevel(logging.ERROR)
    import robosuite

    try:
        from robosuite.utils.log_utils import ROBOSUITE_DEFAULT_LOGGER

        ROBOSUITE_DEFAULT_LOGGER.setLevel(logging.ERROR)
    except ImportError:  # pragma: no cover - older robosuite
        pass
    return robosuite


def _samplers(initializer: Any) -> list[Any]:
    """All leaf placement samplers of a robosuite placement initializer."""
    if hasattr(initializer, "samplers"):
        out = []
        for s in initializer.samplers.values():
            out.extend(_samplers(s))
        return out
    return [initializer]


class SimEnv:
    """One reusable headless robosuite environment for one task.

    Args:
        task: ``lift``, ``can`` or ``square`` (robosuite names accepted).
        variation: Per-episode knob ranges; None is the stock task.
        horizon: Upper bound on steps per episode (robosuite ``horizon``; episodes are cut
            by the callers, robosuite's own ``done`` is ignored).

    Attributes:
        task: Canonical task name.
        knobs: The knob values applied at the last :meth:`reset`.
    """

    def __init__(self, task: str, *, variation: Variation | None = None, horizon: int = 1000):
        self.task = canonical_task(task)
        self.variation = variation or Variation()
        suite = _load_robosuite()
        ctrl = suite.load_composite_controller_config(controller="BASIC", robot="Panda")
        self.env = suite.make(
            ROBOSUITE_ENV[self.task],
            robots="Panda",
            controller_configs=ctrl,
            has_renderer=False,
            has_offscreen_renderer=False,
            use_camera_obs=False,
            use_object_obs=True,
            control_freq=CONTROL_FREQ,
            horizon=int(horizon),
            ignore_done=True,
            hard_reset=False,
            initialization_noise="default",
            # Model construction draws too (the Lift cube's size): a fixed seed makes every
            # SimEnv of a task identical; per-episode randomness comes from reset(seed).
            seed=0,
        )
        self.knobs: dict[str, float] = {}
        self._obs: dict[str, np.ndarray] = {}
        model = self.env.sim.model
        body = model.body_name2id(_OBJECT_BODY[self.task])
        self._obj_body = body
        self._obj_geoms = [g for g in range(model.ngeom) if model.geom_bodyid[g] == body]
        self._default_mass = model.body_mass[body].copy()
        self._default_inertia = model.body_inertia[body].copy()
        self._default_friction = model.geom_friction[self._obj_geoms].copy()
        self._default_size = model.geom_size[self._obj_geoms].copy()
        self._default_rbound = model.geom_rbound[self._obj_geoms].copy()
        self._default_aabb = model.geom_aabb[self._obj_geoms].copy()
        self._default_gpos = model.geom_pos[self._obj_geoms].copy()
        self._primitive = all(int(model.geom_type[g]) != 7 for g in self._obj_geoms)  # 7 = mesh
        self._obj_sampler = self._object_sampler()
        self._default_range = (
            tuple(self._obj_sampler.x_range),
            tuple(self._obj_sampler.y_range),
        )
        if self.variation.size_scale != (1.0, 1.0) and not self._primitive:
            self.env.close()
            raise ValueError(
                f"task {self.task!r}: size_scale variation needs primitive object geoms "
                "(the object is a mesh); use size_scale=(1.0, 1.0)"
            )

    def _object_sampler(self) -> Any:
        """The placement sampler that places the manipulated object (not visual targets)."""
        name = OBJECT_NAME[self.task]
        for s in _samplers(self.env.placement_initializer):
            if any(getattr(o, "name", "") == name for o in getattr(s, "mujoco_objects", [])):
                return s
        raise RuntimeError(f"task {self.task!r}: no placement sampler holds object {name!r}")

    @property
    def observation(self) -> dict[str, np.ndarray]:
        """The latest observation (restricted to :attr:`obs_keys`)."""
        return dict(self._obs)

    @property
    def obs_keys(self) -> tuple[str, ...]:
        """Ordered keys of the fixed observation vector."""
        return obs_keys(self.task)

    def reset(self, seed: int) -> dict[str, np.ndarray]:
        """Start a new episode whose initial state depends only on ``seed``.

        Returns:
            Observation dict restricted to :attr:`obs_keys` (each a float32 ``[d]`` array).
        """
        seed = int(seed)
        # Separate streams: knob draws never shift the robosuite stream and vice versa.
        knob_rng, env_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
        self.knobs = self.variation.sample(knob_rng)
        env = self.env
        env.rng = env_rng
        for s in _samplers(env.placement_initializer):
            s.rng = env_rng
        p = self.knobs["placement_scale"]
        (x0, x1), (y0, y1) = self._default_range
        cx, cy, hx, hy = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2 * p, (y1 - y0) / 2 * p
        self._obj_sampler.x_range = [cx - hx, cx + hx]
        self._obj_sampler.y_range = [cy - hy, cy + hy]
        self._apply_physics_knobs()
        obs = env.reset()
        self._obs = {k: np.asarray(obs[k], np.float32) for k in self.obs_keys}
        return dict(self._obs)

    def _apply_physics_knobs(self) -> None:
        model = self.env.sim.model
        b, g = self._obj_body, self._obj_geoms
        m, s = self.knobs["mass_scale"], self.knobs["size_scale"]
        model.body_mass[b] = self._default_mass * m
        # Inertia scales with mass and with size squared.
        model.body_inertia[b] = self._default_inertia * m * s * s
        fr = self._default_friction.copy()
        fr[:, 0] *= self.knobs["friction_scale"]
        model.geom_friction[g] = fr
        if self._primitive:
            model.geom_size[g] = self._default_size * s
            model.geom_rbound[g] = self._default_rbound * s
            model.geom_aabb[g] = self._default_aabb * s
            model.geom_pos[g] = self._default_gpos * s

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool]:
        """Apply one ``[7]`` action.

        Returns:
            ``(obs, reward, success)`` with ``obs`` restricted to :attr:`obs_keys` and
            ``success`` from ``env._check_success()``.
        """
        action = np.asarray(action, np.float64).reshape(-1)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"action must have shape [{ACTION_DIM}], got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError("action contains NaN/Inf")
        obs, reward, _, _ = self.env.step(np.clip(action, -1.0, 1.0))
        self._obs = {k: np.asarray(obs[k], np.float32) for k in self.obs_keys}
        return dict(self._obs), float(reward), bool(self.env._check_success())

    # Task geometry the scripted demonstrators need (never part of the observation).

    def target_pos(self) -> np.ndarray:
        """World position where the object must end up (above the bin / peg); [3].

        For lift it is the cube's position 15 cm up (any height above +4 cm succeeds).
        """
        sim = self.env.sim
        if self.task == "lift":
            return np.asarray(self._obs["cube_pos"], np.float64) + np.array([0.0, 0.0, 0.15])
        if self.task == "can":
            bid = sim.model.body_name2id("VisualCan_main")
            return np.array(sim.data.body_xpos[bid], np.float64)
        bid = self.env.peg1_body_id  # the square nut goes on peg1
        return np.array(sim.data.body_xpos[bid], np.float64)

    def table_height(self) -> float:
        """World z of the surface the object starts on."""
        if self.task == "can":
            return float(self.env.bin1_pos[2])
        return float(self.env.model.mujoco_arena.table_offset[2])

    def close(self) -> None:
        """Release the MuJoCo simulation."""
        self.env.close()


def make_env(
    task: str, *, seed: int, variation: Variation | None = None, horizon: int = 1000
) -> SimEnv:
    """Build a reusable headless environment, already reset to episode ``seed``.

    Args:
        task: ``lift``, ``can``, ``square`` or a robosuite name (``PickPlaceCan`` ...).
        seed: Seed of the first episode (later episodes: ``env.reset(seed)``).
        variation: Per-episode knob ranges (mass, friction, size, placement).
        horizon: Upper bound on episode length.

    Returns:
        The environment; its first observation is ``env.observation``.
    """
    env = SimEnv(task, variation=variation, horizon=horizon)
    env.reset(seed)
    return env
