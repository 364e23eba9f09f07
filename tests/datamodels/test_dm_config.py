"""DatamodelConfig: composed of the training, cluster and estimator configs, built from flat options."""

from __future__ import annotations

import json

import pytest

from cupid_engine.datamodels.clusters import ClusterConfig
from cupid_engine.datamodels.metagradient import MetagradientConfig
from cupid_engine.datamodels.regression import RegressionConfig
from cupid_engine.datamodels.scorer import FLAT_OPTIONS, DatamodelConfig, DatamodelScorer
from cupid_engine.errors import ConfigError
from cupid_engine.policies.training import TrainConfig

OPTIONS = dict(steps=7, batch_size=8, lr=0.01, optimizer="sgd", weight_decay=0.1, seed=4, cluster="subtrajectory",
               window=3, num_subsets=6, p=0.3, ridge=0.1, lasso=0.01, workers=2, address="host:1",
               cache_dir="/c", segments=3, last_k=2, momentum=0.5, dtype="float64", data="d",
               estimator="metagradient", target="t", episodes="train")


def test_defaults_are_the_datamodel_budget():
    cfg = DatamodelConfig()
    assert cfg.train == TrainConfig(steps=500, batch_size=64, optimizer="adam")
    assert (cfg.clusters, cfg.regression, cfg.metagradient) == (ClusterConfig(), RegressionConfig(), MetagradientConfig())
    assert DatamodelConfig.from_options() == cfg


def test_flat_options_reach_their_component():
    assert set(FLAT_OPTIONS) | {"seed"} <= set(OPTIONS)  # every flat option is exercised
    cfg = DatamodelConfig.from_options(**OPTIONS)
    for key, (component, name) in FLAT_OPTIONS.items():
        assert getattr(getattr(cfg, component), name) == OPTIONS[key], key
    assert cfg.train.seed == cfg.regression.seed == 4  # one seed for training and the subset masks
    assert (cfg.data, cfg.estimator, cfg.target, cfg.episodes) == ("d", "metagradient", "t", "train")


def test_to_dict_round_trip_is_lossless():
    cfg = DatamodelConfig.from_options(**OPTIONS, obs_keys=("a", "b"))
    assert DatamodelConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert DatamodelConfig.from_dict(cfg.to_dict()).hash() == cfg.hash()


def test_whole_components_and_flat_options_combine():
    cfg = DatamodelConfig.from_options(regression=RegressionConfig(ridge=0.5, threads_per_worker=2), num_subsets=9)
    assert (cfg.regression.ridge, cfg.regression.threads_per_worker, cfg.regression.num_subsets) == (0.5, 2, 9)


def test_bad_options_are_one_clear_error():
    with pytest.raises(ConfigError, match="rigde"):
        DatamodelScorer(rigde=0.1)
    with pytest.raises(ConfigError, match="ridge"):
        DatamodelScorer(ridge=-1.0)
    with pytest.raises(ConfigError, match="mode must be one of"):
        DatamodelConfig.from_options(cluster="nope")
    with pytest.raises(ConfigError, match="train must be a TrainConfig"):
        DatamodelConfig(train=RegressionConfig())
    assert DatamodelScorer(steps=3).config.train.steps == 3
