"""A minimal environment of the ``rollout --env`` protocol (no simulator needed).

``PointReach``: a point in the plane moves by ``0.05·clip(action[:2])`` per step toward a
goal drawn from the reset seed; a step succeeds when the point is within 2 cm of the
goal. It is the reference for writing your own factory (see
:mod:`cupid_engine.sim.rollout`) and what the protocol's tests run::

    cupid-engine rollout --env cupid_engine.sim.point_env:PointReach --horizon 40 \\
        --success any --policy CKPT --episodes 10 --out rollouts/
"""

from __future__ import annotations

import numpy as np


class PointReach:
    """Point-mass reaching: observation keys ``pos`` [2] and ``goal`` [2]; actions [2]."""

    obs_keys = ("goal", "pos")
    action_dim = 2

    def __init__(self) -> None:
        self.knobs: dict[str, float] = {}
        self._pos = np.zeros(2)
        self._goal = np.zeros(2)

    def _obs(self) -> dict[str, np.ndarray]:
        return {"goal": self._goal.astype(np.float32), "pos": self._pos.astype(np.float32)}

    def reset(self, seed: int) -> dict[str, np.ndarray]:
        """Start from the origin with a goal on the unit-ish disc drawn from ``seed``."""
        rng = np.random.default_rng(int(seed))
        self._pos = np.zeros(2)
        self._goal = rng.uniform(-0.5, 0.5, size=2)
        self.knobs = {"goal_x": float(self._goal[0]), "goal_y": float(self._goal[1])}
        return self._obs()

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool]:
        """Move; reward is minus the distance, success within 2 cm."""
        a = np.clip(np.asarray(action, np.float64).reshape(-1)[:2], -1.0, 1.0)
        self._pos = self._pos + 0.05 * a
        d = float(np.linalg.norm(self._goal - self._pos))
        return self._obs(), -d, d < 0.02

    def close(self) -> None:
        """Nothing to release."""
