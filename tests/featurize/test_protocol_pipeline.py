"""The protocol-driven pipeline keeps the engine's stores: exact batches, old run descriptions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cupid_engine.data import write_dataset
from cupid_engine.featurize import FeaturizeConfig, Featurizer, featurize
from cupid_engine.featurize.shards import compute_shard_features
from cupid_engine.policies import (
    DiffusionPolicy,
    DiffusionPolicyConfig,
    MLPPolicyConfig,
    TrainConfig,
    build_samples,
    save_policy,
    train_policy,
)
from cupid_engine.store import GradientStore, RunConfig

from fz_helpers import make_episodes


@pytest.mark.parametrize("kind", ["mlp", "diffusion"])
def test_shard_features_are_the_whole_shard_sliced_bit_for_bit(kind):
    """Batches built per episode group (the task's build_batch, rows carried over) hold the
    same rows as slicing the samples of the whole shard: features equal to the bit."""
    episodes = make_episodes(n=5, length=7)
    if kind == "mlp":
        cfg = MLPPolicyConfig.tiny(obs_dim=5, action_dim=3, head="gaussian")
        output = "logprob"
    else:
        cfg = DiffusionPolicyConfig.tiny(obs_dim=5, action_dim=3)
        output = "square"
    policy = train_policy(cfg, episodes, TrainConfig(steps=2, batch_size=8), progress=False)
    f = Featurizer.from_config(policy, FeaturizeConfig.for_method(k=32, output=output, draws=3))
    got = compute_shard_features(episodes, f, batch_size=6)  # 6 does not divide any episode length
    c = policy.config
    samples = build_samples(episodes, n_obs_steps=c.n_obs_steps, horizon=c.horizon, obs_keys=c.obs_keys)
    want = torch.cat([f(policy.make_batch(samples, slice(a, a + 6))) for a in range(0, len(samples), 6)])
    assert got.shape == (sum(e.length for e in episodes), 32)
    np.testing.assert_array_equal(got, want.numpy())


def test_run_recorded_before_untracked_parameters_still_resumes(tmp_path):
    episodes = make_episodes(n=4, length=5)
    data = write_dataset(tmp_path / "data", episodes, episodes_per_file=2)
    policy = train_policy(MLPPolicyConfig.tiny(), episodes, TrainConfig(steps=2, batch_size=8), progress=False)
    ckpt = save_policy(policy, tmp_path / "p")
    cfg = FeaturizeConfig.for_method(k=16, output="loss", track="head", dtype="float32", shard_size=2)
    run = featurize(str(data), tmp_path / "s.zarr", "new", policy=str(ckpt), config=cfg, progress=False)
    desc = run.config.featurizer
    assert desc["untracked_parameters"]["tensors"].keys() == {"trunk.0.weight", "trunk.0.bias", "trunk.2.weight",
                                                              "trunk.2.bias"}
    # A run as an older version recorded it (no untracked_parameters key): it resumes.
    old = {k: v for k, v in desc.items() if k != "untracked_parameters"}
    store = GradientStore.open(tmp_path / "s.zarr", mode="a")
    store.create_run("old", RunConfig(k=16, dtype="float32", featurizer=old))
    run = featurize(str(data), tmp_path / "s.zarr", "old", policy=str(ckpt), config=cfg, progress=False)
    assert run.is_complete() and run.config.featurizer == old
    np.testing.assert_array_equal(run.step_features("ep001"), store.run("new").step_features("ep001"))
    # Anything else that differs is still refused.
    other = FeaturizeConfig.for_method(k=16, output="energy", track="head", dtype="float32", shard_size=2)
    with pytest.raises(ValueError, match="different config"):
        featurize(str(data), tmp_path / "s.zarr", "old", policy=str(ckpt), config=other, progress=False)


def test_task_with_workers_is_refused_clearly(tmp_path):
    from cupid_engine.distributed import RayExecutor

    episodes = make_episodes(n=2, length=4)
    policy = DiffusionPolicy(DiffusionPolicyConfig.tiny(obs_dim=5, action_dim=3))
    with pytest.raises(ValueError, match="featurised in this process: use workers=1"):
        featurize(episodes_source(tmp_path, episodes), tmp_path / "s.zarr", "r", task=policy,
                  config=FeaturizeConfig.for_method(k=8, output="square", draws=2), executor=RayExecutor(2), progress=False)


def episodes_source(tmp_path, episodes):
    return str(write_dataset(tmp_path / "d", episodes))


def test_max_rows_caps_sample_draw_rows_per_call_and_keeps_the_features(tmp_path, monkeypatch):
    """A diffusion output at ``draws`` d featurises at most ``max_rows // d`` samples per
    forward/backward (bounded activation memory); an MLP's batches are left alone."""
    from cupid_engine.featurize.shards import samples_per_batch

    episodes = make_episodes(n=4, length=6)
    data = write_dataset(tmp_path / "data", episodes, episodes_per_file=2)
    dcfg = DiffusionPolicyConfig.tiny(obs_dim=5, action_dim=3)
    policy = train_policy(dcfg, episodes, TrainConfig(steps=2, batch_size=8), progress=False)
    ckpt = save_policy(policy, tmp_path / "p")
    base = FeaturizeConfig.for_method(k=32, output="square", draws=4, dtype="float32", batch_size=10)
    f = Featurizer.from_config(policy, base)
    assert samples_per_batch(base, f) == 10  # 40 rows <= 16384: unchanged
    capped = base.replace(max_rows=9)
    assert samples_per_batch(capped, f) == 2 and samples_per_batch(base.replace(max_rows=3), f) == 1
    mlp = train_policy(MLPPolicyConfig.tiny(obs_dim=5, action_dim=3), episodes, TrainConfig(steps=2, batch_size=8),
                       progress=False)
    mlp_cfg = FeaturizeConfig.for_method(k=32, output="energy", draws=4, batch_size=10, max_rows=9)
    assert samples_per_batch(mlp_cfg, Featurizer.from_config(mlp, mlp_cfg)) == 10  # no draws: not capped

    seen = []
    call = Featurizer.__call__

    def spy(self, batch, **kw):
        seen.append(int(next(iter(batch.values())).shape[0]))
        return call(self, batch, **kw)

    monkeypatch.setattr(Featurizer, "__call__", spy)
    runs = {}
    for name, cfg in (("whole", base), ("capped", capped)):
        seen.clear()
        run = featurize(str(data), tmp_path / "s.zarr", name, policy=str(ckpt), config=cfg, progress=False)
        runs[name] = (max(seen), np.concatenate([run.step_features(e.episode_id) for e in episodes]))
    assert runs["whole"][0] == 10 and runs["capped"][0] == 2
    # Rows are computed per sample: splitting a batch changes at most the float32 rounding of
    # the network's GEMMs (relative to each row's scale).
    whole, capped_f = runs["whole"][1], runs["capped"][1]
    scale = np.abs(whole).max(axis=1, keepdims=True)
    assert np.all(np.abs(capped_f - whole) <= 1e-5 * scale), np.max(np.abs(capped_f - whole) / scale)
    assert not np.allclose(capped_f, 0)
    with pytest.raises(ValueError, match="max_rows"):
        base.replace(max_rows=0)
