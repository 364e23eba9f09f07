"""The datamodel scorer on a store catalog + dataset, and ``cupid-engine eval lds``."""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pyarrow as pa
import pytest

from dm_helpers import make_episodes

from cupid_engine.cli import main
from cupid_engine.data import write_dataset
from cupid_engine.cli._datamodel_args import add_arguments, config_from_args
from cupid_engine.datamodels.scorer import DatamodelScorer
from cupid_engine.scorers.table import read_table, write_table
from cupid_engine.store import create_store, open_store


@pytest.fixture
def setup(tmp_path):
    train = make_episodes(n=5, length=6)
    target = [dataclasses.replace(e, split="target") for e in make_episodes(n=2, length=6, seed=4, prefix="tg")]
    write_dataset(tmp_path / "ds", train + target)
    st = create_store(str(tmp_path / "s.zarr"))
    st.add_episodes(pa.table({"episode_id": [e.episode_id for e in train + target],
                              "split": [e.split for e in train + target],
                              "length": [e.length for e in train + target]}))
    return tmp_path, [e.episode_id for e in train]


@pytest.mark.parametrize("estimator", ["regression", "metagradient"])
def test_datamodel_scorer_reads_catalog_and_dataset(setup, estimator):
    tmp_path, train_ids = setup
    from cupid_engine.scorers import get_scorer

    assert get_scorer("datamodel") is DatamodelScorer
    scorer = DatamodelScorer(data=str(tmp_path / "ds"), estimator=estimator, steps=6, batch_size=8,
                             num_subsets=6, cluster="subtrajectory", window=3)
    table = scorer.score(open_store(str(tmp_path / "s.zarr")), "base")
    assert table["episode_id"].to_pylist() == train_ids
    assert set(table["split"].to_pylist()) == {"train"}
    assert table["num_clusters"].to_pylist() == [2] * 5
    assert np.isfinite(table["score"].to_numpy()).all() and np.abs(table["score"].to_numpy()).max() > 0


def test_cli_hooks_build_config(setup):
    tmp_path, _ = setup
    parser = argparse.ArgumentParser()
    parser.add_argument("--target")
    add_arguments(parser)
    args = parser.parse_args(["--estimator", "metagradient", "--data", "d", "--steps", "7", "--last-k", "2",
                              "--target", "tg000,tg001"])
    cfg = config_from_args(args, {"lr": 0.01})
    assert (cfg.estimator, cfg.train.steps, cfg.metagradient.last_k, cfg.target, cfg.train.lr) == (
        "metagradient", 7, 2, "tg000,tg001", 0.01)


def test_eval_lds_command(setup, capsys):
    tmp_path, train_ids = setup
    scores = tmp_path / "scores.parquet"
    from cupid_engine.scorers.table import make_table

    write_table(make_table(train_ids, np.arange(5.0), method="length"), scores)
    argv = ["eval", "lds", "--store", str(tmp_path / "s.zarr"), "--run", "base", "--scores", str(scores),
            "--subsets", "4", "--fraction", "0.6", "--data", str(tmp_path / "ds"), "--steps", "5",
            "--batch-size", "8", "--cache", str(tmp_path / "cache"), "--bootstrap", "10", "--no-progress",
            "--out", str(tmp_path / "lds.json")]
    assert main(argv) == 0
    out = json.loads((tmp_path / "lds.json").read_text())
    from cupid_engine.datamodels.regression import fraction_masks

    distinct = len(np.unique(fraction_masks(5, 4, fraction=0.6, seed=0), axis=0))
    (res,) = out["results"]
    assert out["num_subsets"] == 4 and out["trained"] == distinct and len(res["per_target"]) == 2
    assert out["targets"] == ["tg000", "tg001"] and res["method"] == "length" and res["num_targets"] == 2
    assert main(argv) == 0  # the rerun reuses every training
    assert json.loads((tmp_path / "lds.json").read_text())["cached"] == distinct
    assert read_table(scores).num_rows == 5


def test_score_command_reaches_the_registered_scorer(setup):
    # `cupid-engine score datamodel --set ...` works through the score command's generic
    # path once cupid_engine.datamodels.scorer is imported (registration).
    tmp_path, train_ids = setup
    out = tmp_path / "dm.parquet"
    argv = ["score", "datamodel", "--store", str(tmp_path / "s.zarr"), "--run", "base", "--out", str(out),
            "--target", "target", "--set", f"data={tmp_path / 'ds'}", "--set", "estimator=metagradient",
            "--set", "steps=4", "--set", "batch_size=8"]
    assert main(argv) == 0
    table = read_table(out)
    assert table["episode_id"].to_pylist() == train_ids and table["method"][0].as_py() == "datamodel"


def test_cli_score_with_datamodel_flags(setup):
    tmp_path, train_ids = setup
    parser = argparse.ArgumentParser()  # what the score command has, plus add_arguments
    for flag in ("--store", "--run", "--out", "--target", "--episodes", "--rollouts"):
        parser.add_argument(flag)
    parser.add_argument("--set", dest="options", action="append", default=[])
    add_arguments(parser)
    out = tmp_path / "dm.parquet"
    args = parser.parse_args(["--store", str(tmp_path / "s.zarr"), "--run", "base", "--out", str(out),
                              "--estimator", "regression", "--data", str(tmp_path / "ds"), "--steps", "4",
                              "--batch-size", "8", "--subsets", "4", "--cache", str(tmp_path / "c"),
                              "--set", "ridge=0.1"])
    from cupid_engine.cli._datamodel_args import cli_score

    assert cli_score(args) == 0
    table = read_table(out)
    assert table.num_rows == 5 and table["estimator"][0].as_py() == "regression"


@pytest.mark.parametrize("estimator", ["regression", "metagradient"])
def test_target_half_in_training(estimator):
    from cupid_engine.policies import MLPPolicyConfig, TrainConfig
    from cupid_engine.datamodels.regression import RegressionConfig
    from cupid_engine.datamodels.scorer import datamodel_scores

    train = make_episodes(n=4, length=5)
    target = make_episodes(n=4, length=5, seed=6, prefix="tg")
    table = datamodel_scores(train, target, MLPPolicyConfig(hidden_sizes=(8,)), TrainConfig(steps=5, batch_size=8),
                             estimator=estimator, regression=RegressionConfig(num_subsets=5),
                             target_in_training=True)
    assert table["episode_id"].to_pylist() == [e.episode_id for e in train]
    assert np.isfinite(table["score"].to_numpy()).all()
    with pytest.raises(ValueError, match="at least 2"):
        datamodel_scores(train, target[:1], MLPPolicyConfig(hidden_sizes=(8,)), TrainConfig(steps=5),
                         estimator=estimator, target_in_training=True)
