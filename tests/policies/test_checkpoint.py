"""Checkpoints: identical outputs after a round trip, safetensors only, content hash."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from cupid_engine.policies.checkpoint import compute_policy_hash, load_policy, policy_hash, save_policy
from cupid_engine.policies.diffusion import DiffusionPolicyConfig
from cupid_engine.policies.mlp import MLPPolicyConfig
from cupid_engine.policies.outputs import get_output
from cupid_engine.policies.samples import build_samples
from cupid_engine.policies.training import TrainConfig, train_policy


@pytest.mark.parametrize(
    "config,outputs",
    [
        (MLPPolicyConfig.tiny(head="gaussian", std_mode="predicted"), ("loss", "logprob", "energy")),
        (DiffusionPolicyConfig.tiny(group_norm_affine=True), ("loss", "square")),
    ],
    ids=["mlp", "diffusion"],
)
def test_round_trip_identical_outputs_without_pickle(episodes, tmp_path, monkeypatch, config, outputs):
    policy = train_policy(config, episodes, TrainConfig(steps=3, batch_size=32), progress=False)
    path = save_policy(policy, tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((path / "config.json").read_text())
    assert meta["train_config"]["steps"] == 3 and meta["policy_config"] == policy.config.to_dict()

    def no_pickle(*args, **kwargs):
        raise AssertionError("checkpoint loading must not unpickle")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = load_policy(path)
    assert loaded.config == policy.config
    assert policy_hash(path) == compute_policy_hash(loaded) == compute_policy_hash(policy)
    s = build_samples(episodes[:2], n_obs_steps=config.n_obs_steps, horizon=config.horizon)
    raw = s.batch(range(0, 40, 3))
    for name in outputs:
        a = get_output(name)(policy, policy.normalizer.normalize_batch(raw), seed=2, draws=4)
        b = get_output(name)(loaded, loaded.normalizer.normalize_batch(raw), seed=2, draws=4)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    obs = s.obs[:3].numpy()
    torch.testing.assert_close(
        torch.from_numpy(policy.predict_action(obs, generator=torch.Generator().manual_seed(4))),
        torch.from_numpy(loaded.predict_action(obs, generator=torch.Generator().manual_seed(4))),
        rtol=0, atol=0,
    )


def test_checkpoint_errors_and_tamper_detection(episodes, tmp_path):
    policy = train_policy(MLPPolicyConfig.tiny(), episodes, TrainConfig(steps=2), progress=False)
    path = save_policy(policy, tmp_path / "p")
    with pytest.raises(FileExistsError):
        save_policy(policy, path)
    save_policy(policy, path, overwrite=True)
    meta = json.loads((path / "config.json").read_text())
    meta["policy_config"]["hidden_sizes"] = [32, 33]
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="content hash mismatch"):
        load_policy(path)
    with pytest.raises(FileNotFoundError, match="not a policy checkpoint"):
        load_policy(tmp_path / "missing")
