"""``cupid-engine train`` end to end on a tiny LeRobot dataset."""

from __future__ import annotations

import json

import pytest

from cupid_engine.cli import main
from cupid_engine.policies.checkpoint import load_policy, policy_hash


@pytest.mark.parametrize("kind", ["mlp", "diffusion"])
def test_cli_train_writes_loadable_checkpoint(tmp_path, capsys, episode_factory, kind):
    lerobot = pytest.importorskip("cupid_engine.data.lerobot")
    data = lerobot.write_dataset(tmp_path / "data", episode_factory(n=4, length=20))
    out = tmp_path / "policy"
    rc = main([
        "train", "--data", str(data), "--policy", kind, "--out", str(out), "--size", "tiny",
        "--steps", "3", "--batch-size", "16", "--seed", "1", "--obs-keys", "pos,quat", "--no-progress",
    ])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and summary["episodes"] == 4 and summary["samples"] == 80
    policy = load_policy(out)
    assert policy.config.obs_keys == ("pos", "quat")
    assert summary["content_hash"] == policy_hash(out)
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--policy", kind, "--out", str(tmp_path / "x"),
                 "--obs-keys", "velocity"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "['velocity'] not found" in err[0] and "pos" in err[0]
