"""CUPID-Quality (Agia et al., Eq. 6; DESIGN §1): the scorer over the fused min/max op.

For a rollout τ and a demo ξ with A = Ψ_τ Ψ_ξᵀ (whitened step features, |τ|×|ξ|):

  Ψ_qual(ξ) = (1/m) Σ_τ [ max_{z'∈τ} min_{z∈ξ} A − min_{z'∈τ} max_{z∈ξ} A ].

Ψ_qual ignores rollout outcomes: as in the reference implementation, only Ψ_π carries
the rollout sign R(τ). The combined score is α·norm(Ψ_π) + (1−α)·norm(Ψ_qual) with
min-max normalisation over the scored set (α = 1 is CUPID, α = 1/2 CUPID-Quality);
``weighting="official"`` reproduces the official notebook instead:
0.5·norm(Ψ_π) + 0.25·norm(−Σ_τ minmax) + 0.25·norm(Σ_τ maxmin).

The per-pair reductions come from the op :func:`cupid_engine.ops.quality.quality_minmax`
(a segmented GEMM with a min/max epilogue, A never stored; ``torch``, ``cpu`` and
``triton`` backends through the ops registry). It is re-exported here, with its
reference and naive baselines, for existing callers.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from cupid_engine.config import Config, check, field
from cupid_engine.ops.quality import (  # noqa: F401 - re-exported for existing callers
    BACKENDS,
    check_quality_inputs,
    quality_minmax,
    quality_minmax_naive,
    quality_minmax_reference,
)
from cupid_engine.scorers import _inputs
from cupid_engine.scorers.base import Scorer, register
from cupid_engine.scorers.cupid import CupidConfig, CupidScorer, episode_lengths
from cupid_engine.scorers.preconditioner import DEFAULT_DAMPING, Preconditioner
from cupid_engine.scorers.table import make_table

if TYPE_CHECKING:
    from cupid_engine.store.reader import StoreReader

WEIGHTINGS = ("alpha", "official")


def minmax_normalize(x: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] over the scored set (a constant vector maps to 0)."""
    x = np.asarray(x, np.float64)
    lo, hi = float(x.min()), float(x.max())
    return np.zeros_like(x) if hi <= lo else (x - lo) / (hi - lo)


def combine_quality(
    performance: np.ndarray, maxmin: np.ndarray, minmax: np.ndarray, *, alpha: float = 0.5, weighting: str = "alpha"
) -> np.ndarray:
    """Combine Ψ_π with the per-pair reductions into the CUPID-Quality score.

    Args:
        performance: ``[N]`` Ψ_π.
        maxmin: ``[m, N]`` max_{z'} min_{z} A per (rollout, demo).
        minmax: ``[m, N]`` min_{z'} max_{z} A per (rollout, demo).
        alpha: Weight of norm(Ψ_π) for ``weighting="alpha"``.
        weighting: ``alpha`` or ``official`` (see module docstring).

    Returns:
        ``[N]`` combined scores.
    """
    maxmin, minmax = np.asarray(maxmin, np.float64), np.asarray(minmax, np.float64)
    if weighting == "alpha":
        qual = (maxmin - minmax).mean(0)
        return alpha * minmax_normalize(performance) + (1 - alpha) * minmax_normalize(qual)
    if weighting == "official":
        return (
            0.5 * minmax_normalize(performance)
            + 0.25 * minmax_normalize(-minmax.sum(0))
            + 0.25 * minmax_normalize(maxmin.sum(0))
        )
    raise ValueError(f"weighting must be one of {WEIGHTINGS}")


@dataclasses.dataclass(frozen=True)
class CupidQualityConfig(Config):
    """Options of the CUPID-Quality scorer."""

    alpha: float = field(0.5, help="weight of norm(Ψ_π); 1 is CUPID, 1/2 CUPID-Quality")
    weighting: str = field("alpha", help="'alpha' or 'official' (0.5/0.25/0.25 notebook weighting)")
    normalization: str = field("sum", help="Ψ_π normalisation: 'sum' or 'mean'")
    returns: str = field("pm1", help="R(τ) for Ψ_π: 'pm1', '01' or 'real' (Ψ_qual ignores outcomes)")
    baseline: str = field(
        "none", help="return baseline of Ψ_π: 'none' (the paper's CUPID-Quality), 'mean' or 'initial-state' (as the cupid scorer's)"
    )
    damping: float = field(DEFAULT_DAMPING, help="relative damping λ of the preconditioner")
    rollouts: str = field("rollout", help="rollouts τ: a split name or comma-separated episode ids")
    episodes: str = field("train", help="episodes to score: split(s) joined by '+' or comma-separated ids")
    backend: str = field("auto", help=f"fused kernel backend: {BACKENDS}")
    dtype: str = field("float32", help="dtype of whitened step features in the kernel: float32 or float64")
    block_steps: int = field(65536, help="demo steps whitened and scored per block (memory bound)")

    def __post_init__(self) -> None:
        check(0.0 <= self.alpha <= 1.0, "alpha must be in [0, 1]")
        check(self.weighting in WEIGHTINGS, f"weighting must be one of {WEIGHTINGS}")
        check(self.backend in BACKENDS, f"backend must be one of {BACKENDS}")
        check(self.dtype in ("float32", "float64"), "dtype must be float32 or float64")
        check(self.block_steps > 0, "block_steps must be positive")
        CupidConfig(normalization=self.normalization, returns=self.returns, damping=self.damping,
                    baseline=self.baseline)


def whitened_steps(run: Any, pre: Preconditioner, ids: list[str], dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """Concatenated whitened step features ``[rows, K]`` and offsets ``[len(ids) + 1]``."""
    feats = [np.asarray(run.step_features(e)) for e in ids]
    off = np.zeros(len(ids) + 1, np.int64)
    off[1:] = np.cumsum([f.shape[0] for f in feats])
    return pre.whiten(np.concatenate(feats, 0), dtype=dtype), off


@register
class CupidQualityScorer(Scorer):
    """CUPID-Quality: Ψ_π combined with the max-min/min-max quality term."""

    name = "cupid-quality"
    config_cls = CupidQualityConfig

    def reductions(self, store: StoreReader, run: str) -> tuple[list[str], np.ndarray, np.ndarray]:
        """``(demo ids, maxmin [m, N], minmax [m, N])``, demos streamed in step blocks."""
        from cupid_engine.scorers._cache import cached

        cfg = self.config
        store = cached(store)  # each steps chunk and shard marker read once (remote stores)
        r = store.run(run)
        cat = store.catalog()
        pre = Preconditioner.from_run(r, damping=cfg.damping)
        dtype = torch.float32 if cfg.dtype == "float32" else torch.float64
        rollouts = _inputs.resolve_episodes(cat, cfg.rollouts, default="rollout")
        demos = _inputs.resolve_episodes(cat, cfg.episodes, default="train")
        rs, r_off = whitened_steps(r, pre, rollouts, dtype)
        lengths = episode_lengths(cat, demos, r)
        maxmin = np.empty((len(rollouts), len(demos)), np.float64)
        minmax = np.empty_like(maxmin)
        start = 0
        while start < len(demos):
            # Whole demos per block, about block_steps steps: memory stays O(block).
            stop, steps = start, 0
            while stop < len(demos) and (stop == start or steps + lengths[stop] <= cfg.block_steps):
                steps += lengths[stop]
                stop += 1
            ds, d_off = whitened_steps(r, pre, demos[start:stop], dtype)
            mm, xm = quality_minmax(rs, r_off, ds, d_off, backend=cfg.backend)
            maxmin[:, start:stop], minmax[:, start:stop] = mm.double().numpy(), xm.double().numpy()
            start = stop
        return demos, maxmin, minmax

    def score(self, store: StoreReader, run: str, **inputs: Any) -> pa.Table:
        from cupid_engine.scorers._cache import cached

        cfg = self.config
        store = cached(store)  # one cache for the quality term and the CUPID term
        ids, maxmin, minmax = self.reductions(store, run)
        perf_ids, perf = CupidScorer(
            normalization=cfg.normalization, returns=cfg.returns, damping=cfg.damping, baseline=cfg.baseline,
            rollouts=cfg.rollouts, episodes=cfg.episodes,
        ).raw_scores(store, run)
        assert perf_ids == ids
        scores = combine_quality(perf, maxmin, minmax, alpha=cfg.alpha, weighting=cfg.weighting)
        splits, meta = _inputs.metadata_columns(store.catalog(), ids)
        meta = dict(meta, cupid=perf.tolist(), quality=(maxmin - minmax).mean(0).tolist())
        return make_table(ids, scores, method=self.name, splits=splits, config=self.config, metadata=meta)
