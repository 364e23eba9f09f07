"""TracIn over saved checkpoints (DESIGN §1).

  s(ξ) = Σ_c η_c Σ_{z∈ξ} φ_c(z)ᵀ φ̄_c(target),

with one run per checkpoint c, η_c its learning rate and φ̄_c the mean step feature of
the target episodes (Σ of their episode sums / their total number of steps). No
curvature: that is the method. Per-episode sums suffice, so the cost is O(C·(N + T)·k).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from cupid_engine.config import Config, check, field, names_tuple
from cupid_engine.scorers import _inputs
from cupid_engine.scorers.base import Scorer, register
from cupid_engine.scorers.table import make_table

if TYPE_CHECKING:
    from cupid_engine.store.reader import StoreReader


def tracin_scores(
    demo_sums: Sequence[np.ndarray], target_means: Sequence[np.ndarray], learning_rates: Sequence[float]
) -> np.ndarray:
    """Σ_c η_c s_ξ^c · φ̄_c.

    Args:
        demo_sums: ``C`` arrays ``[N, K]`` of per-episode feature sums.
        target_means: ``C`` arrays ``[K]`` of mean target step features.
        learning_rates: ``C`` η_c.

    Returns:
        ``[N]`` float64.
    """
    if not (len(demo_sums) == len(target_means) == len(learning_rates)) or not demo_sums:
        raise ValueError("need one demo-sum array, target mean and learning rate per checkpoint")
    out = np.zeros(len(demo_sums[0]), np.float64)
    for s, t, lr in zip(demo_sums, target_means, learning_rates):
        out += lr * (np.asarray(s, np.float64) @ np.asarray(t, np.float64))
    return out


@dataclasses.dataclass(frozen=True)
class TracInConfig(Config):
    """Options of the TracIn scorer."""

    checkpoints: tuple[str, ...] = field((), help="one run per saved checkpoint; () = the given run only")
    learning_rates: tuple[float, ...] = field((), help="η_c per checkpoint; () = 1 for every checkpoint")
    target: str = field("target", help="target episodes: split or comma-separated ids")
    episodes: str = field("train", help="episodes to score")

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoints", names_tuple(self.checkpoints, "checkpoints"))
        object.__setattr__(self, "learning_rates", tuple(float(x) for x in self.learning_rates))
        check(
            not self.learning_rates or len(self.learning_rates) == max(len(self.checkpoints), 1),
            "learning_rates needs one value per checkpoint",
        )


@register
class TracInScorer(Scorer):
    """TracIn: learning-rate-weighted gradient dot products over checkpoints."""

    name = "tracin"
    config_cls = TracInConfig

    def score(self, store: StoreReader, run: str, **inputs: Any) -> pa.Table:
        cfg = self.config
        cat = store.catalog()
        ids = _inputs.resolve_episodes(cat, cfg.episodes, default="train")
        target = _inputs.resolve_episodes(cat, cfg.target, default="target")
        rows = _inputs.catalog_dict(cat)
        n_target_steps = float(sum(rows[e]["length"] for e in target))
        names = cfg.checkpoints or (run,)
        lrs = cfg.learning_rates or (1.0,) * len(names)
        sums, means = [], []
        for name in names:
            r = store.run(name)
            sums.append(r.episode_features(ids))
            means.append(r.episode_features(target).astype(np.float64).sum(0) / n_target_steps)
        scores = tracin_scores(sums, means, lrs)
        splits, meta = _inputs.metadata_columns(cat, ids)
        return make_table(ids, scores, method=self.name, splits=splits, config=cfg, metadata=meta)
