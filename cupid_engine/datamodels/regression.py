"""Regression datamodel estimator (DataMIL §4.1, App. B.2; Ilyas et al. 2022).

Draw ``S`` subset masks ``z_j ∈ {0,1}^C`` with every cluster kept with probability
``p``; train one policy per mask (identical budget: same TrainConfig, seed and step
count), measure the target metric, and fit ``M(z) ≈ β₀ + zᵀβ`` by least squares
(optionally ridge and/or lasso; lasso by coordinate descent, no sklearn). ``β`` is the
score.

The subset machinery (masks, :class:`SubsetTrainer`, the resumable on-disk cache,
trainings on an executor) lives in :mod:`cupid_engine.datamodels.subsets`, the linear
fit in :mod:`cupid_engine.datamodels.linear`; their names are re-exported here.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cupid_engine.config import Config, check, field
from cupid_engine.datamodels.linear import LinearDatamodel, fit_linear_datamodel
from cupid_engine.datamodels.subsets import (
    CACHE_SCHEMA,
    SubsetCache,
    SubsetFunction,
    SubsetTrainer,
    evaluate_subsets,
    fraction_masks,
    masks_from_ids,
    sample_masks,
)
from cupid_engine.distributed.executor import executor_for

__all__ = [
    "CACHE_SCHEMA",
    "LinearDatamodel",
    "RegressionConfig",
    "RegressionResult",
    "SubsetCache",
    "SubsetFunction",
    "SubsetTrainer",
    "evaluate_subsets",
    "fit_linear_datamodel",
    "fraction_masks",
    "masks_from_ids",
    "regression_scores",
    "sample_masks",
]


@dataclasses.dataclass(frozen=True)
class RegressionConfig(Config):
    """Options of the regression estimator."""

    num_subsets: int = field(64, help="number of subset trainings S")
    p: float = field(0.5, help="probability that a cluster is in a subset")
    seed: int = field(0, help="seed of the subset masks")
    ridge: float = field(0.0, help="ridge penalty λ₂ (on centred data: (1/2)‖y−Xβ‖² + (λ₂/2)‖β‖²)")
    lasso: float = field(0.0, help="lasso penalty λ₁ per subset ((1/2S)‖y−Xβ‖² + λ₁‖β‖₁); > 0 uses coordinate descent")
    workers: int = field(1, help="parallel trainings: 1 = in this process, W > 1 = W Ray actors")
    address: str | None = field(None, help="Ray cluster address to join (None: a local Ray instance)")
    threads_per_worker: int = field(1, help="torch intra-op threads in each Ray actor")
    cache_dir: str | None = field(None, help="folder of finished trainings (resume); None: no cache")

    def __post_init__(self) -> None:
        check(self.num_subsets >= 1, "num_subsets must be >= 1")
        check(0 < self.p < 1, f"p must be in (0, 1), got {self.p}")
        check(self.ridge >= 0 and self.lasso >= 0, "ridge and lasso must be >= 0")
        check(self.workers >= 1, "workers must be >= 1")
        check(self.threads_per_worker >= 1, "threads_per_worker must be >= 1")


@dataclasses.dataclass
class RegressionResult:
    """Scores of the regression estimator.

    Attributes:
        scores: ``[C]`` float64 β (the pooled target when the metric returns several).
        model: The fitted :class:`LinearDatamodel` (per target when several).
        masks: ``[S, C]`` the subsets.
        values: ``[S, n_targets]`` measured metrics.
        info: ``trained`` / ``cached`` counts.
    """

    scores: np.ndarray
    model: LinearDatamodel
    masks: np.ndarray
    values: np.ndarray
    info: dict


def regression_scores(fn: SubsetFunction, num_clusters: int, config: RegressionConfig | None = None, *,
                      progress: bool = False) -> RegressionResult:
    """Run the regression estimator: masks, (cached) trainings, linear fit.

    Args:
        fn: Subset function, usually a :class:`SubsetTrainer`.
        num_clusters: C.
        config: Estimator options.
        progress: tqdm bar.

    Returns:
        The :class:`RegressionResult`; with several targets the score is the fit to
        their mean (one pooled target, as the metagradient estimator does).
    """
    cfg = config or RegressionConfig()
    masks = sample_masks(num_clusters, cfg.num_subsets, p=cfg.p, seed=cfg.seed)
    values, info = evaluate_subsets(fn, masks, cache_dir=cfg.cache_dir, executor=executor_for(cfg.workers, cfg.address),
                                    threads_per_worker=cfg.threads_per_worker, progress=progress)
    pooled = fit_linear_datamodel(masks, values.mean(1), ridge=cfg.ridge, lasso=cfg.lasso)
    return RegressionResult(scores=pooled.beta, model=pooled, masks=masks, values=values, info=info)
