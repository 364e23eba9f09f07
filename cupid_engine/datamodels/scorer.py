"""The ``datamodel`` scorer: DataMIL scores of a store's training episodes as a score table.

Unlike the gradient-feature scorers, a datamodel retrains policies, so it reads the
store only for its catalog (which episodes are training / target demonstrations) and
loads the episodes themselves from the dataset named by ``data``. Scores are per
cluster; an episode's score is the sum over its clusters (the datamodel is additive).

Entry points: :func:`datamodel_scores` (library) and :class:`DatamodelScorer` (registered
as ``datamodel`` in the scorer registry, which imports this module on first use). The
command line lives in ``cupid_engine/cli/_datamodel_args.py``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from cupid_engine.config import Config, check, field
from cupid_engine.data.episode import Episode
from cupid_engine.policies.base import PolicyConfig
from cupid_engine.policies.samples import build_samples
from cupid_engine.policies.training import OPTIMIZERS, TrainConfig
from cupid_engine.scorers.base import Scorer, register
from cupid_engine.datamodels.clusters import CLUSTER_MODES, ClusterConfig, make_clusters, with_fixed_cluster
from cupid_engine.datamodels.metagradient import DTYPES, MetagradientConfig, metagradient_scores
from cupid_engine.datamodels.metrics import ProxyMetric
from cupid_engine.datamodels.regression import RegressionConfig, SubsetTrainer, regression_scores
from cupid_engine.datamodels.selection import concat_samples
from cupid_engine.scorers.table import make_table

log = logging.getLogger(__name__)

from cupid_engine.constants import DATAMODEL_ESTIMATORS as ESTIMATORS  # noqa: E402
METHOD = "datamodel"


@dataclasses.dataclass(frozen=True)
class DatamodelConfig(Config):
    """Everything a datamodel score depends on (flat, so ``--set KEY=VALUE`` reaches it)."""

    data: str = field("", help="dataset (path or URL, any format open_source reads) holding the episodes")
    estimator: str = field("regression", help=f"one of {ESTIMATORS}")
    episodes: str | None = field(None, help="episodes to score: split(s) joined by '+' or ids (default 'train')")
    target: str | None = field(None, help="target demonstrations of the proxy metric: a split or ids (default 'target')")
    policy: str = field("mlp", help="policy kind trained on subsets: mlp or diffusion")
    size: str = field("tiny", help="policy size preset: tiny, default, large (mlp only)")
    obs_keys: tuple[str, ...] | None = field(None, help="observation keys (None: all, sorted)")
    cluster: str = field("trajectory", help=f"clusters: one of {CLUSTER_MODES}")
    window: int = field(15, help="sub-trajectory length h (cluster=subtrajectory)")
    steps: int = field(500, help="optimizer steps of every training (identical budget per subset)")
    batch_size: int = field(64, help="batch size")
    lr: float = field(1e-3, help="learning rate")
    optimizer: str = field("adam", help=f"one of {OPTIMIZERS}")
    weight_decay: float = field(0.0, help="weight decay")
    seed: int = field(0, help="seed of initialisation, data order and noise (and the subset masks)")
    num_subsets: int = field(64, help="regression: subset trainings S")
    p: float = field(0.5, help="regression: probability a cluster is in a subset")
    ridge: float = field(0.0, help="regression: ridge penalty")
    lasso: float = field(0.0, help="regression: lasso penalty")
    workers: int = field(1, help="regression: parallel trainings (W > 1: Ray actors)")
    address: str | None = field(None, help="regression: Ray cluster address")
    cache_dir: str | None = field(None, help="regression: folder of finished trainings (resume)")
    segments: int = field(8, help="metagradient: checkpoint segments")
    last_k: int | None = field(None, help="metagradient: differentiate only the last K updates (injected batch)")
    momentum: float = field(0.0, help="metagradient: SGD momentum")
    dtype: str = field("float32", help="metagradient: float32 or float64")
    target_in_training: bool = field(False, help="train on half the target demos, measure on the other half")

    def __post_init__(self) -> None:
        check(self.estimator in ESTIMATORS, f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        check(self.policy in ("mlp", "diffusion"), f"policy must be mlp or diffusion, got {self.policy!r}")
        check(self.size in ("tiny", "default", "large"), f"size must be tiny, default or large, got {self.size!r}")
        check(self.cluster in CLUSTER_MODES, f"cluster must be one of {CLUSTER_MODES}")
        check(self.dtype in DTYPES, f"dtype must be one of {tuple(DTYPES)}")

    def policy_config(self) -> PolicyConfig:
        return make_policy_config(self.policy, self.size, obs_keys=self.obs_keys)

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, optimizer=self.optimizer,
                           weight_decay=self.weight_decay, seed=self.seed)

    def cluster_config(self) -> ClusterConfig:
        return ClusterConfig(mode=self.cluster, window=self.window)

    def regression_config(self) -> RegressionConfig:
        return RegressionConfig(num_subsets=self.num_subsets, p=self.p, seed=self.seed, ridge=self.ridge,
                                lasso=self.lasso, workers=self.workers, address=self.address,
                                cache_dir=self.cache_dir)

    def metagradient_config(self) -> MetagradientConfig:
        return MetagradientConfig(segments=self.segments, last_k=self.last_k, momentum=self.momentum,
                                  dtype=self.dtype)


def make_policy_config(kind: str, size: str = "default", **fields: Any) -> PolicyConfig:
    """A policy config from a kind (mlp, diffusion) and size preset (tiny, default, large)."""
    from cupid_engine.policies.diffusion import DiffusionPolicyConfig
    from cupid_engine.policies.mlp import MLPPolicyConfig

    fields = {k: v for k, v in fields.items() if v is not None}
    if kind == "mlp":
        return {"tiny": MLPPolicyConfig.tiny, "default": MLPPolicyConfig, "large": MLPPolicyConfig.large}[size](**fields)
    if kind == "diffusion":
        if size == "large":
            raise ValueError("size 'large' exists for the mlp policy only")
        return (DiffusionPolicyConfig.tiny if size == "tiny" else DiffusionPolicyConfig)(**fields)
    raise ValueError(f"unknown policy kind {kind!r}; choose mlp or diffusion")


def datamodel_scores(
    train_episodes: Sequence[Episode],
    target_episodes: Sequence[Episode],
    policy_config: PolicyConfig,
    train_config: TrainConfig,
    *,
    estimator: str = "regression",
    clusters: ClusterConfig | None = None,
    regression: RegressionConfig | None = None,
    metagradient: MetagradientConfig | None = None,
    metric: Any = None,
    step_weights: Any = None,
    splits: Sequence[str] | str = "train",
    config: Config | None = None,
    target_in_training: bool = False,
    progress: bool = False,
) -> pa.Table:
    """DataMIL scores of training episodes as a score table.

    Args:
        train_episodes: The episodes to score (the prior data).
        target_episodes: Target demonstrations of the proxy metric.
        policy_config: Policy trained by the estimator.
        train_config: Training budget (every subset / the unrolled run).
        estimator: ``regression`` or ``metagradient``.
        clusters: Clustering (default: trajectories).
        regression: Regression estimator options.
        metagradient: Metagradient estimator options.
        metric: Override of the metric (regression only: a rollout success rate, say);
            default the proxy M̂ on ``target_episodes``.
        step_weights: Per-step weights of the proxy (array over target samples or
            ``(episode_id, step) -> w``).
        splits: Split of every row, or one per episode.
        config: Recorded in the table (hash and JSON).
        target_in_training: DataMIL's distribution-shift fix (§4.2): the first half of
            the target demonstrations joins every training run (unscored, always in),
            the second half defines the proxy metric. Needs >= 2 target demos; an
            array of ``step_weights`` then covers the second half's samples only.
        progress: tqdm bars.

    Returns:
        Score table (``method = "datamodel"``) with one row per training episode and the
        extra columns ``estimator`` and ``num_clusters``.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    window = {"n_obs_steps": policy_config.n_obs_steps, "horizon": policy_config.horizon,
              "obs_keys": policy_config.obs_keys}
    samples = build_samples(train_episodes, **window)
    cl = make_clusters(samples, clusters)
    target_episodes = list(target_episodes)
    train_samples, train_clusters, fixed = samples, cl, 0
    if target_in_training:
        if len(target_episodes) < 2:
            raise ValueError("target_in_training needs at least 2 target demonstrations (half to train on)")
        half = len(target_episodes) // 2
        mixed = build_samples(target_episodes[:half], **{**window, "obs_keys": samples.obs_keys})
        train_samples = concat_samples(samples, mixed)
        train_clusters = with_fixed_cluster(cl, len(mixed), name="<target-train-half>")
        target_episodes, fixed = target_episodes[half:], 1
    proxy = ProxyMetric(target_episodes, step_weights=step_weights)
    if estimator == "regression":
        trainer = SubsetTrainer(policy_config, train_samples, train_clusters, train_config,
                                metric if metric is not None else proxy, fixed_clusters=fixed)
        cluster_scores = regression_scores(trainer, cl.num_clusters, regression, progress=progress).scores
    else:
        if metric is not None:
            raise ValueError("the metagradient estimator needs the differentiable proxy metric")
        cluster_scores = metagradient_scores(policy_config, train_samples, train_clusters, proxy, train_config,
                                             metagradient, progress=progress).scores[: cl.num_clusters]
    per_episode = cl.episode_scores(cluster_scores)
    counts = np.bincount(cl.episode, minlength=len(cl.episode_ids))
    return make_table(cl.episode_ids, per_episode, method=METHOD, splits=splits, config=config,
                      metadata={"estimator": [estimator] * len(cl.episode_ids), "num_clusters": counts.tolist()})


def _load(data: str, ids: Sequence[str]) -> list[Episode]:
    from cupid_engine.data.sources import open_source

    by_id = {ep.episode_id: ep for ep in open_source(data).episodes(ids=list(ids))}
    return [by_id[i] for i in ids]


@register
class DatamodelScorer(Scorer):
    """DataMIL datamodel scores (regression or metagradient estimator)."""

    name = METHOD
    config_cls = DatamodelConfig

    def score(self, store: Any, run: str | None = None, **inputs: Any) -> pa.Table:
        """Score ``episodes`` of the store's catalog against ``target`` demonstrations.

        Args:
            store: Open store (its ``catalog()`` gives episode ids and splits).
            run: Unused (datamodels retrain instead of reading gradients); accepted for
                the common scorer interface.
            **inputs: ``step_weights`` (proxy metric weights), ``metric`` (override).
        """
        from cupid_engine.scorers._inputs import metadata_columns, resolve_episodes

        cfg: DatamodelConfig = self.config  # type: ignore[assignment]
        if not cfg.data:
            raise ValueError("the datamodel scorer needs data= (the dataset holding the episodes)")
        catalog = store.catalog()
        train_ids = resolve_episodes(catalog, cfg.episodes, default="train")
        target_ids = resolve_episodes(catalog, cfg.target, default="target")
        splits, _ = metadata_columns(catalog, train_ids)
        return datamodel_scores(
            _load(cfg.data, train_ids), _load(cfg.data, target_ids), cfg.policy_config(), cfg.train_config(),
            estimator=cfg.estimator, clusters=cfg.cluster_config(), regression=cfg.regression_config(),
            metagradient=cfg.metagradient_config(), metric=inputs.get("metric"),
            step_weights=inputs.get("step_weights"), splits=splits, config=cfg,
            target_in_training=cfg.target_in_training,
        )
