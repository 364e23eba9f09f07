"""Linear datamodeling score (LDS; Park et al. 2023, TRAK §2): does a score predict retraining?

Draw ``S`` random subsets holding a fixed fraction of the training demonstrations; for
each, the *predicted* metric is the sum of the scores of the demonstrations in it, and
the *measured* metric comes from actually training on it. LDS is the Spearman rank
correlation between the two across subsets, per target (e.g. per target demonstration)
and averaged over targets, with a percentile bootstrap confidence interval over subsets.

:func:`linear_datamodeling_score` is the statistic on given masks and measurements;
:func:`run_lds` trains the subsets with the regression estimator's machinery
(:class:`~cupid_engine.datamodels.subsets.SubsetTrainer`, the on-disk cache,
in process or on Ray actors) and then computes it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from scipy import stats

from cupid_engine.config import Config, check, field
from cupid_engine.data.episode import Episode
from cupid_engine.policies.base import PolicyConfig
from cupid_engine.policies.samples import build_samples
from cupid_engine.policies.training import TrainConfig
from cupid_engine.datamodels.clusters import make_clusters
from cupid_engine.datamodels.metrics import ProxyMetric
from cupid_engine.datamodels.subsets import SubsetTrainer, evaluate_subsets, fraction_masks
from cupid_engine.distributed.executor import executor_for

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LDSResult:
    """LDS of one score vector.

    Attributes:
        per_target: ``[T]`` Spearman correlations (NaN where a side is constant).
        mean: Mean of ``per_target`` over targets (NaNs ignored).
        ci_low: Lower bound of the bootstrap confidence interval of ``mean``.
        ci_high: Upper bound.
        confidence: Confidence level of the interval.
        predicted: ``[S, T]`` predicted metrics (sums of scores in each subset).
        measured: ``[S, T]`` measured metrics.
        masks: ``[S, E]`` the subsets.
        pooled: With one score vector and several targets, the Spearman correlation of
            the prediction with the *mean* measured metric over targets (the pooled
            target the scorers estimate); NaN otherwise.
        info: Extra details (trainings, cache hits, ids).
    """

    per_target: np.ndarray
    mean: float
    ci_low: float
    ci_high: float
    confidence: float
    predicted: np.ndarray
    measured: np.ndarray
    masks: np.ndarray
    pooled: float = float("nan")
    info: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-safe summary (no per-subset arrays)."""
        return {"lds": _json_float(self.mean), "ci": [_json_float(self.ci_low), _json_float(self.ci_high)],
                "confidence": self.confidence, "lds_pooled": _json_float(self.pooled),
                "per_target": [_json_float(v) for v in self.per_target],
                "num_subsets": int(self.masks.shape[0]), "num_targets": int(self.measured.shape[1]), **self.info}


def _json_float(v: float) -> float | None:
    return None if not np.isfinite(v) else float(v)


def _score_vector(scores: Any, ids: Sequence[str] | None, num_items: int) -> np.ndarray:
    """Scores aligned with the mask columns: ``[E]`` or ``[E, T]`` float64."""
    if isinstance(scores, pa.Table):
        if ids is None:
            raise ValueError("a score table needs ids= (the episode id of each mask column)")
        scores = dict(zip(scores.column("episode_id").to_pylist(), scores.column("score").to_pylist()))
    if isinstance(scores, Mapping):
        if ids is None:
            raise ValueError("a score mapping needs ids= (the episode id of each mask column)")
        missing = [i for i in ids if i not in scores]
        if missing:
            raise ValueError(f"no score for {len(missing)} episode(s), e.g. {missing[:3]}")
        return np.array([float(scores[i]) for i in ids], dtype=np.float64)
    arr = np.asarray(scores, dtype=np.float64)
    if arr.shape[0] != num_items:
        raise ValueError(f"{arr.shape[0]} scores for {num_items} mask columns")
    return arr


def _spearman_columns(pred: np.ndarray, meas: np.ndarray) -> np.ndarray:
    out = np.full(meas.shape[1], np.nan)
    for t in range(meas.shape[1]):
        p, m = pred[:, t], meas[:, t]
        if np.ptp(p) > 0 and np.ptp(m) > 0:
            out[t] = stats.spearmanr(p, m).statistic
    return out


def linear_datamodeling_score(
    scores: pa.Table | Mapping[str, float] | np.ndarray,
    subset_masks: np.ndarray,
    measured: np.ndarray,
    *,
    ids: Sequence[str] | None = None,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> LDSResult:
    """Spearman correlation of predicted vs measured metrics over random subsets.

    Args:
        scores: A score table (``episode_id``, ``score``), a mapping id -> score, or an
            array ``[E]`` (one score vector for every target) or ``[E, T]`` (per target).
        subset_masks: ``[S, E]`` bool: which items each subset trained on.
        measured: ``[S]`` or ``[S, T]`` metrics measured after training on each subset.
        ids: ``E`` ids of the mask columns (needed for tables and mappings).
        bootstrap: Bootstrap resamples of the subsets for the interval (0: none).
        confidence: Interval level.
        seed: Bootstrap seed.

    Returns:
        The :class:`LDSResult`.
    """
    masks = np.asarray(subset_masks, dtype=bool)
    meas = np.asarray(measured, dtype=np.float64)
    meas = meas[:, None] if meas.ndim == 1 else meas
    if masks.ndim != 2 or meas.shape[0] != masks.shape[0]:
        raise ValueError(f"masks [S, E] and measured [S(, T)] disagree: {masks.shape} vs {meas.shape}")
    s = _score_vector(scores, ids, masks.shape[1])
    pred = masks.astype(np.float64) @ s
    pred = np.repeat(pred[:, None], meas.shape[1], 1) if pred.ndim == 1 else pred
    if pred.shape != meas.shape:
        raise ValueError(f"per-target scores give {pred.shape[1]} targets, measured has {meas.shape[1]}")
    per_target = _spearman_columns(pred, meas)
    mean = float(np.nanmean(per_target)) if np.isfinite(per_target).any() else float("nan")
    pooled = float("nan")
    if s.ndim == 1 and meas.shape[1] > 1:
        pooled = float(_spearman_columns(pred[:, :1], meas.mean(1, keepdims=True))[0])
    lo = hi = float("nan")
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        boots = []
        for _ in range(bootstrap):
            idx = rng.integers(0, masks.shape[0], masks.shape[0])
            r = _spearman_columns(pred[idx], meas[idx])
            if np.isfinite(r).any():
                boots.append(np.nanmean(r))
        if boots:
            a = (1 - confidence) / 2
            lo, hi = (float(v) for v in np.quantile(boots, [a, 1 - a]))
    return LDSResult(per_target=per_target, mean=mean, ci_low=lo, ci_high=hi, confidence=confidence,
                     predicted=pred, measured=meas, masks=masks, pooled=pooled)


@dataclasses.dataclass
class LDSSubsets:
    """Random subsets, trained and measured once, against which any score is evaluated.

    Attributes:
        masks: ``[S, E]`` bool subsets of the training demonstrations.
        measured: ``[S, T]`` metric of the policy trained on each subset.
        ids: ``E`` episode ids of the mask columns.
        targets: ``T`` target ids (per-demo proxy metric), else None.
        info: ``trained`` / ``cached`` counts, ``fraction``, ``num_train``.
    """

    masks: np.ndarray
    measured: np.ndarray
    ids: list[str]
    targets: list[str] | None
    info: dict

    def evaluate(self, scores: pa.Table | Mapping[str, float] | np.ndarray, *, bootstrap: int = 1000,
                 seed: int = 0) -> LDSResult:
        """LDS of one score (table, id mapping, or ``[E]`` / ``[E, T]`` array in ``ids`` order)."""
        result = linear_datamodeling_score(scores, self.masks, self.measured, ids=self.ids, bootstrap=bootstrap,
                                           seed=seed)
        result.info.update(self.info, targets=self.targets)
        return result


def random_reference(subsets: LDSSubsets, num_seeds: int = 100) -> dict:
    """LDS of ``num_seeds`` random score vectors (the ``random`` baseline's seeds 0..n-1).

    One random vector's LDS is a draw with spread ≈ 1/√E around 0 (it correlates by chance
    with the true effects of E demos); the bootstrap CI of one vector covers only the
    subset noise. The distribution over seeds is the reference a method must beat.

    Returns:
        ``mean``, ``sd``, ``q025``, ``q975`` of the per-seed LDS and ``num_seeds``.
    """
    from cupid_engine.scorers.baselines import random_scores

    values = np.array([subsets.evaluate(random_scores(subsets.ids, seed), bootstrap=0).mean
                       for seed in range(num_seeds)])
    values = values[np.isfinite(values)]
    if not len(values):
        return {"mean": None, "sd": None, "q025": None, "q975": None, "num_seeds": 0}
    lo, hi = np.quantile(values, [0.025, 0.975])
    return {"mean": float(values.mean()), "sd": float(values.std()), "q025": float(lo), "q975": float(hi),
            "num_seeds": int(len(values))}


@dataclasses.dataclass(frozen=True)
class LDSConfig(Config):
    """How the LDS subsets are drawn and trained (shared by :func:`measure_subsets`,
    :func:`run_lds` and :func:`run_lds_many`)."""

    num_subsets: int = field(64, help="subset trainings S")
    fraction: float = field(0.5, help="fraction of the training demos in each subset")
    seed: int = field(0, help="seed of the subsets (and of the bootstrap in run_lds)")
    cache_dir: str | None = field(None, help="subset-training cache (shared with the regression estimator)")
    workers: int = field(1, help="1 = in process, W > 1 = Ray actors")
    address: str | None = field(None, help="Ray cluster address")
    full_normalizer: bool = field(
        True, help="every subset policy uses the normaliser fitted on all training demos (else refit per subset)"
    )

    def __post_init__(self) -> None:
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", os.fspath(self.cache_dir))
        check(self.num_subsets >= 1, "num_subsets must be >= 1")
        check(self.workers >= 1, "workers must be >= 1")


def _lds_config(config: LDSConfig | None, options: Mapping[str, Any]) -> LDSConfig:
    """``config`` (default :class:`LDSConfig`) with keyword ``options`` replacing its fields."""
    return (config or LDSConfig()).replace(**options) if options else (config or LDSConfig())


def measure_subsets(
    policy_config: PolicyConfig,
    train_episodes: Sequence[Episode],
    target_episodes: Sequence[Episode],
    train_config: TrainConfig,
    config: LDSConfig | None = None,
    *,
    metric: Any = None,
    progress: bool = False,
    **options: Any,
) -> LDSSubsets:
    """Train one policy per random fraction of the training demos and measure the metric.

    Args:
        policy_config: Policy trained on every subset.
        train_episodes: The ``E`` training demonstrations the scores rank.
        target_episodes: Target demonstrations; the default metric is the proxy M̂ per
            target demonstration (one LDS target each).
        train_config: Identical training budget for every subset.
        config: Subsets, seed, cache and workers (:class:`LDSConfig`).
        metric: Override of the metric (``metric(policy) -> float | [T]`` with a
            ``fingerprint()``), e.g. a rollout success rate
            (:func:`~cupid_engine.datamodels.metrics.sim_success_metric`).
        progress: tqdm bar.
        **options: :class:`LDSConfig` fields replacing those of ``config``
            (``num_subsets=16, cache_dir=...``).

    Returns:
        The :class:`LDSSubsets`; evaluate any number of scores against it.
    """
    cfg = _lds_config(config, options)
    samples = build_samples(train_episodes, n_obs_steps=policy_config.n_obs_steps, horizon=policy_config.horizon,
                            obs_keys=policy_config.obs_keys)
    clusters = make_clusters(samples)  # one cluster per training demonstration, in order
    metric = metric if metric is not None else ProxyMetric(target_episodes, per_episode=True)
    trainer = SubsetTrainer(policy_config, samples, clusters, train_config, metric, full_normalizer=cfg.full_normalizer)
    masks = fraction_masks(clusters.num_clusters, cfg.num_subsets, fraction=cfg.fraction, seed=cfg.seed)
    measured, info = evaluate_subsets(trainer, masks, cache_dir=cfg.cache_dir,
                                      executor=executor_for(cfg.workers, cfg.address), progress=progress)
    per_demo = isinstance(metric, ProxyMetric) and metric.per_episode
    return LDSSubsets(masks=masks, measured=measured, ids=list(clusters.names),
                      targets=[e.episode_id for e in target_episodes] if per_demo else None,
                      info={**info, "fraction": cfg.fraction, "num_train": clusters.num_clusters})


def run_lds(scores: pa.Table | Mapping[str, float] | np.ndarray, *args: Any, **kwargs: Any) -> LDSResult:
    """End to end for one score: :func:`run_lds_many` with one entry.

    Args:
        scores: Episode scores (table, mapping, or ``[E]`` in ``train_episodes`` order).
        *args, **kwargs: The arguments of :func:`run_lds_many` after ``scores``
            (``policy_config, train_episodes, target_episodes, train_config, config``,
            ``bootstrap=``, ``metric=``, ``progress=``, :class:`LDSConfig` fields).

    Returns:
        The :class:`LDSResult` (``info`` holds the training/cache counts).
    """
    return run_lds_many({"scores": scores}, *args, **kwargs)["scores"]


def run_lds_many(
    scores: Mapping[str, pa.Table | Mapping[str, float] | np.ndarray],
    policy_config: PolicyConfig,
    train_episodes: Sequence[Episode],
    target_episodes: Sequence[Episode],
    train_config: TrainConfig,
    config: LDSConfig | None = None,
    *,
    bootstrap: int = 1000,
    metric: Any = None,
    progress: bool = False,
    **options: Any,
) -> dict[str, LDSResult]:
    """LDS of several scores against one set of subset trainings (trained once, shared).

    Args:
        scores: Name -> episode scores (table, mapping, or ``[E]`` in ``train_episodes`` order).
        bootstrap: Bootstrap resamples (the same resampled subsets for every score).
        **others: As :func:`measure_subsets`.

    Returns:
        Name -> :class:`LDSResult`, in the order of ``scores``.
    """
    cfg = _lds_config(config, options)
    subsets = measure_subsets(policy_config, train_episodes, target_episodes, train_config, cfg, metric=metric,
                              progress=progress)
    out = {}
    for name, sc in scores.items():
        out[name] = subsets.evaluate(sc, bootstrap=bootstrap, seed=cfg.seed)
        log.info("LDS %s: %.4f [%.4f, %.4f] over %d subsets", name, out[name].mean, out[name].ci_low,
                 out[name].ci_high, cfg.num_subsets)
    return out


def format_lds_table(results: Mapping[str, LDSResult]) -> str:
    """The side-by-side table: method, LDS (mean Spearman over targets), CI, pooled, sizes."""
    level = round(100 * next(iter(results.values())).confidence) if results else 95
    rows = [("method", "LDS", f"{level}% CI",
             "pooled", "n_subsets", "n_targets")]
    for name, r in results.items():
        ci = "—" if not (np.isfinite(r.ci_low) and np.isfinite(r.ci_high)) else f"[{r.ci_low:+.3f}, {r.ci_high:+.3f}]"
        rows.append((name, f"{r.mean:+.3f}" if np.isfinite(r.mean) else "nan", ci,
                     f"{r.pooled:+.3f}" if np.isfinite(r.pooled) else "—", str(r.masks.shape[0]),
                     str(r.measured.shape[1])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
