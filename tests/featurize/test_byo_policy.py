"""Bring your own policy: a module the engine did not write (examples/byo_policy.py, a
LeRobot-style image diffusion policy) goes through featurize -> score -> query with a task
object beside it, from Python and from ``cupid-engine featurize --policy file.py:factory``.
Nothing of the engine is subclassed."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import numpy as np
import pytest
import torch

import cupid_engine as ce
from cupid_engine.data import write_dataset
from cupid_engine.featurize import FeaturizeConfig, Featurizer, ProjectionConfig, featurize
from cupid_engine.policies import Policy
from cupid_engine.store import GradientStore

from fz_helpers import explicit_sketch

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "byo_policy.py"


@pytest.fixture(scope="module")
def byo():
    spec = importlib.util.spec_from_file_location("byo_policy_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def _model(byo, seed=0):
    torch.manual_seed(seed)
    model = byo.LeRobotStyleDiffusionPolicy()
    with torch.no_grad():  # non-trivial normalisation and weights without a training run
        model.state_std.fill_(0.7)
        model.action_mean.fill_(0.05)
    return model.eval(), byo.LeRobotDiffusionTask(model)


def test_user_module_implements_nothing_of_the_engine(byo):
    model, task = _model(byo)
    assert not isinstance(model, Policy) and not isinstance(task, Policy)
    engine_bases = [c for c in type(model).__mro__ + type(task).__mro__ if c.__module__.startswith("cupid_engine")]
    assert engine_bases == []


def test_hook_sketch_equals_exact_gradients_of_the_user_policy(byo):
    """Conv2d + GroupNorm + spatial softmax encoder, FiLM Conv1d denoiser, draws folded
    into rows: the hook sketch equals the hashed exact per-sample gradients (float64)."""
    model, task = _model(byo)
    model = model.double()
    episodes = byo.make_episodes(n_good=2, n_bad=1, n_rollouts=0, length=5)
    batch = task.build_batch(episodes)
    assert batch["observation.images.agentview"].dtype == torch.uint8
    assert batch["observation.images.agentview"].shape == (15, 2, 12, 12, 3)
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    f = Featurizer(None, "square", ProjectionConfig(k=128, seed=3), task=task, model=model, draws=3, seed=7)
    want = explicit_sketch(model, task, batch, "square", k=128, seed=3, draws=3, noise_seed=7)
    torch.testing.assert_close(f(batch), want, rtol=1e-9, atol=1e-11)
    d = f.describe()
    assert d["task_class"] == "LeRobotDiffusionTask" and d["draws"] == 3 and "untracked_parameters" not in d
    assert d["num_tracked_parameters"] == sum(p.numel() for p in model.parameters())
    kinds = {type(m).__name__ for _, m in f.modules}
    assert kinds == {"Conv2d", "GroupNorm", "Linear", "Conv1d"}
    assert set(f.layer_strategies) == {n for n, _ in f.modules}


@pytest.fixture
def dataset(byo, tmp_path):
    episodes = byo.make_episodes(n_good=5, n_bad=2, n_rollouts=2, length=7)
    return episodes, write_dataset(tmp_path / "data", episodes, episodes_per_file=4)


def test_featurize_score_query_without_subclassing(byo, dataset, tmp_path, monkeypatch):
    episodes, data = dataset
    model, task = _model(byo)
    cfg = FeaturizeConfig.for_method(k=64, output="square", draws=4, dtype="float32", batch_size=10, shard_size=3)
    store_path = tmp_path / "store.zarr"
    run = featurize(str(data), store_path, "base", task=task, model=model, config=cfg, progress=False)
    assert run.is_complete()
    assert run.config.featurizer["task_class"] == "LeRobotDiffusionTask"

    # The stored rows are the featuriser applied to each episode alone (batches of 10
    # rows crossed episode boundaries in the store: same numbers up to float rounding).
    f = Featurizer.from_config(None, cfg, task=task, model=model)
    for ep in episodes:
        np.testing.assert_allclose(run.step_features(ep.episode_id), f.featurize_episodes([ep]).numpy(),
                                   rtol=2e-5, atol=1e-6)

    scores = ce.score("cupid", store=str(store_path), run="base")
    train_ids = [e.episode_id for e in episodes if e.split == "train"]
    assert sorted(scores["episode_id"].to_pylist()) == sorted(train_ids)
    assert np.isfinite(scores["score"].to_numpy()).all() and np.ptp(scores["score"].to_numpy()) > 0
    rollout = next(e.episode_id for e in episodes if e.split == "rollout")
    top = ce.top_influencers(store=str(store_path), run="base", rollout=rollout, k=3)
    top_ids = top.table["episode_id"].to_pylist()
    assert len(top_ids) == 3 and set(top_ids) <= set(train_ids)

    # Resume: the same task and model find nothing to do.
    calls = []
    from cupid_engine.featurize import shards

    real = shards.featurize_shard
    monkeypatch.setattr(shards, "featurize_shard", lambda *a, **k: calls.append(a) or real(*a, **k))
    featurize(str(data), store_path, "base", task=task, model=model, config=cfg, progress=False)
    assert calls == []


def test_cli_policy_factory(byo, dataset, tmp_path, monkeypatch, capsys):
    from cupid_engine.cli import main

    episodes, data = dataset
    model, task = _model(byo, seed=1)
    byo.save(model, tmp_path / "w.safetensors")
    monkeypatch.setenv("BYO_POLICY_WEIGHTS", str(tmp_path / "w.safetensors"))
    args = ["featurize", "--policy", f"{EXAMPLE}:make", "--data", str(data), "--store", str(tmp_path / "cli.zarr"),
            "--run", "base", "--output", "square", "--draws", "2", "--k", "32", "--dtype", "float32", "--no-progress"]
    assert main(args) == 0
    run = GradientStore.open(tmp_path / "cli.zarr").run("base")
    cfg = FeaturizeConfig.for_method(k=32, output="square", draws=2)
    f = Featurizer.from_config(None, cfg, task=task, model=model)
    assert f.matches(run.config.featurizer)  # same weights, same task: same description (policy hash included)
    ep = episodes[0]
    np.testing.assert_allclose(run.step_features(ep.episode_id), f.featurize_episodes([ep]).numpy(),
                               rtol=2e-5, atol=1e-6)
    capsys.readouterr()
    bad = ["featurize", "--policy", f"{EXAMPLE}:no_such_factory", "--data", str(data), "--store",
           str(tmp_path / "x.zarr"), "--run", "base"]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "no callable 'no_such_factory'" in err and "--policy" in err
    assert not (tmp_path / "x.zarr").exists()


def test_task_missing_a_method_is_named():
    class NoOutput:
        supported_outputs = ("loss",)

        def build_batch(self, episodes):
            return {}

    with pytest.raises(TypeError, match=r"missing method\(s\) \['output'\]"):
        Featurizer(None, "loss", ProjectionConfig(k=8), task=NoOutput(), model=torch.nn.Linear(2, 2))


def test_build_batch_with_wrong_row_count_is_refused(byo, dataset, tmp_path):
    episodes, data = dataset
    model, task = _model(byo)

    class Short(byo.LeRobotDiffusionTask):  # subclassing the *user's* task, not the engine's
        def build_batch(self, eps):
            return {k: v[:-1] for k, v in super().build_batch(eps).items()}

    cfg = FeaturizeConfig.for_method(k=16, output="square", draws=2)
    with pytest.raises(ValueError, match="build_batch returned .* rows for .* steps"):
        featurize(str(data), tmp_path / "s.zarr", "base", task=Short(model), model=model, config=cfg, progress=False)


@pytest.mark.slow
def test_example_runs_end_to_end(byo, tmp_path, capsys):
    byo.main(["--out", str(tmp_path), "--steps", "3", "--draws", "2"])
    out = capsys.readouterr().out
    assert "task LeRobotDiffusionTask" in out and "lowest CUPID scores" in out and "top influencers of rollout" in out
    assert (tmp_path / "policy.safetensors").is_file() and (tmp_path / "store.zarr").is_dir()
