"""TRAK-Traj (the audit paper, §3.2; DESIGN §1): one gradient per trajectory.

The featuriser writes, per (checkpoint, projection seed), a run whose episode feature
φ_i is the projected gradient of the ``energy`` output averaged over 16 deterministically
sampled transitions of trajectory i. For each such run:

  H = ΦᵀΦ/N + λI   (ridge over the N *training* trajectories),
  ψ̄ = mean of the target trajectories' features,   s_i = φ_iᵀ H⁻¹ ψ̄.

Scores are averaged over the checkpoints of a projection seed; the seed members
{0, 97, 211} are then winsorised at ±2σ, converted to ranks and the ranks averaged, so
the ensemble depends on order rather than on each member's scale. λ is relative by
default (λ·tr(ΦᵀΦ/N)/k) so it means the same at every projection size; set
``relative=False`` for the paper's absolute λ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
from scipy.stats import rankdata

from cupid_engine.config import Config, check, field
from cupid_engine.scorers import _inputs
from cupid_engine.scorers.base import Scorer, register
from cupid_engine.scorers.table import make_table

if TYPE_CHECKING:
    from cupid_engine.store.reader import StoreReader

DEFAULT_SEEDS = (0, 97, 211)


def trak_traj_member(
    train: np.ndarray, target: np.ndarray, *, ridge: float = 1e-3, relative: bool = True
) -> np.ndarray:
    """s_i = φ_iᵀ(ΦᵀΦ/N + λI)⁻¹ψ̄ for one run.

    Args:
        train: ``[N, K]`` training-trajectory features Φ.
        target: ``[T, K]`` target-trajectory features.
        ridge: λ (relative to tr(ΦᵀΦ/N)/K when ``relative``).
        relative: Whether λ is relative.

    Returns:
        ``[N]`` float64 scores.
    """
    phi = torch.as_tensor(np.asarray(train), dtype=torch.float64)
    tgt = torch.as_tensor(np.asarray(target), dtype=torch.float64)
    if phi.ndim != 2 or tgt.ndim != 2 or phi.shape[1] != tgt.shape[1] or len(phi) == 0 or len(tgt) == 0:
        raise ValueError(f"need Φ [N>0, K] and targets [T>0, K], got {tuple(phi.shape)}, {tuple(tgt.shape)}")
    k = phi.shape[1]
    h = phi.T @ phi / phi.shape[0]
    lam = ridge * float(torch.trace(h)) / k if relative else ridge
    h = h + lam * torch.eye(k, dtype=torch.float64)
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise ValueError(f"TRAK-Traj ridge matrix is not positive definite (λ = {lam:g}); increase ridge")
    direction = torch.cholesky_solve(tgt.mean(0)[:, None], chol)[:, 0]  # H⁻¹ψ̄
    return (phi @ direction).numpy()


def winsorize(x: np.ndarray, n_sigma: float = 2.0) -> np.ndarray:
    """Clip to mean ± n_sigma·std."""
    x = np.asarray(x, np.float64)
    mu, sd = x.mean(), x.std()
    return np.clip(x, mu - n_sigma * sd, mu + n_sigma * sd)


def rank_ensemble(members: Sequence[np.ndarray], n_sigma: float = 2.0) -> np.ndarray:
    """Winsorise each member, rank it (1 = lowest, ties averaged), average the ranks."""
    if not members:
        raise ValueError("no ensemble members")
    return np.mean([rankdata(winsorize(m, n_sigma)) for m in members], axis=0)


def trak_traj_scores(
    members: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]], *, ridge: float = 1e-3, relative: bool = True,
    n_sigma: float = 2.0,
) -> np.ndarray:
    """The full ensemble.

    Args:
        members: One entry per projection seed, each a list of per-checkpoint
            ``(train [N, K], target [T, K])`` feature pairs.
        ridge: λ.
        relative: Whether λ is relative.
        n_sigma: Winsorisation threshold.

    Returns:
        ``[N]`` mean ranks (higher = more useful).
    """
    per_seed = [
        np.mean([trak_traj_member(tr, tg, ridge=ridge, relative=relative) for tr, tg in ckpts], axis=0)
        for ckpts in members
    ]
    return rank_ensemble(per_seed, n_sigma)


@dataclasses.dataclass(frozen=True)
class TrakTrajConfig(Config):
    """Options of the TRAK-Traj scorer."""

    members: tuple[tuple[str, ...], ...] = field(
        (), help="run names per projection seed, each a tuple of per-checkpoint runs; () = the given run only"
    )
    ridge: float = field(1e-3, help="ridge λ of H = ΦᵀΦ/N + λI")
    relative: bool = field(True, help="λ relative to tr(ΦᵀΦ/N)/k (False: the paper's absolute λ)")
    winsor_sigma: float = field(2.0, help="winsorise members at ±this many standard deviations")
    target: str = field("target", help="target trajectories: split or comma-separated ids")
    episodes: str = field("train", help="training trajectories scored (and used in H)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", tuple(tuple(m) for m in self.members))
        check(all(len(m) > 0 for m in self.members), "every member needs at least one run")
        check(self.ridge >= 0 and self.winsor_sigma > 0, "ridge must be >= 0 and winsor_sigma > 0")


@register
class TrakTrajScorer(Scorer):
    """TRAK-Traj rank ensemble over seeds × checkpoints."""

    name = "trak-traj"
    config_cls = TrakTrajConfig

    def score(self, store: StoreReader, run: str, **inputs: Any) -> pa.Table:
        cfg = self.config
        cat = store.catalog()
        ids = _inputs.resolve_episodes(cat, cfg.episodes, default="train")
        target = _inputs.resolve_episodes(cat, cfg.target, default="target")
        members = cfg.members or ((run,),)
        feats = [
            [(store.run(name).episode_features(ids), store.run(name).episode_features(target)) for name in ckpts]
            for ckpts in members
        ]
        scores = trak_traj_scores(feats, ridge=cfg.ridge, relative=cfg.relative, n_sigma=cfg.winsor_sigma)
        splits, meta = _inputs.metadata_columns(cat, ids)
        return make_table(ids, scores, method=self.name, splits=splits, config=cfg, metadata=meta)
