"""Datamodels (DataMIL, Dass et al. 2025): which clusters of demonstrations raise a target metric.

A linear datamodel predicts the target metric of a policy trained on a subset of the
training clusters as the sum of per-cluster scores. Modules:

* ``clusters``: trajectories or sub-trajectories of ``h`` steps as the scored units.
* ``metrics``: the differentiable proxy ``M̂ = −weighted mean BC loss on target demos``
  and pluggable true metrics (rollout success rate).
* ``functional``: functional SGD/Adam and exact reverse-mode metagradients with segment
  checkpointing (the reference ``unroll`` mode beside it).
* ``metagradient``: the metagradient estimator for policies (``dM̂/dw`` at ``w = 1``,
  optionally only through the last K updates on an injected batch).
* ``regression``: the regression estimator: Bernoulli subset masks, one training per
  mask (in process or on Ray actors, cached on disk and resumable), least squares with
  optional ridge / lasso.
* ``selection``: top-x% cluster selection and co-training with target sampled w.p. α.
* ``lds``: the linear datamodeling score (Spearman of predicted vs measured metrics on
  random subsets) and its end-to-end runners (one training set of subsets, any number
  of scores evaluated against it).
* ``compare``: the score tables of cupid, trak-traj, tracin, datamodel and random
  computed from a dataset (base training with checkpoints, a gradient store, the
  scorers) for ``cupid-engine eval lds --methods``.
* ``scorer``: the ``datamodel`` scorer (registry) and :func:`datamodel_scores`.

The package sits above ``scorers``, ``policies``, ``featurize``, ``sim`` and
``distributed``: it retrains policies and runs rollouts. The scorer registry imports
``datamodels.scorer`` by name on first use of ``datamodel``; the CLI flags live in
``cli/_datamodel_args.py``.

Subset trainings run on an executor (``cupid_engine.executor``): in this process, or on
the Ray actors of ``cupid_engine.distributed.executor_for(workers, address)`` that the
configs' ``workers``/``address`` ask for.
"""

from cupid_engine.datamodels.clusters import (
    CLUSTER_MODES,
    ClusterConfig,
    Clusters,
    make_clusters,
    with_fixed_cluster,
)
from cupid_engine.datamodels.functional import (
    FunctionalAdam,
    FunctionalOptimizer,
    FunctionalSGD,
    functional_train,
    make_optimizer,
    reverse_metagradient,
)
from cupid_engine.datamodels.metagradient import MetagradientConfig, MetagradientResult, metagradient_scores
from cupid_engine.datamodels.lds import (
    LDSConfig,
    LDSResult,
    LDSSubsets,
    format_lds_table,
    linear_datamodeling_score,
    measure_subsets,
    random_reference,
    run_lds,
    run_lds_many,
)
from cupid_engine.datamodels.compare import LDS_METHODS, CompareConfig, method_score_tables
from cupid_engine.datamodels.metrics import ProxyMetric, RolloutMetric, sim_success_metric
from cupid_engine.datamodels.regression import (
    LinearDatamodel,
    RegressionConfig,
    RegressionResult,
    SubsetCache,
    SubsetTrainer,
    evaluate_subsets,
    fit_linear_datamodel,
    fraction_masks,
    regression_scores,
    sample_masks,
)
from cupid_engine.datamodels.scorer import (
    DatamodelConfig,
    DatamodelScorer,
    datamodel_scores,
)
from cupid_engine.datamodels.selection import (
    CoTrainSampler,
    concat_samples,
    cotrain_policy,
    select_top,
    selected_samples,
)

__all__ = [
    "CLUSTER_MODES",
    "ClusterConfig",
    "Clusters",
    "CoTrainSampler",
    "DatamodelConfig",
    "DatamodelScorer",
    "FunctionalAdam",
    "FunctionalOptimizer",
    "FunctionalSGD",
    "LDSConfig",
    "LDSResult",
    "LDSSubsets",
    "LDS_METHODS",
    "CompareConfig",
    "LinearDatamodel",
    "MetagradientConfig",
    "MetagradientResult",
    "ProxyMetric",
    "RegressionConfig",
    "RegressionResult",
    "RolloutMetric",
    "SubsetCache",
    "SubsetTrainer",
    "concat_samples",
    "cotrain_policy",
    "datamodel_scores",
    "evaluate_subsets",
    "fit_linear_datamodel",
    "format_lds_table",
    "fraction_masks",
    "functional_train",
    "linear_datamodeling_score",
    "make_clusters",
    "make_optimizer",
    "measure_subsets",
    "method_score_tables",
    "metagradient_scores",
    "regression_scores",
    "reverse_metagradient",
    "random_reference",
    "run_lds",
    "run_lds_many",
    "sample_masks",
    "select_top",
    "selected_samples",
    "sim_success_metric",
    "with_fixed_cluster",
]
