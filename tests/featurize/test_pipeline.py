"""End to end: a LeRobot dataset on disk -> featurize into a real store -> resume -> Gram."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cupid_engine.data import open_dataset, write_dataset
from cupid_engine.featurize import FeaturizeConfig, Featurizer, featurize
from cupid_engine.featurize import pipeline as pipeline_mod
from cupid_engine.featurize import shards as shards_mod
from cupid_engine.policies import MLPPolicyConfig, TrainConfig, build_samples, load_policy, save_policy, train_policy
from cupid_engine.store import GradientStore

from fz_helpers import make_episodes
from _snapshot import tree_mtimes


@pytest.fixture
def setup(tmp_path):
    episodes = make_episodes(n=11, length=6)
    data = write_dataset(tmp_path / "data", episodes, episodes_per_file=4)  # units of 4, 4, 3 episodes
    policy = train_policy(MLPPolicyConfig.tiny(), episodes, TrainConfig(steps=5, batch_size=16), progress=False)
    ckpt = save_policy(policy, tmp_path / "policy")
    return episodes, data, ckpt, tmp_path


def test_featurize_store_resume_and_gram(setup, monkeypatch):
    episodes, data, ckpt, tmp = setup
    cfg = FeaturizeConfig.for_method(k=64, shard_size=3, dtype="float32", batch_size=7, output="loss")
    run = featurize(str(data), tmp / "store.zarr", "base", policy=str(ckpt), config=cfg, progress=False)
    store = GradientStore.open(tmp / "store.zarr")
    cat = store.catalog().to_pylist()
    assert [r["episode_id"] for r in cat] == [e.episode_id for e in episodes]
    # Shards never straddle a data file: units of 4, 4, 3 with shard_size 3 -> 3+1, 3+1, 3.
    assert [r["shard"] for r in cat] == [0, 0, 0, 1, 2, 2, 2, 3, 4, 4, 4]
    assert run.is_complete()

    # Features equal the featuriser applied to each episode's samples directly.
    policy = load_policy(ckpt)
    f = Featurizer.from_config(policy, cfg)
    phis = {}
    for ep in episodes:
        s = build_samples([ep], n_obs_steps=1, horizon=1, obs_keys=policy.config.obs_keys)
        phis[ep.episode_id] = f.featurize_samples(s).numpy()
        np.testing.assert_allclose(run.step_features(ep.episode_id), phis[ep.episode_id], rtol=1e-5, atol=1e-6)
    # Gram = sum of phi phi^T over the training split's steps only.
    X = np.concatenate([phis[e.episode_id] for e in episodes if e.split == "train"]).astype(np.float64)
    np.testing.assert_allclose(run.gram(), X.T @ X, rtol=1e-5, atol=1e-6)
    assert run.gram_count == X.shape[0]
    assert run.config.featurizer == f.describe()

    # Resume: nothing pending -> no shard is featurised or rewritten.
    before = tree_mtimes(tmp / "store.zarr" / "runs" / "base")
    calls = []
    real = shards_mod.featurize_shard
    monkeypatch.setattr(shards_mod, "featurize_shard", lambda *a, **k: calls.append(a) or real(*a, **k))
    featurize(str(data), tmp / "store.zarr", "base", policy=str(ckpt), config=cfg, progress=False)
    assert calls == []
    after = tree_mtimes(tmp / "store.zarr" / "runs" / "base")
    assert after == before  # no shard, marker, Gram or attribute rewritten


def test_partial_run_resumes_only_missing_shards(setup):
    episodes, data, ckpt, tmp = setup
    cfg = FeaturizeConfig.for_method(k=32, shard_size=4, dtype="float16")
    src = open_dataset(data)
    policy = load_policy(ckpt)
    f = Featurizer.from_config(policy, cfg)
    store = GradientStore.create(tmp / "s.zarr")
    run = pipeline_mod.prepare_run(src, store, "r", f, cfg)
    units = pipeline_mod.shard_units(src, store, [0, 1, 2])
    assert set(units.values()) == set(src.shards())
    pipeline_mod.featurize_shard(store, "r", 1, src, f, unit=units[1])
    assert run.pending_shards() == [0, 2]
    done = featurize(src, store, "r", policy=policy, config=cfg, progress=False)
    assert done.is_complete() and done.gram().shape == (32, 32)


def test_config_mismatch_is_refused(setup):
    _, data, ckpt, tmp = setup
    cfg = FeaturizeConfig.for_method(k=32, shard_size=4)
    featurize(str(data), tmp / "s.zarr", "r", policy=str(ckpt), config=cfg, progress=False)
    with pytest.raises(ValueError, match="different config"):
        featurize(str(data), tmp / "s.zarr", "r", policy=str(ckpt), config=cfg.replace(draws=3, output="energy"),
                  progress=False)


def test_nonfinite_features_name_the_episode(setup):
    episodes, data, ckpt, tmp = setup
    policy = load_policy(ckpt)
    with torch.no_grad():
        policy.mean_head.weight[0, 0] = float("nan")
    cfg = FeaturizeConfig.for_method(k=32, shard_size=4)
    with pytest.raises(ValueError, match=r"episode 'ep000' step 0: non-finite"):
        featurize(str(data), tmp / "s.zarr", "r", policy=policy, config=cfg, progress=False)


def test_cli_featurize(setup, capsys):
    from cupid_engine.cli import main

    _, data, ckpt, tmp = setup
    rc = main(["featurize", "--policy", str(ckpt), "--data", str(data), "--store", str(tmp / "c.zarr"), "--run",
               "cli", "--k", "32", "--track", "head", "--shard-size", "4", "--no-progress"])
    assert rc == 0
    assert "finalized=True" in capsys.readouterr().out
    run = GradientStore.open(tmp / "c.zarr").run("cli")
    assert run.config.featurizer["tracked_modules"] == ["mean_head"]
    rc = main(["featurize", "--policy", str(ckpt), "--data", str(data), "--store", str(tmp / "c.zarr"), "--run",
               "v", "--k", "32", "--method", "sparse", "--no-progress"])
    assert GradientStore.open(tmp / "c.zarr").run("v").config.featurizer["path"] == "vmap"


def test_split_registers_only_that_split(setup):
    episodes, data, ckpt, tmp = setup
    cfg = FeaturizeConfig.for_method(k=32, shard_size=4)
    run = featurize(str(data), tmp / "s.zarr", "r", policy=str(ckpt), config=cfg, split="holdout", progress=False)
    ids = run.store.episode_ids()
    assert ids == [e.episode_id for e in episodes if e.split == "holdout"] and run.is_complete()
    # Holdout steps are not in the Gram (training split only).
    assert run.gram_count == 0


def test_registration_adds_only_missing_episodes_unit_by_unit(setup):
    episodes, data, ckpt, tmp = setup
    src = open_dataset(data)
    store = GradientStore.create(tmp / "reg.zarr")
    first = pipeline_mod.register_episodes(src, store, shard_size=3, split="train")
    train = [e.episode_id for e in episodes if e.split == "train"]
    assert first == len(train) and store.episode_ids() == train
    added = pipeline_mod.register_episodes(src, store, shard_size=3)
    assert first + added == len(episodes)
    rest = [e.episode_id for e in episodes if e.split != "train"]
    assert store.episode_ids() == train + rest
    # Every shard lies inside one data file (unit), and the plan only knows shard heads.
    unit_of = {e.episode_id: i // 4 for i, e in enumerate(episodes)}  # data files of 4, 4, 3 episodes
    for s in range(store.num_shards):
        ids, _ = store.shard_episodes(s)
        assert len({unit_of[e] for e in ids}) == 1, (s, ids)
    # Nothing missing: the catalog file is not rewritten.
    path = tmp / "reg.zarr" / "catalog.parquet"
    before = (path.read_bytes(), os.stat(path).st_mtime_ns)
    assert pipeline_mod.register_episodes(src, store, shard_size=3) == 0
    assert (path.read_bytes(), os.stat(path).st_mtime_ns) == before
