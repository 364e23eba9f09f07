"""Raw audit outcomes: what every condition scored, pruned and achieved.

:class:`AuditData` is the plain record the :class:`~cupid_engine.audit.protocol.AuditRunner`
fills and the gates (:mod:`cupid_engine.audit.gates`) and the report read. It holds no
statistics, so that the gate rules can be re-applied to a finished audit (``audit.json``)
without retraining anything.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

FULL = "full"
"""Condition name of the unpruned policy trained on every episode."""

RANDOM = "random"
"""Condition name of matched random pruning (same seed, same ratio)."""

LENGTH = "length"
"""Built-in cheap baseline: prune the longest episodes."""

PRIMARY = "primary"
HELDOUT = "heldout"
BLOCKS = (PRIMARY, HELDOUT)


@dataclasses.dataclass
class Condition:
    """One retrained-and-evaluated policy.

    Attributes:
        seed: Audit seed (training seed, random-pruning seed, rollout seed).
        block: ``"primary"`` or ``"heldout"``.
        method: Pruning rule (a method, a baseline, ``"random"`` or ``"full"``).
        ratio: Fraction of episodes pruned (0 for ``"full"``).
        success: Closed-loop success rate over ``rollouts`` rollouts.
        rollouts: Number of evaluation rollouts.
        pruned: Ids of the pruned episodes (sorted).
    """

    seed: int
    block: str
    method: str
    ratio: float
    success: float
    rollouts: int
    pruned: list[str]


@dataclasses.dataclass
class AuditData:
    """Every condition of one audit plus the episode table and the score tables.

    Attributes:
        episode_ids: ``[N]`` episode ids.
        lengths: ``[N]`` episode lengths (steps).
        tiers: ``[N]`` quality tiers (``""`` when unknown).
        conditions: Every evaluated condition.
        scores: ``(seed, method) -> {episode_id: score}`` for every scored method
            (higher = keep).
    """

    episode_ids: list[str]
    lengths: list[float]
    tiers: list[str]
    conditions: list[Condition] = dataclasses.field(default_factory=list)
    scores: dict[tuple[int, str], dict[str, float]] = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------------ queries
    def seeds(self, block: str) -> list[int]:
        """Sorted seeds of one block."""
        return sorted({c.seed for c in self.conditions if c.block == block})

    def ratios(self) -> list[float]:
        """Sorted prune ratios (the unpruned condition excluded)."""
        return sorted({c.ratio for c in self.conditions if c.method != FULL})

    def methods(self) -> list[str]:
        """Every pruning rule that was evaluated, in first-seen order."""
        out: list[str] = []
        for c in self.conditions:
            if c.method not in out:
                out.append(c.method)
        return out

    def get(self, seed: int, method: str, ratio: float) -> Condition | None:
        """The condition for ``(seed, method, ratio)``; ``ratio`` is ignored for ``full``."""
        for c in self.conditions:
            if c.seed == seed and c.method == method and (method == FULL or abs(c.ratio - ratio) < 1e-12):
                return c
        return None

    def paired(self, block: str, a: str, b: str, ratio: float) -> tuple[list[int], np.ndarray, np.ndarray]:
        """Success rates of ``a`` and ``b`` on the seeds of ``block`` where both exist.

        Returns:
            ``(seeds, y_a [S], y_b [S])``.
        """
        seeds, ya, yb = [], [], []
        for s in self.seeds(block):
            ca, cb = self.get(s, a, ratio), self.get(s, b, ratio)
            if ca is not None and cb is not None:
                seeds.append(s)
                ya.append(ca.success)
                yb.append(cb.success)
        return seeds, np.asarray(ya, dtype=np.float64), np.asarray(yb, dtype=np.float64)

    def info(self) -> dict[str, tuple[float, str]]:
        """``episode_id -> (length, tier)``."""
        return {e: (float(l), t) for e, l, t in zip(self.episode_ids, self.lengths, self.tiers)}

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (score keys flattened to ``"seed|method"``)."""
        return {
            "episodes": {
                "episode_id": list(self.episode_ids),
                "length": [float(x) for x in self.lengths],
                "tier": list(self.tiers),
            },
            "conditions": [dataclasses.asdict(c) for c in self.conditions],
            "scores": {f"{s}|{m}": dict(v) for (s, m), v in sorted(self.scores.items())},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AuditData":
        """Inverse of :meth:`to_dict`."""
        ep = data["episodes"]
        scores = {}
        for key, v in data.get("scores", {}).items():
            s, m = key.split("|", 1)
            scores[(int(s), m)] = {k: float(x) for k, x in v.items()}
        return cls(
            episode_ids=list(ep["episode_id"]),
            lengths=[float(x) for x in ep["length"]],
            tiers=list(ep["tier"]),
            conditions=[Condition(**c) for c in data["conditions"]],
            scores=scores,
        )
