"""CUPID performance influence (Agia et al., CoRL 2025, Prop. 1/2; DESIGN §1).

  Ψ_π(ξ) = (1/m) Σ_τ R(τ) Σ_{z'∈τ} Σ_{z∈ξ} ψ(z')ᵀψ(z) = s_ξᵀ u,
  s_ξ = Σ_{z∈ξ} ψ(z),   u = (1/m) Σ_τ R(τ) Σ_{z'∈τ} ψ(z').

Because whitening is linear, s_ξ = L⁻¹(Σ φ), so only per-episode feature sums are read
and the cost is O((N + M)·k): the demo × rollout matrix is never formed, and demos
are streamed block by block, each block's score depending only on its own rows (no
batch-order dependence). ``normalization="mean"`` divides by |ξ| and |τ| (Eq. 3);
``"sum"`` is Prop. 2, the official setting.

**Return baseline** (``baseline``). Ψ_π is a REINFORCE-style estimate of how up-weighting ξ
changes the expected return, and the policy-gradient identity ∇J = E[(R − b)∇ log π] holds
for any constant b. The paper uses b = 0 (``baseline="none"``: Prop. 2 exactly, as the
official code). ``baseline="mean"`` uses b = R̄, the mean return of the m rollouts, the
standard variance-reducing choice; it turns u into a contrast between successful and
failed rollouts, u = (1/m) Σ_τ (R(τ) − R̄) s_τ. Why it matters here: the per-step
gradients are of the training loss, not of log π, so Σ_τ s_τ is not zero in expectation;
with b = 0 and most rollouts succeeding (or most failing), u is dominated by what every
rollout shares with every demonstration, and the part that separates demos is small.
Measured (``docs/fidelity.md`` §3c, diffusion policy, ``lift-grasp``): b = R̄ was fixed in
a pre-registration before a third training seed existed and raised AUROC there from 0.72 to
0.82, and its filtered policy succeeded 30/50 against 6/50 for b = 0, so it is the
default. When every rollout has the same outcome, R − R̄ is zero and there is no contrast;
the scorer then uses b = 0 and logs a warning saying so (``baseline_used`` in the log).

**Initial-state baseline** (``baseline="initial-state"``, for rollouts with repeated policy
draws per initial state: ``run_rollouts(repeats=R)``, ``cupid-engine rollout --repeats R``).
b_τ = b(s₀(τ)) is the mean return of the *other* rollouts that started from τ's initial
state (leave-one-out). The identity above also holds for a baseline that depends on the
initial state alone, and the leave-one-out mean does not depend on τ's own outcome, so the
estimator's expectation is unchanged. Within one initial state it turns u into
success-minus-failure contrasts from the same start: what the rollouts of one start share
(object pose, the states that follow from it) cancels, what differs (the behaviour the
policy sampled) stays. An initial state whose draws all share one outcome contributes
nothing. Rollouts are grouped by the ``episode_seed`` in their metadata; every group needs
at least two rollouts and at least one group both outcomes (else a ValueError).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from cupid_engine.config import Config, check, field, names_tuple
from cupid_engine.errors import DataError
from cupid_engine.scorers import _inputs
from cupid_engine.scorers.base import Scorer, register
from cupid_engine.scorers.preconditioner import DEFAULT_DAMPING, Preconditioner
from cupid_engine.scorers.table import make_table

if TYPE_CHECKING:
    from cupid_engine.store.reader import StoreReader

log = logging.getLogger(__name__)

NORMALIZATIONS = ("sum", "mean")
BASELINES = ("none", "mean", "initial-state")
INITIAL_STATE_KEY = "episode_seed"
"""Rollout metadata key shared by the rollouts that start from one initial state."""


def initial_state_groups(catalog: pa.Table, ids: list[str]) -> np.ndarray:
    """``[M]`` int64 initial-state group of each rollout (equal ``episode_seed``).

    Raises:
        DataError: naming the first rollout without an ``episode_seed`` in its metadata, or
            alone in its group (``initial-state`` needs repeated draws per initial state).
    """
    rows = _inputs.catalog_dict(catalog, ids)
    keys = []
    for e in ids:
        v = _inputs.metadata_value(rows[e], INITIAL_STATE_KEY)
        if v is None:
            raise DataError(
                f"rollout {e!r} has no {INITIAL_STATE_KEY!r} in its metadata: baseline='initial-state' "
                "needs rollouts made with repeated draws per initial state (rollout --repeats R)"
            )
        keys.append(int(v))
    _, groups, counts = np.unique(np.asarray(keys, np.int64), return_inverse=True, return_counts=True)
    alone = np.flatnonzero(counts[groups] < 2)
    if alone.size:
        raise DataError(
            f"rollout {ids[alone[0]]!r} is the only rollout from its initial state ({INITIAL_STATE_KEY} "
            f"{keys[alone[0]]}; {alone.size} of {len(ids)} are alone): baseline='initial-state' needs >= 2 "
            "policy draws per initial state (rollout --repeats R, R >= 2)"
        )
    return groups.astype(np.int64)


def centred_returns(returns: np.ndarray, baseline: str, *, groups: np.ndarray | None = None,
                    single_outcome: str = "raise") -> np.ndarray:
    """R − b: the returns minus the baseline b (0 for ``none``, R̄ for ``mean``, the
    leave-one-out mean return of the same initial state for ``initial-state``).

    Args:
        returns: ``[M]`` R(τ).
        baseline: One of :data:`BASELINES`.
        groups: ``[M]`` initial-state group per rollout (``initial-state`` only; see
            :func:`initial_state_groups`), every group of size >= 2.
        single_outcome: What ``mean`` does when every return is equal (R − R̄ ≡ 0, no
            contrast): ``raise``, or ``zero`` (use b = 0, the paper's estimator, and log it).

    Returns:
        ``[M]`` float64 centred returns.

    Raises:
        ValueError: Unknown ``baseline``; all returns equal with ``single_outcome="raise"``;
            ``initial-state`` without groups, with a group of one, or with no group holding
            two different returns (no contrast exists; there is no fallback).
    """
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    r = np.asarray(returns, np.float64)
    if baseline == "none" or r.size == 0:
        return r
    if baseline == "initial-state":
        return _initial_state_centred(r, groups)
    if float(r.max() - r.min()) == 0.0:
        if single_outcome == "raise":
            raise ValueError(
                "baseline='mean' needs rollouts with different returns (some successes and some failures); "
                f"all {len(r)} rollouts have return {float(r[0])}: add rollouts or use baseline='none'"
            )
        log.warning(
            "all %d rollouts have return %s, so R - mean R is zero and no contrast exists: "
            "baseline_used=0 (the paper's estimator) for this score", len(r), float(r[0]),
        )
        return r
    return r - r.mean()


def _initial_state_centred(r: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """R_τ − (Σ_{τ'∈g(τ)} R_τ' − R_τ) / (|g(τ)| − 1): the leave-one-out group baseline."""
    if groups is None:
        raise ValueError("baseline='initial-state' needs each rollout's initial-state group (groups=)")
    g = np.asarray(groups)
    if g.shape != r.shape:
        raise ValueError(f"groups {g.shape} and returns {r.shape} differ in shape")
    _, inv, counts = np.unique(g, return_inverse=True, return_counts=True)
    n = counts[inv].astype(np.float64)
    if (n < 2).any():
        raise ValueError("baseline='initial-state' needs >= 2 rollouts per initial state")
    total = np.bincount(inv, weights=r)[inv]
    out = r - (total - r) / (n - 1.0)
    if not out.any():
        raise ValueError(
            f"baseline='initial-state': none of the {counts.size} initial states has rollouts with different "
            "returns, so there is no contrast; add policy draws per initial state or use baseline='mean'"
        )
    return out


def rollout_direction(
    rollout_psi_sums: np.ndarray | torch.Tensor,
    returns: np.ndarray,
    *,
    rollout_lengths: np.ndarray | None = None,
    normalization: str = "sum",
    baseline: str = "none",
    groups: np.ndarray | None = None,
) -> torch.Tensor:
    """u = (1/m) Σ_τ (R(τ) − b) s_τ (s_τ divided by |τ| for ``mean``).

    Args:
        rollout_psi_sums: ``[M, K]`` whitened rollout sums Σψ(z').
        returns: ``[M]`` R(τ).
        rollout_lengths: ``[M]`` |τ| (required for ``mean``).
        normalization: ``sum`` or ``mean``.
        baseline: ``none`` (b = 0, Prop. 2), ``mean`` (b = R̄; b = 0 with a warning when
            every rollout has the same return) or ``initial-state`` (leave-one-out mean of
            the rollout's initial state; needs ``groups``), see :func:`centred_returns`.
        groups: ``[M]`` initial-state groups (``initial-state`` only).

    Returns:
        ``[K]`` float64.
    """
    s = torch.as_tensor(rollout_psi_sums).to(torch.float64)
    r = torch.as_tensor(centred_returns(returns, baseline, groups=groups, single_outcome="zero"))
    if s.ndim != 2 or s.shape[0] != r.shape[0] or s.shape[0] == 0:
        raise ValueError(f"need [M>0, K] rollout sums and [M] returns, got {tuple(s.shape)} and {tuple(r.shape)}")
    if normalization == "mean":
        if rollout_lengths is None:
            raise ValueError("normalization='mean' needs rollout lengths")
        r = r / torch.as_tensor(np.asarray(rollout_lengths, np.float64))
    elif normalization != "sum":
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}")
    return (r[:, None] * s).sum(0) / s.shape[0]


def cupid_scores(
    demo_psi_sums: np.ndarray | torch.Tensor,
    direction: torch.Tensor,
    *,
    demo_lengths: np.ndarray | None = None,
    normalization: str = "sum",
) -> np.ndarray:
    """Ψ_π(ξ) = s_ξᵀu for a block of demos.

    Args:
        demo_psi_sums: ``[N, K]`` whitened demo sums Σψ(z).
        direction: ``[K]`` u from :func:`rollout_direction`.
        demo_lengths: ``[N]`` |ξ| (required for ``mean``).
        normalization: ``sum`` or ``mean``.

    Returns:
        ``[N]`` float64 scores.
    """
    s = torch.as_tensor(demo_psi_sums).to(torch.float64)
    out = (s @ direction.to(torch.float64)).numpy()
    if normalization == "mean":
        if demo_lengths is None:
            raise ValueError("normalization='mean' needs demo lengths")
        out = out / np.asarray(demo_lengths, np.float64)
    return out


@dataclasses.dataclass(frozen=True)
class CupidConfig(Config):
    """Options of the CUPID scorer."""

    normalization: str = field("sum", help="'sum' (Prop. 2, official) or 'mean' (divide by |ξ| and |τ|, Eq. 3)")
    returns: str = field("pm1", help="R(τ): 'pm1' (±1 from success), '01', or 'real' (catalog return)")
    baseline: str = field(
        "mean",
        help="return baseline b in R(τ) − b: 'mean' (b = mean return of the rollouts; measured default, "
        "b = 0 with a warning when all rollouts share one outcome), 'none' (b = 0: the paper's Prop. 2 exactly) "
        "or 'initial-state' (leave-one-out mean return of the rollouts from the same initial state; needs "
        "rollouts made with --repeats R >= 2)",
    )
    damping: float = field(DEFAULT_DAMPING, help="relative damping λ of the preconditioner")
    rollouts: str = field("rollout", help="rollouts τ: a split name or comma-separated episode ids")
    episodes: str = field("train", help="episodes to score: split(s) joined by '+' or comma-separated ids")
    block: int = field(8192, help="demo episodes whitened per block (memory bound)")
    checkpoints: tuple[str, ...] = field(
        (), help="runs of a checkpoint/seed ensemble (each with its own H); () = the given run only"
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoints", names_tuple(self.checkpoints, "checkpoints"))
        check(self.normalization in NORMALIZATIONS, f"normalization must be one of {NORMALIZATIONS}")
        check(self.returns in _inputs.RETURN_MODES, f"returns must be one of {_inputs.RETURN_MODES}")
        check(self.baseline in BASELINES, f"baseline must be one of {BASELINES}")
        check(self.damping >= 0, "damping must be >= 0")
        check(self.block > 0, "block must be positive")


def episode_lengths(catalog: pa.Table, ids: list[str], run: Any) -> np.ndarray:
    """|ξ| per episode from the catalog ``length`` column (else counted from the run)."""
    if "length" in catalog.column_names:
        rows = _inputs.catalog_dict(catalog)
        return np.asarray([rows[e]["length"] for e in ids], np.float64)
    return np.asarray([run.step_features(e).shape[0] for e in ids], np.float64)




def baseline_groups(catalog: pa.Table, rollouts: list[str], baseline: str) -> np.ndarray | None:
    """The rollouts' initial-state groups when ``baseline`` is ``initial-state``, else None."""
    return initial_state_groups(catalog, rollouts) if baseline == "initial-state" else None


def performance_inputs(store: StoreReader, run: str, cfg: Any) -> tuple[Any, Any, Preconditioner, list[str], list[str], Any]:
    """What every performance scorer reads first: ``(run, catalog, preconditioner,
    rollout ids, demo ids, returns [M])`` from ``cfg``'s ``damping``, ``rollouts``,
    ``episodes`` and ``returns``, after checking that rollouts and demos share a scale."""
    r = store.run(run)
    cat = store.catalog()
    pre = Preconditioner.from_run(r, damping=cfg.damping)
    rollouts = _inputs.resolve_episodes(cat, cfg.rollouts, default="rollout")
    demos = _inputs.resolve_episodes(cat, cfg.episodes, default="train")
    ret = _inputs.returns_of(cat, rollouts, cfg.returns)
    _inputs.check_rollout_scale(cat, r, rollouts, demos)
    return r, cat, pre, rollouts, demos, ret


@register
class CupidScorer(Scorer):
    """CUPID: Ψ_π(ξ) = s_ξᵀu over whitened episode sums (``baseline="none"``: the paper's)."""

    name = "cupid"
    config_cls = CupidConfig

    def raw_scores(self, store: StoreReader, run: str) -> tuple[list[str], np.ndarray]:
        """``(ids, [N] Ψ_π)`` for the configured episodes.

        With ``checkpoints``, the mean over runs of the per-run scores, each run whitened
        by its own preconditioner (equal to the 1/√C-concatenated inner product).
        """
        if self.config.checkpoints:
            single = dataclasses.replace(self.config, checkpoints=())
            parts = [CupidScorer(single).raw_scores(store, name) for name in self.config.checkpoints]
            return parts[0][0], np.mean([p[1] for p in parts], axis=0)
        cfg = self.config
        r, cat, pre, rollouts, demos, ret = performance_inputs(store, run, cfg)
        u = rollout_direction(
            pre.whiten(r.episode_features(rollouts)),
            ret,
            rollout_lengths=episode_lengths(cat, rollouts, r) if cfg.normalization == "mean" else None,
            normalization=cfg.normalization,
            baseline=cfg.baseline,
            groups=baseline_groups(cat, rollouts, cfg.baseline),
        )
        lengths = episode_lengths(cat, demos, r) if cfg.normalization == "mean" else None
        out = np.empty(len(demos), np.float64)
        for start in range(0, len(demos), cfg.block):
            chunk = demos[start : start + cfg.block]
            out[start : start + len(chunk)] = cupid_scores(
                pre.whiten(r.episode_features(chunk)),
                u,
                demo_lengths=None if lengths is None else lengths[start : start + len(chunk)],
                normalization=cfg.normalization,
            )
        return demos, out

    def score(self, store: StoreReader, run: str, **inputs: Any) -> pa.Table:
        ids, scores = self.raw_scores(store, run)
        splits, meta = _inputs.metadata_columns(store.catalog(), ids)
        return make_table(ids, scores, method=self.name, splits=splits, config=self.config, metadata=meta)
