"""Side-by-side LDS: several scores against one set of subset trainings, and ``--methods``."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dm_helpers import make_episodes

from cupid_engine.cli import main
from cupid_engine.data import write_dataset
from cupid_engine.data.episode import Episode
from cupid_engine.policies.mlp import MLPPolicyConfig
from cupid_engine.policies.samples import build_samples
from cupid_engine.policies.training import TrainConfig, train_policy
from cupid_engine.datamodels.clusters import make_clusters
from cupid_engine.datamodels.compare import checkpoint_steps, sampled_steps
from cupid_engine.datamodels.lds import format_lds_table, measure_subsets, random_reference, run_lds_many
from cupid_engine.datamodels.metrics import ProxyMetric
from cupid_engine.datamodels.regression import SubsetTrainer, fraction_masks
from cupid_engine.scorers.table import make_table, write_table


def planted_episodes(n_good: int, n_bad: int, n_target: int, *, length: int = 10, seed: int = 0):
    """Good demos and targets follow one state -> action map; bad demos a conflicting one.

    Training on more good demos lowers the target loss, so the metric of a subset grows
    with its number of good demos: an additive effect of +1 per good and -1 per bad demo.
    """
    rng = np.random.default_rng(seed)
    w_good = rng.normal(size=(3, 2))
    w_bad = -w_good

    def episode(name: str, w: np.ndarray, split: str = "train", tier: str = "okay") -> Episode:
        pos = rng.normal(size=(length, 3))
        act = np.tanh(pos @ w) + rng.normal(scale=0.05, size=(length, 2))
        return Episode(episode_id=name, observations={"pos": pos.astype(np.float32)}, actions=act.astype(np.float32),
                       split=split, success=True, tier=tier)

    train = [episode(f"good{i:02d}", w_good) for i in range(n_good)] + [episode(f"bad{i:02d}", w_bad)
                                                                       for i in range(n_bad)]
    order = rng.permutation(len(train))
    train = [train[i] for i in order]
    target = [episode(f"tg{i:02d}", w_good, "target", "better") for i in range(n_target)]
    return train, target


POLICY = MLPPolicyConfig(hidden_sizes=(16,))
TRAIN = TrainConfig(steps=40, batch_size=32, lr=1e-2, optimizer="adam")


def test_oracle_beats_random_on_planted_learner_and_trainings_are_shared(tmp_path):
    train, target = planted_episodes(6, 6, 3)
    oracle = {e.episode_id: (1.0 if e.episode_id.startswith("good") else -1.0) for e in train}
    rng = np.random.default_rng(1)
    scores = {"oracle": oracle, "anti": {k: -v for k, v in oracle.items()},
              "random": {e.episode_id: float(rng.random()) for e in train}}
    res = run_lds_many(scores, POLICY, train, target, TRAIN, num_subsets=16, fraction=0.5, cache_dir=tmp_path,
                       bootstrap=200)
    assert list(res) == ["oracle", "anti", "random"]
    assert res["oracle"].mean > 0.8 and res["oracle"].ci_low > 0.5
    assert res["anti"].mean == pytest.approx(-res["oracle"].mean)
    assert res["oracle"].mean > res["random"].mean + 0.5
    distinct = len(np.unique(fraction_masks(12, 16, fraction=0.5, seed=0), axis=0))
    # One set of trainings for all three scores: every result reports the same trainings.
    assert {r.info["trained"] for r in res.values()} == {distinct}
    for r in res.values():
        assert np.array_equal(r.measured, res["oracle"].measured) and r.measured.shape == (16, 3)
    # Random vectors are 0 on average; the planted oracle lies above all but the luckiest.
    subsets = measure_subsets(POLICY, train, target, TRAIN, num_subsets=16, fraction=0.5, cache_dir=tmp_path)
    assert subsets.info["trained"] == 0
    ref = random_reference(subsets, 100)
    assert ref["num_seeds"] == 100 and abs(ref["mean"]) < 0.15 and res["oracle"].mean > ref["q975"]
    table = format_lds_table(res)
    assert all(name in table for name in scores) and "n_subsets" in table
    again = run_lds_many({"oracle": oracle}, POLICY, train, target, TRAIN, num_subsets=16, cache_dir=tmp_path,
                         bootstrap=0)["oracle"]
    assert again.info["trained"] == 0 and again.info["cached"] == distinct
    assert again.mean == res["oracle"].mean


def test_subset_trainer_uses_the_full_normalizer_by_default():
    train, target = planted_episodes(3, 3, 1)
    samples = build_samples(train, n_obs_steps=1, horizon=1)
    clusters = make_clusters(samples)
    metric = ProxyMetric(target)
    shared = SubsetTrainer(POLICY, samples, clusters, TRAIN, metric)
    own = SubsetTrainer(POLICY, samples, clusters, TRAIN, metric, full_normalizer=False)
    assert shared.fingerprint() != own.fingerprint()  # never served from each other's cache
    mask = np.array([1, 0, 1, 0, 0, 1], bool)
    weights = mask.astype(np.float64)
    p_shared = train_policy(POLICY, samples, TRAIN, cluster_weights=weights, clusters=clusters.ids,
                            normalizer=shared.normalizer, progress=False)
    full = train_policy(POLICY, samples, TRAIN, progress=False)
    for name, buf in full.normalizer.named_buffers():
        assert np.allclose(getattr(p_shared.normalizer, name).numpy(), buf.numpy())
    assert shared(mask) == pytest.approx(float(metric.with_action_scale(shared.normalizer.action_scale.double())(
        p_shared)))
    assert shared(mask) != own(mask)


def test_checkpoints_are_prefixes_of_the_base_training():
    # The compare module takes the checkpoint at step t as the run trained for t steps;
    # equal per-step losses show the two runs follow the same trajectory.
    train, _ = planted_episodes(3, 3, 1)
    short = train_policy(POLICY, train, dataclasses.replace(TRAIN, steps=7), progress=False)
    long = train_policy(POLICY, train, dataclasses.replace(TRAIN, steps=20), progress=False)
    assert short.train_info["step_losses"] == long.train_info["step_losses"][:7]
    assert checkpoint_steps(10, 3) == [3, 7, 10] and checkpoint_steps(2, 5) == [1, 2]
    a = sampled_steps("ep", 40, 16)
    assert len(set(a.tolist())) == 16 and np.array_equal(a, sampled_steps("ep", 40, 16))
    assert sampled_steps("ep", 5, 16).tolist() == [0, 1, 2, 3, 4]


@pytest.fixture
def dataset(tmp_path):
    train, target = planted_episodes(5, 5, 0, length=12)
    extra = make_episodes(n=2, length=12, seed=3, prefix="better")  # a tier to hold targets out of
    extra = [dataclasses.replace(e, success=True, tier="better", observations={"pos": e.observations["pos"]})
             for e in extra]
    write_dataset(tmp_path / "ds", train + extra)
    return tmp_path


def test_eval_lds_methods_side_by_side(dataset, tmp_path, capsys):
    ids = [f"good{i:02d}" for i in range(5)] + [f"bad{i:02d}" for i in range(5)] + ["better000", "better001"]
    oracle = tmp_path / "oracle.parquet"
    write_table(make_table(ids, np.array([1.0 if i.startswith("good") else 0.0 for i in ids]), method="oracle"), oracle)
    methods = "cupid,trak-traj,tracin,datamodel,random"
    argv = ["eval", "lds", "--data", str(dataset / "ds"), "--holdout-targets", "2", "--target-tier", "better",
            "--methods", methods, "--scores", f"planted={oracle}", "--subsets", "5", "--fraction", "0.5",
            "--steps", "10", "--batch-size", "16", "--checkpoints", "3", "--k", "64", "--datamodel-subsets", "4",
            "--workdir", str(tmp_path / "work"), "--bootstrap", "20", "--random-seeds", "10", "--no-progress",
            "--out", str(tmp_path / "lds.json")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    out = json.loads((tmp_path / "lds.json").read_text())
    names = [r["method"] for r in out["results"]]
    assert names == ["planted", *methods.split(",")]
    for name in names:
        assert name in printed
    assert sorted(out["targets"]) == ["better000", "better001"] and out["num_train"] == 10
    assert out["random_reference"]["num_seeds"] == 10 and "random score vectors, 10 seeds" in printed
    masks = fraction_masks(10, 5, fraction=0.5, seed=0)
    distinct = len(np.unique(masks, axis=0))
    # Six scores, one set of subset trainings.
    assert out["trained"] == distinct and out["cached"] == 0
    for r in out["results"]:
        assert r["num_subsets"] == 5 and r["num_targets"] == 2 and len(r["per_target"]) == 2
        # The summary is the mean of the per-target Spearman correlations it reports.
        finite = [v for v in r["per_target"] if v is not None and np.isfinite(v)]
        if finite:
            assert r["lds"] == pytest.approx(float(np.mean(finite)), abs=1e-9)
            assert all(-1 - 1e-9 <= v <= 1 + 1e-9 for v in finite)
        else:
            assert r["lds"] is None
    folder = out["compare"]["folder"]
    assert out["compare"]["checkpoint_steps"] == [3, 7, 10]
    assert sorted(os.listdir(os.path.join(folder, "checkpoints"))) == ["step_0000003", "step_0000007",
                                                                       "step_0000010"]
    for m in methods.split(","):
        assert os.path.exists(os.path.join(folder, "scores", f"{m}.parquet"))
    from cupid_engine.scorers.table import read_table

    for m in ("cupid", "tracin", "trak-traj", "datamodel"):
        s = read_table(os.path.join(folder, "scores", f"{m}.parquet"))["score"].to_numpy()
        assert len(s) == 10 and np.isfinite(s).all() and np.ptp(s) > 0
    # The rerun trains nothing: subsets, datamodel subsets and checkpoints all come from disk.
    subsets_dir = os.path.join(tmp_path / "work", "subsets")
    entries = sum(len(f) for _, _, f in os.walk(subsets_dir))
    assert entries >= distinct + 1  # the LDS subsets and the datamodel estimator's own trainings
    assert main(argv) == 0
    again = json.loads((tmp_path / "lds.json").read_text())
    assert again["trained"] == 0 and again["cached"] == distinct
    assert [r["lds"] for r in again["results"]] == [r["lds"] for r in out["results"]]
    assert sum(len(f) for _, _, f in os.walk(subsets_dir)) == entries


def test_eval_lds_rejects_bad_requests(dataset, tmp_path):
    base = ["eval", "lds", "--data", str(dataset / "ds"), "--holdout-targets", "2", "--no-progress"]
    with pytest.raises(SystemExit, match="unknown method"):
        main(base + ["--methods", "cupid,bogus"])
    with pytest.raises(SystemExit, match="--scores and/or --methods"):
        main(base)
    with pytest.raises(SystemExit, match="hold out"):
        main(["eval", "lds", "--data", str(dataset / "ds"), "--holdout-targets", "3", "--target-tier", "better",
              "--methods", "random", "--no-progress"])


@pytest.mark.slow
@pytest.mark.sim
def test_readme_lds_command_on_the_sim_benchmark(tmp_path):
    """The README's command at toy size: generate a Lift dataset, then the side-by-side LDS."""
    pytest.importorskip("robosuite")
    exe = shutil.which("cupid-engine") or os.path.join(os.path.dirname(sys.executable), "cupid-engine")
    env = {**os.environ, "MUJOCO_GL": "disable"}
    data = tmp_path / "lift"
    subprocess.run([exe, "generate", "--task", "lift", "--demos", "9", "--out", str(data)], check=True, env=env)
    out = tmp_path / "lds.json"
    run = subprocess.run([exe, "eval", "lds", "--data", str(data), "--holdout-targets", "2", "--target-tier", "better",
                          "--methods", "cupid,trak-traj,tracin,datamodel,random", "--subsets", "4", "--fraction",
                          "0.5", "--steps", "30", "--datamodel-subsets", "4", "--k", "128",
                          "--workdir", str(tmp_path / "work"), "--no-progress", "--out", str(out)],
                         check=True, env=env, capture_output=True, text=True)
    result = json.loads(out.read_text())
    assert [r["method"] for r in result["results"]] == ["cupid", "trak-traj", "tracin", "datamodel", "random"]
    assert result["num_train"] == 7 and len(result["targets"]) == 2
    assert "trak-traj" in run.stdout and "n_targets" in run.stdout
