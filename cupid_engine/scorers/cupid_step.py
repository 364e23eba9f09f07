"""CUPID-Step: CUPID with per-step normalised influence and a return baseline.

CUPID (:mod:`~cupid_engine.scorers.cupid`, Prop. 2) scores a demonstration ξ by

  Ψ(ξ) = (1/m) Σ_τ R(τ) Σ_{z'∈τ} Σ_{z∈ξ} ψ(z')ᵀψ(z),

a REINFORCE-style estimate of how up-weighting ξ changes the expected return. Two things
make the plug-in estimate fail on the known-answer scenarios (``docs/fidelity.md``):

1. **Magnitude domination.** Each pair term ψ(z')ᵀψ(z) = ‖ψ(z')‖‖ψ(z)‖cos(z', z).
   States no demonstration visits (the cube slipped, the arm drifting) have whitened
   gradients many times larger than in-distribution steps, so the few out-of-distribution
   steps of failed rollouts carry most of the sum, while the steps where the strategies
   actually differ contribute little. RelatIF (Barshan et al., AISTATS 2020) fixes the
   same pathology of influence functions by normalising the test side: the influence on
   the step's output *per unit of gradient norm*. We normalise each rollout step,
   ψ̂(z') = ψ(z')/‖ψ(z')‖ (``step_norm="rollout"``), and optionally each demo step
   too (``"both"``: a sum of cosines, so long or high-gradient demos cannot dominate).
   A normalised step still points where its output moves; it just cannot shout.

2. **No baseline.** With ±1 returns and most rollouts failing, u is almost exactly minus
   the sum of failure gradients; whatever those have in common with every demonstration
   (the generic direction that makes the policy's output bigger or smaller everywhere)
   swamps the part that separates demos. The policy-gradient identity
   ∇J = E[(R − b)∇ log π] holds for any constant b; b = E[R] (``baseline="mean"``) is
   the standard variance-reducing choice and makes u a *contrast* between successful and
   failed rollouts: u = (1/m) Σ_τ (R(τ) − R̄) Σ_{z'∈τ} ψ̂(z'). With no success among
   the rollouts (or no failure) the contrast is undefined and the scorer raises rather
   than returning a constant.

So

  Ψ_step(ξ) = (1/m) Σ_τ (R(τ) − b) Σ_{z'∈τ} ψ̂(z')ᵀ Σ_{z∈ξ} ψ̃(z),

with ψ̃ = ψ̂ for ``step_norm="both"`` and ψ̃ = ψ otherwise. It is still linear in the
per-step features, so it stays O((N + M)·T·k²) for the whitening and O((N + M)·k) after
it; nothing of size N × M is formed. With ``step_norm="none"`` and ``baseline="none"`` it
equals :class:`~cupid_engine.scorers.cupid.CupidScorer` (``normalization="sum"``)
exactly (tested), so every difference from the paper is one of these two named options.

Nothing here reads labels: the options are fixed before scoring, and the choice of the
default was made on one scenario and seed and confirmed on the others
(``docs/fidelity.md``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from cupid_engine.config import Config, check, field
from cupid_engine.scorers import _inputs
from cupid_engine.scorers.base import Scorer, register
from cupid_engine.scorers.cupid import BASELINES, baseline_groups, centred_returns, performance_inputs
from cupid_engine.scorers.preconditioner import DEFAULT_DAMPING, Preconditioner
from cupid_engine.scorers.table import make_table

if TYPE_CHECKING:
    from cupid_engine.store.reader import StoreReader

STEP_NORMS = ("none", "rollout", "both")


def normalised_sum(whitened_steps: torch.Tensor, normalise: bool, eps: float = 1e-12) -> torch.Tensor:
    """Σ_t ψ(z_t) (or Σ_t ψ(z_t)/‖ψ(z_t)‖ when ``normalise``) of one episode ``[T, K]`` -> ``[K]``."""
    x = whitened_steps.to(torch.float64)
    if normalise:
        x = x / x.norm(dim=1, keepdim=True).clamp_min(eps)
    return x.sum(0)


def step_direction(rollout_sums: torch.Tensor, returns: np.ndarray, baseline: str,
                   groups: np.ndarray | None = None) -> torch.Tensor:
    """u = (1/m) Σ_τ (R(τ) − b) S_τ for ``[M, K]`` (normalised) rollout sums S_τ
    (``groups``: initial-state groups for ``baseline="initial-state"``).

    Raises:
        ValueError: ``baseline="mean"`` with all returns equal (no contrast exists).
    """
    r = torch.as_tensor(centred_returns(returns, baseline, groups=groups, single_outcome="raise"))
    if rollout_sums.ndim != 2 or rollout_sums.shape[0] != r.shape[0] or r.shape[0] == 0:
        raise ValueError(f"need [M>0, K] rollout sums and [M] returns, got {tuple(rollout_sums.shape)}, {tuple(r.shape)}")
    return (r[:, None] * rollout_sums.to(torch.float64)).sum(0) / r.shape[0]


@dataclasses.dataclass(frozen=True)
class CupidStepConfig(Config):
    """Options of the CUPID-Step scorer."""

    step_norm: str = field(
        "rollout", help="per-step unit normalisation of whitened features: 'none', 'rollout' or 'both'"
    )
    baseline: str = field(
        "mean", help="return baseline b: 'mean' (R - mean R; needs both outcomes), 'none' or 'initial-state' "
        "(leave-one-out mean of the same initial state; rollouts made with --repeats R >= 2)"
    )
    returns: str = field("pm1", help="R(τ): 'pm1' (±1 from success), '01', or 'real' (catalog return)")
    damping: float = field(DEFAULT_DAMPING, help="relative damping λ of the preconditioner")
    rollouts: str = field("rollout", help="rollouts τ: a split name or comma-separated episode ids")
    episodes: str = field("train", help="episodes to score: split(s) joined by '+' or comma-separated ids")

    def __post_init__(self) -> None:
        check(self.step_norm in STEP_NORMS, f"step_norm must be one of {STEP_NORMS}")
        check(self.baseline in BASELINES, f"baseline must be one of {BASELINES}")
        check(self.returns in _inputs.RETURN_MODES, f"returns must be one of {_inputs.RETURN_MODES}")
        check(self.damping >= 0, "damping must be >= 0")


def _sums(run: Any, pre: Preconditioner, ids: Iterable[str], normalise: bool) -> torch.Tensor:
    rows = [normalised_sum(pre.whiten(np.asarray(run.step_features(e))), normalise) for e in ids]
    if not rows:
        return torch.zeros((0, run.k), dtype=torch.float64)
    return torch.stack(rows)


@register
class CupidStepScorer(Scorer):
    """CUPID with per-step normalised rollout influence and a return baseline (see module)."""

    name = "cupid-step"
    config_cls = CupidStepConfig

    def raw_scores(self, store: StoreReader, run: str) -> tuple[list[str], np.ndarray]:
        """``(ids, [N] Ψ_step)`` for the configured episodes."""
        cfg = self.config
        r, cat, pre, rollouts, demos, ret = performance_inputs(store, run, cfg)
        if cfg.step_norm == "none":  # the stored episode sums, exactly as CUPID reads them
            roll = pre.whiten(r.episode_features(rollouts)).to(torch.float64)
        else:
            roll = _sums(r, pre, rollouts, True)
        u = step_direction(roll, ret, cfg.baseline, baseline_groups(cat, rollouts, cfg.baseline))
        if cfg.step_norm == "both":
            s = _sums(r, pre, demos, True)
        else:  # whitening is linear: whiten the stored episode sums
            s = pre.whiten(r.episode_features(demos)).to(torch.float64)
        return demos, (s @ u).numpy()

    def score(self, store: StoreReader, run: str, **inputs: Any) -> pa.Table:
        ids, scores = self.raw_scores(store, run)
        splits, meta = _inputs.metadata_columns(store.catalog(), ids)
        return make_table(ids, scores, method=self.name, splits=splits, config=self.config, metadata=meta)
