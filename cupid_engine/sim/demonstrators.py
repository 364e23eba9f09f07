"""Scripted demonstrators with quality tiers, mimicking robomimic's multi-human (MH) data.

A demonstrator is a proportional waypoint controller over the BASIC (delta OSC pose)
action space: it moves the end effector through task phases (detour → hover → descend →
close → lift → transport → lower → release → [press, square only] → retreat), each phase a
target expressed relative to the object or the goal, with
``action = clip(gain · error, ±speed)``. Like a human operator, the demonstrator sees the
true scene (bin target, peg, nut handle site), not just the policy's observation vector.

Quality comes from :class:`DemoParams`, the knobs a human operator's skill changes:
action noise, hesitation pauses, detours, the approach height and angle, a deliberately
missed first grasp followed by a regrasp, and speed/gain. The presets in :data:`TIERS`
mimic robomimic MH: ``better`` is fast and clean; ``worse`` is slower, noisier, hesitates
and retries more. A grasp that does not hold the object (slip or miss) is retried from the
hover point, as an operator would, at most ``max_retries`` times.

Measured success rates (:data:`EXPECTED_SUCCESS`; stock :class:`~.tasks.Variation`,
attempts 0..N-1 of :func:`cupid_engine.sim.generate.generate_episodes` with seed 0 and the
default horizons lift 400 / can 800 / square 800 steps), checked by
``tests/sim/test_demonstrators.py`` with a tolerance:

======  =====================  =====================  =====================
task    better                 okay                   worse
======  =====================  =====================  =====================
lift    1.00 (N=20, 49 steps)  1.00 (N=20, 90)        1.00 (N=20, 185)
can     1.00 (N=10, 150)       1.00 (N=10, 248)       0.95 (N=20, 467)
square  1.00 (N=10, 204)       0.90 (N=20, 343)       0.80 (N=20, 550)
======  =====================  =====================  =====================

(mean episode length of all attempts in brackets). Failures are time-outs after
slipped grasps (can, square) or a nut jammed tilted on the peg (square). On Lift the rates
hold under variation too: 8/8 for better and worse with mass ×0.5–2, friction ×0.5–1.5,
size ×0.8–1.2 and placement range ×0.5–2.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from cupid_engine.config import Config, check, field
from cupid_engine.constants import TIERS as TIER_NAMES
from cupid_engine.sim.tasks import ACTION_DIM, OBJECT_NAME, SimEnv


@dataclasses.dataclass(frozen=True)
class DemoParams(Config):
    """Strategy parameters of a scripted demonstrator (one operator's style)."""

    noise_std: float = field(0.0, help="std of Gaussian noise added to the position/rotation action")
    hesitation_prob: float = field(0.0, help="per-step probability of starting a pause")
    hesitation_len: int = field(0, help="length of a pause in steps (zero motion)")
    detour_offset: float = field(
        0.0, help="size in metres of a random detour waypoint visited before the approach"
    )
    approach_height: float = field(0.08, help="hover height above the grasp point, metres")
    approach_angle: float = field(
        0.0, help="approach angle from vertical in degrees (hover point offset sideways)"
    )
    regrasp_prob: float = field(
        0.0, help="probability that the first grasp is aimed off the object, then retried"
    )
    speed: float = field(1.0, help="max |action| per position axis (1.0 = 5 cm/step)")
    gain: float = field(10.0, help="proportional gain from position error (m) to action")
    grasp_steps: int = field(11, help="steps the gripper is held closing before lifting")
    max_retries: int = field(3, help="grasp retries after a failed/slipped grasp")

    def __post_init__(self) -> None:
        check(self.noise_std >= 0, "noise_std must be >= 0")
        check(0 <= self.hesitation_prob <= 1, "hesitation_prob must be in [0, 1]")
        check(self.hesitation_len >= 0, "hesitation_len must be >= 0")
        check(self.detour_offset >= 0, "detour_offset must be >= 0")
        check(self.approach_height > 0, "approach_height must be > 0")
        check(0 <= self.approach_angle < 80, "approach_angle must be in [0, 80) degrees")
        check(0 <= self.regrasp_prob <= 1, "regrasp_prob must be in [0, 1]")
        check(0 < self.speed <= 1, "speed must be in (0, 1]")
        check(self.gain > 0, "gain must be > 0")
        check(self.grasp_steps >= 1, "grasp_steps must be >= 1")
        check(self.max_retries >= 0, "max_retries must be >= 0")


TIERS: dict[str, DemoParams] = {
    "better": DemoParams(noise_std=0.02, approach_height=0.08, speed=1.0, gain=10.0),
    "okay": DemoParams(
        noise_std=0.08,
        hesitation_prob=0.01,
        hesitation_len=6,
        detour_offset=0.06,
        approach_height=0.10,
        approach_angle=15.0,
        regrasp_prob=0.15,
        speed=0.6,
        gain=8.0,
        grasp_steps=13,
    ),
    "worse": DemoParams(
        noise_std=0.15,
        hesitation_prob=0.015,
        hesitation_len=10,
        detour_offset=0.12,
        approach_height=0.12,
        approach_angle=30.0,
        regrasp_prob=0.4,
        speed=0.4,
        gain=6.0,
        grasp_steps=15,
    ),
}
"""Quality-tier presets, keyed by ``cupid_engine.constants.TIERS``."""

assert tuple(TIERS) == TIER_NAMES

EXPECTED_SUCCESS: dict[str, dict[str, float]] = {
    "lift": {"better": 1.0, "okay": 1.0, "worse": 1.0},
    "can": {"better": 1.0, "okay": 1.0, "worse": 0.95},
    "square": {"better": 1.0, "okay": 0.9, "worse": 0.8},
}
"""Measured success rate per task and tier (see the module docstring)."""

# Grasp point relative to the object position, per task (metres, world frame).
_GRASP_OFFSET = {"lift": np.zeros(3), "can": np.array([0.0, 0.0, 0.02]), "square": np.zeros(3)}
# Height of the end effector above the goal while carrying / before release.
_CARRY_Z = {"lift": 1.0, "can": 1.05, "square": 1.05}
_RELEASE_DZ = {"lift": 0.0, "can": 0.12, "square": 0.06}


def _finger_yaw(quat_xyzw: np.ndarray) -> float:
    """Yaw of the line between the fingers (the eef frame's y axis) in the world xy plane."""
    x, y, z, w = (float(v) for v in quat_xyzw)
    # Second column of the rotation matrix of the unit quaternion.
    r01 = 2 * (x * y - z * w)
    r11 = 1 - 2 * (x * x + z * z)
    return math.atan2(r11, r01)


def _wrap_half_pi(a: float) -> float:
    """Wrap an angle between two lines (period π) into [-π/2, π/2)."""
    return (a + math.pi / 2) % math.pi - math.pi / 2


class ScriptedDemonstrator:
    """A stateful phase machine producing 7-dim BASIC-controller actions.

    Args:
        env: The environment (for goal geometry the observation does not carry: the bin
            target, the peg, the nut handle).
        params: Strategy parameters (:data:`TIERS` presets or custom).
        rng: Source of this episode's noise, pauses, detour and regrasp draws.

    Attributes:
        info: JSON-safe record of this episode's draws (detour vector, whether a regrasp
            was scripted, retries, pauses) for the episode metadata.
    """

    def __init__(self, env: SimEnv, params: DemoParams, rng: np.random.Generator):
        self.env = env
        self.task = env.task
        self.p = params
        self.rng = rng
        self._obj = OBJECT_NAME[self.task]
        self.phase = "start"
        self._t_phase = 0
        self._pause = 0
        self._gripper = -1.0
        self._retries = 0
        # Draw everything episode-level up front so the draw order never depends on physics.
        direction = rng.normal(size=3)
        direction[2] = abs(direction[2])
        direction /= np.linalg.norm(direction) + 1e-12
        self._detour = direction * params.detour_offset
        phi = rng.uniform(0, 2 * math.pi)
        side = math.tan(math.radians(params.approach_angle)) * params.approach_height
        self._approach = np.array([side * math.cos(phi), side * math.sin(phi), params.approach_height])
        self._miss = rng.uniform() < params.regrasp_prob
        psi = rng.uniform(0, 2 * math.pi)
        self._miss_offset = 0.035 * np.array([math.cos(psi), math.sin(psi), 0.0])
        self._start_eef: np.ndarray | None = None
        self._retreat: np.ndarray | None = None
        self.info: dict[str, Any] = {
            "detour": [float(v) for v in self._detour],
            "approach_offset": [float(v) for v in self._approach],
            "scripted_miss": bool(self._miss),
            "retries": 0,
            "pauses": 0,
        }

    # Geometry helpers -----------------------------------------------------------------

    def _grasp_point(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        if self.task == "square":
            sim = self.env.env.sim
            site = self.env.env.object_site_ids[self.env.env.nut_id]
            return np.array(sim.data.site_xpos[site], np.float64)
        return np.asarray(obs[f"{self._obj}_pos"], np.float64) + _GRASP_OFFSET[self.task]

    def _held(self, obs: dict[str, np.ndarray]) -> bool:
        """Whether the fingers still hold the object: the grasp point stays between them and
        they have not closed on nothing (fully shut fingers mean a miss or a slip)."""
        eef = np.asarray(obs["robot0_eef_pos"], np.float64)
        grip = self._grasp_point(obs)
        width = float(obs["robot0_gripper_qpos"][0] - obs["robot0_gripper_qpos"][1])
        return np.linalg.norm(eef - grip) < 0.04 and width > 0.005

    def _yaw_action(self, obs: dict[str, np.ndarray]) -> float:
        if self.task != "square":
            return 0.0
        # Close the fingers across the nut handle: finger line along the nut's local y.
        x, y, z, w = (float(v) for v in obs["SquareNut_quat"])
        r01 = 2 * (x * y - z * w)
        r11 = 1 - 2 * (x * x + z * z)
        want = math.atan2(r11, r01)
        err = _wrap_half_pi(want - _finger_yaw(obs["robot0_eef_quat"]))
        return float(np.clip(2.0 * err, -0.6, 0.6))

    # Control ----------------------------------------------------------------------------

    def _goto(self, obs, target: np.ndarray, tol: float, yaw: bool = False):
        eef = np.asarray(obs["robot0_eef_pos"], np.float64)
        err = target - eef
        act = np.zeros(ACTION_DIM)
        act[:3] = np.clip(self.p.gain * err, -self.p.speed, self.p.speed)
        yaw_a = self._yaw_action(obs) if yaw else 0.0
        act[5] = yaw_a
        done = np.linalg.norm(err) < tol and abs(yaw_a) < 0.05
        return act, done

    def _next(self, phase: str) -> None:
        self.phase = phase
        self._t_phase = 0

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """One action ``[7]`` for the current observation (advances the phase machine)."""
        eef = np.asarray(obs["robot0_eef_pos"], np.float64)
        if self._start_eef is None:
            self._start_eef = eef.copy()
            self._next("detour" if self.p.detour_offset > 0 else "hover")
        # Pauses: an operator stops mid-motion; the gripper command is held.
        if self._pause > 0:
            self._pause -= 1
            return self._finish(np.zeros(ACTION_DIM), noise=False)
        if (
            self.p.hesitation_len > 0
            and self.phase not in ("close", "release")
            and self.rng.uniform() < self.p.hesitation_prob
        ):
            self._pause = self.p.hesitation_len - 1
            self.info["pauses"] += 1
            return self._finish(np.zeros(ACTION_DIM), noise=False)

        self._t_phase += 1
        grasp = self._grasp_point(obs)
        act = np.zeros(ACTION_DIM)
        ph = self.phase
        if ph == "detour":
            act, done = self._goto(obs, self._start_eef + self._detour, 0.02)
            if done or self._t_phase > 60:
                self._next("hover")
        elif ph == "hover":
            self._gripper = -1.0
            act, done = self._goto(obs, grasp + self._approach, 0.015, yaw=True)
            if done or self._t_phase > 120:
                self._next("miss" if self._miss else "descend")
        elif ph == "miss":
            act, done = self._goto(obs, grasp + self._miss_offset, 0.01)
            if done or self._t_phase > 40:
                self._miss = False
                self._next("close")
        elif ph == "descend":
            act, done = self._goto(obs, grasp, 0.008, yaw=True)
            if done or self._t_phase > 80:
                self._next("close")
        elif ph == "close":
            self._gripper = 1.0
            if self._t_phase >= self.p.grasp_steps:
                self._next("lift")
        elif ph == "lift":
            z = _CARRY_Z[self.task]
            act, done = self._goto(obs, np.array([eef[0], eef[1], z]), 0.02)
            if self._t_phase > 5 and not self._held(obs):
                self._retry()
            elif done:
                self._next("transport")
        elif ph == "transport":
            if self.task == "lift":
                act = np.zeros(ACTION_DIM)  # success fires once the cube is up
            else:
                goal = self.env.target_pos()
                off = eef - self._object_pos(obs)
                tgt = np.array([goal[0] + off[0], goal[1] + off[1], _CARRY_Z[self.task]])
                act, done = self._goto(obs, tgt, 0.01)
                if not self._held(obs):
                    self._retry()
                elif done:
                    self._next("lower")
        elif ph == "lower":
            goal = self.env.target_pos()
            off = eef - self._object_pos(obs)
            tgt = np.array([goal[0] + off[0], goal[1] + off[1], goal[2] + _RELEASE_DZ[self.task] + off[2]])
            act, done = self._goto(obs, tgt, 0.008)
            if done or self._t_phase > 60:
                self._next("release")
        elif ph == "release":
            self._gripper = -1.0
            if self._t_phase >= 8:
                self._next("press_above" if self.task == "square" else "retreat")
        elif ph in ("press_above", "press"):
            # A nut hung from its handle tilts and can jam on the peg, handle side low;
            # pushing the far side of its ring down with the closed fingers levels it so it
            # drops onto the table.
            far = self._nut_far_side(obs)
            # Close the fingers only once clear of the handle, or they would regrasp it.
            self._gripper = 1.0 if ph == "press" or eef[2] > far[2] + 0.03 else -1.0
            if ph == "press_above":
                if eef[2] < far[2] + 0.03:
                    far = np.array([eef[0], eef[1], far[2]])  # rise first, then move over
                act, done = self._goto(obs, far + np.array([0.0, 0.0, 0.05]), 0.01)
                if done or self._t_phase > 40:
                    self._next("press")
            else:
                act, done = self._goto(obs, far + np.array([0.0, 0.0, -0.04]), 0.005)
                if self._t_phase > 20:
                    self._gripper = -1.0
                    self._next("retreat")
        elif ph == "retreat":
            if self._retreat is None:  # fixed once, or the arm would climb forever
                self._retreat = eef + np.array([0.0, 0.0, 0.1])
            act, _ = self._goto(obs, self._retreat, 0.01)
        return self._finish(act, noise=True)

    def _nut_far_side(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """World position of the nut ring's side opposite the handle (nut local x = -0.033)."""
        x, y, z, w = (float(v) for v in obs["SquareNut_quat"])
        axis = np.array([1 - 2 * (y * y + z * z), 2 * (x * y + z * w), 2 * (x * z - y * w)])
        return self._object_pos(obs) - 0.033 * axis

    def _object_pos(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(obs[f"{self._obj}_pos"], np.float64)

    def _retry(self) -> None:
        if self._retries < self.p.max_retries:
            self._retries += 1
            self.info["retries"] = self._retries
            self._gripper = -1.0
            self._next("hover")
        else:
            self._next("retreat")  # give up: the episode fails

    def _finish(self, act: np.ndarray, *, noise: bool) -> np.ndarray:
        if noise and self.p.noise_std > 0:
            act[:6] += self.rng.normal(scale=self.p.noise_std, size=6) * np.array([1, 1, 1, 0.2, 0.2, 0.2])
        act[6] = self._gripper
        return np.clip(act, -1.0, 1.0)


def make_demonstrator(
    env: SimEnv, tier_or_params: str | DemoParams, rng: np.random.Generator
) -> ScriptedDemonstrator:
    """A demonstrator for ``env`` from a tier name or explicit :class:`DemoParams`."""
    if isinstance(tier_or_params, str):
        if tier_or_params not in TIERS:
            raise ValueError(f"unknown tier {tier_or_params!r}; expected one of {tuple(TIERS)}")
        tier_or_params = TIERS[tier_or_params]
    return ScriptedDemonstrator(env, tier_or_params, rng)
