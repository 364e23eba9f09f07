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
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from cupid_engine.config import Config, check, field
from cupid_engine.data.episode import Episode
from cupid_engine.errors import ConfigError
from cupid_engine.policies.base import PolicyConfig
from cupid_engine.policies.samples import build_samples
from cupid_engine.policies.training import TrainConfig
from cupid_engine.scorers.base import Scorer, register
from cupid_engine.datamodels.clusters import ClusterConfig, make_clusters, with_fixed_cluster
from cupid_engine.datamodels.metagradient import MetagradientConfig, metagradient_scores
from cupid_engine.datamodels.metrics import ProxyMetric
from cupid_engine.datamodels.regression import RegressionConfig, SubsetTrainer, regression_scores
from cupid_engine.datamodels.selection import concat_samples
from cupid_engine.scorers.table import make_table

if TYPE_CHECKING:
    from cupid_engine.store.reader import StoreReader

log = logging.getLogger(__name__)

from cupid_engine.constants import DATAMODEL_ESTIMATORS as ESTIMATORS  # noqa: E402
METHOD = "datamodel"


# Flat option -> (component of DatamodelConfig, field inside it): what ``--set KEY=VALUE``,
# the CLI flags and ``DatamodelScorer(**options)`` reach. ``seed`` sets both train.seed and
# regression.seed (one seed for initialisation, data order, noise and the subset masks).
FLAT_OPTIONS = {
    "steps": ("train", "steps"), "batch_size": ("train", "batch_size"), "lr": ("train", "lr"),
    "optimizer": ("train", "optimizer"), "weight_decay": ("train", "weight_decay"),
    "cluster": ("clusters", "mode"), "window": ("clusters", "window"),
    "num_subsets": ("regression", "num_subsets"), "p": ("regression", "p"), "ridge": ("regression", "ridge"),
    "lasso": ("regression", "lasso"), "workers": ("regression", "workers"), "address": ("regression", "address"),
    "cache_dir": ("regression", "cache_dir"),
    "segments": ("metagradient", "segments"), "last_k": ("metagradient", "last_k"),
    "momentum": ("metagradient", "momentum"), "dtype": ("metagradient", "dtype"),
}
_COMPONENTS = ("train", "clusters", "regression", "metagradient")


def _default_train() -> TrainConfig:
    # Datamodels retrain many tiny policies: small batches, plain Adam, a fixed step budget.
    return TrainConfig(steps=500, batch_size=64, optimizer="adam")


@dataclasses.dataclass(frozen=True)
class DatamodelConfig(Config):
    """Everything a datamodel score depends on: the data and policy, plus the configs of the
    training, the clusters and both estimators. Build it from flat options (``steps=``,
    ``ridge=`` ...; :data:`FLAT_OPTIONS`) with :meth:`from_options`."""

    data: str = field("", help="dataset (path or URL, any format open_source reads) holding the episodes")
    estimator: str = field("regression", help=f"one of {ESTIMATORS}")
    episodes: str | None = field(None, help="episodes to score: split(s) joined by '+' or ids (default 'train')")
    target: str | None = field(None, help="target demonstrations of the proxy metric: a split or ids (default 'target')")
    policy: str = field("mlp", help="policy kind trained on subsets: mlp or diffusion")
    size: str = field("tiny", help="policy size preset: tiny, default, large (mlp only)")
    obs_keys: tuple[str, ...] | None = field(None, help="observation keys (None: all, sorted)")
    target_in_training: bool = field(False, help="train on half the target demos, measure on the other half")
    train: TrainConfig = field(default_factory=_default_train, help="every training (identical budget per subset)")
    clusters: ClusterConfig = field(default_factory=ClusterConfig, help="how samples are grouped into clusters")
    regression: RegressionConfig = field(default_factory=RegressionConfig, help="regression estimator options")
    metagradient: MetagradientConfig = field(default_factory=MetagradientConfig, help="metagradient estimator options")

    def __post_init__(self) -> None:
        check(self.estimator in ESTIMATORS, f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        check(self.policy in ("mlp", "diffusion"), f"policy must be mlp or diffusion, got {self.policy!r}")
        check(self.size in ("tiny", "default", "large"), f"size must be tiny, default or large, got {self.size!r}")
        for name, cls in (("train", TrainConfig), ("clusters", ClusterConfig), ("regression", RegressionConfig),
                          ("metagradient", MetagradientConfig)):
            check(isinstance(getattr(self, name), cls), f"{name} must be a {cls.__name__}")

    @classmethod
    def options(cls) -> list[str]:
        """Every flat option :meth:`from_options` accepts."""
        own = [f.name for f in dataclasses.fields(cls) if f.name not in _COMPONENTS]
        return sorted(own + list(_COMPONENTS) + list(FLAT_OPTIONS) + ["seed"])

    @classmethod
    def from_options(cls, **options: Any) -> "DatamodelConfig":
        """A config from flat options: own fields, whole components, or :data:`FLAT_OPTIONS`
        names (applied on top of the components); ``seed`` sets train and regression seeds.

        Raises:
            TypeError: An unknown option (naming it).
            ConfigError: A value a component rejects.
        """
        unknown = sorted(set(options) - set(cls.options()))
        if unknown:
            raise TypeError(f"unknown datamodel options {unknown}")
        own = {k: v for k, v in options.items() if k not in FLAT_OPTIONS and k != "seed"}
        changes: dict[str, dict[str, Any]] = {c: {} for c in _COMPONENTS}
        for key, value in options.items():
            if key in FLAT_OPTIONS:
                component, name = FLAT_OPTIONS[key]
                changes[component][name] = value
        if "seed" in options:
            changes["train"]["seed"] = changes["regression"]["seed"] = options["seed"]
        defaults = {"train": _default_train, "clusters": ClusterConfig, "regression": RegressionConfig,
                    "metagradient": MetagradientConfig}
        for component, fields in changes.items():
            base = own.get(component) or defaults[component]()
            own[component] = base.replace(**fields) if fields else base
        return cls(**own)

    def policy_config(self) -> PolicyConfig:
        return make_policy_config(self.policy, self.size, obs_keys=self.obs_keys)


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

    def __init__(self, config: DatamodelConfig | None = None, **options: Any) -> None:
        """With ``options`` (flat, see :meth:`DatamodelConfig.from_options`) instead of a config."""
        if config is None and options:
            try:
                config = DatamodelConfig.from_options(**options)
            except TypeError as exc:  # an unknown option, or a value of the wrong type
                raise ConfigError(f"{self.name}: invalid options {options} ({exc})",
                                  hint=f"options of {self.name}: {DatamodelConfig.options()}") from None
            options = {}
        super().__init__(config, **options)

    def score(self, store: StoreReader, run: str | None = None, **inputs: Any) -> pa.Table:
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
            _load(cfg.data, train_ids), _load(cfg.data, target_ids), cfg.policy_config(), cfg.train,
            estimator=cfg.estimator, clusters=cfg.clusters, regression=cfg.regression,
            metagradient=cfg.metagradient, metric=inputs.get("metric"),
            step_weights=inputs.get("step_weights"), splits=splits, config=cfg,
            target_in_training=cfg.target_in_training,
        )
