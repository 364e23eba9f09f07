"""A memoryless scripted Lift policy with the learned-policy interface.

:class:`ScriptedLiftPolicy` maps the fixed Lift observation vector to an action chunk,
exactly like a trained policy behind ``predict_action``: no episode state, optional
sampling noise from the caller's generator. It is the reference ("oracle") policy for
rollout plumbing and an upper bound on Lift success, and — being a tiny picklable class —
its factory can be shipped to Ray actors where trained policies travel as checkpoints.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cupid_engine.sim.tasks import ACTION_DIM, obs_keys

# Lift vector layout (see tasks.OBS_KEYS["lift"]).
_EEF, _GRIP, _CUBE = slice(0, 3), slice(7, 9), slice(9, 12)
_STEP_M = 0.05  # metres moved per unit of position action (BASIC controller scaling)


@dataclasses.dataclass(frozen=True)
class ScriptedPolicyConfig:
    """The ``config`` attributes rollouts read from a policy."""

    n_obs_steps: int = 1
    n_action_steps: int = 12
    obs_keys: tuple[str, ...] = obs_keys("lift")
    noise_std: float = 0.0


class ScriptedLiftPolicy:
    """Hover over the cube, descend, close, lift; phase inferred from the observation.

    Args:
        n_action_steps: Chunk length (>= 12 so that one query holds the gripper closed
            long enough to grasp).
        noise_std: Std of Gaussian noise on position actions, drawn from ``generator``.
    """

    def __init__(self, n_action_steps: int = 12, noise_std: float = 0.0):
        if n_action_steps < 12:
            raise ValueError("n_action_steps must be >= 12 (the grasp needs ~11 closing steps)")
        self.config = ScriptedPolicyConfig(n_action_steps=n_action_steps, noise_std=noise_std)

    def predict_action(self, obs_window: np.ndarray, *, generator: np.random.Generator | None = None) -> np.ndarray:
        """``[n_obs, 19]`` Lift observations -> ``[n_action_steps, 7]`` actions."""
        obs = np.asarray(obs_window, np.float64)[-1]
        eef, cube = obs[_EEF].copy(), obs[_CUBE]
        width = float(obs[_GRIP][0] - obs[_GRIP][1])
        n = self.config.n_action_steps
        out = np.zeros((n, ACTION_DIM))
        near = np.linalg.norm(cube - eef) < 0.03
        if near and 0.005 < width < 0.06:
            target, grip = np.array([eef[0], eef[1], 1.0]), 1.0  # holding: lift
        elif np.linalg.norm((cube - eef)[:2]) > 0.01 and eef[2] - cube[2] > 0.02:
            target, grip = cube + np.array([0.0, 0.0, 0.08]), -1.0  # hover
        elif eef[2] - cube[2] > 0.008:
            target, grip = cube.copy(), -1.0  # descend
        else:
            out[:, 6] = 1.0  # close in place for the whole chunk
            return out.astype(np.float32)
        for i in range(n):
            # Open-loop chunk: roll the position forward with the controller's nominal scale.
            a = np.clip(10.0 * (target - eef), -1.0, 1.0)
            if self.config.noise_std > 0 and generator is not None:
                a = a + generator.normal(scale=self.config.noise_std, size=3)
            out[i, :3] = a
            out[i, 6] = grip
            eef = eef + _STEP_M * np.clip(a, -1.0, 1.0) * 0.5
        return np.clip(out, -1.0, 1.0).astype(np.float32)
