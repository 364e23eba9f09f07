"""``cupid-engine score``: every baseline from what the store and dataset hold, clear errors, tie warning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cupid_engine.cli import main
from cupid_engine.scorers import read_table


def _score(loop, tmp_path, *args):
    out = str(tmp_path / f"{args[0]}.parquet")
    return main(["score", *args, "--store", loop["store"], "--run", "base", "--out", out]), out


def test_qoq_defaults_point_to_failed_rollouts(loop, tmp_path, capsys):
    rc, _ = _score(loop, tmp_path, "qoq")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--set validation=failed-rollouts" in err[0]
    rc, out = _score(loop, tmp_path, "qoq", "--set", "validation=failed-rollouts")
    assert rc == 0 and read_table(out).num_rows == 12


def test_loss_from_checkpoint_and_data(loop, tmp_path, capsys):
    from cupid_engine.data.lerobot import open_dataset
    from cupid_engine.policies import load_policy
    from cupid_engine.policies.samples import build_samples

    rc, _ = _score(loop, tmp_path, "loss")  # no catalog column, no checkpoint: says how
    err = capsys.readouterr().err
    assert rc == 2 and "--checkpoint DIR --data PATH" in err
    rc, out = _score(loop, tmp_path, "loss", "--checkpoint", loop["policy"], "--data", loop["data"])
    assert rc == 0
    table = read_table(out)
    assert table.num_rows == 12
    # Independent check of one episode: −mean per-sample MSE of the policy on its samples.
    policy = load_policy(loop["policy"])
    ep = next(open_dataset(loop["data"]).episodes(ids=["demo_05"]))
    c = policy.config
    batch = policy.make_batch(build_samples([ep], n_obs_steps=c.n_obs_steps, horizon=c.horizon, obs_keys=c.obs_keys))
    with torch.no_grad():
        want = -float(policy.per_sample_loss(batch).double().mean())
    got = dict(zip(table["episode_id"].to_pylist(), table["score"].to_numpy()))["demo_05"]
    assert got == pytest.approx(want, rel=1e-6)
    rc, _ = _score(loop, tmp_path, "loss", "--checkpoint", loop["policy"])  # half the inputs
    assert rc == 2 and "needs both --checkpoint" in capsys.readouterr().err


def test_success_sim_from_data(loop, tmp_path, capsys):
    rc, _ = _score(loop, tmp_path, "success-sim")
    assert rc == 2 and "--data PATH" in capsys.readouterr().err
    rc, out = _score(loop, tmp_path, "success-sim", "--data", loop["data"])
    assert rc == 0
    table = read_table(out)
    assert table.num_rows == 12 and (table["score"].to_numpy() < 0).all()


def test_oracle_on_any_label(loop, tmp_path, capsys):
    rc, out = _score(loop, tmp_path, "oracle", "--label", "strategy", "--bad", "majority")
    assert rc == 0
    t = read_table(out).to_pylist()
    assert {r["episode_id"] for r in t if r["score"] == 1.0} == {f"demo_{i:02d}" for i in range(0, 12, 3)}
    rc, out = _score(loop, tmp_path, "oracle", "--label", "strategy", "--good", "minority")
    assert rc == 0 and [r["score"] for r in read_table(out).to_pylist()] == [r["score"] for r in t]
    capsys.readouterr()
    rc, _ = _score(loop, tmp_path, "oracle", "--label", "strategy")  # categorical without bad/good
    err = capsys.readouterr().err
    assert rc == 2 and "--bad VALUE" in err and "majority" in err
    rc, _ = _score(loop, tmp_path, "oracle", "--label", "strategy", "--bad", "majorty")  # a typo
    assert rc == 2 and "values present: ['majority', 'minority']" in capsys.readouterr().err
    rc, _ = _score(loop, tmp_path, "oracle")  # tiers by default: none here
    assert rc == 2 and "tier" in capsys.readouterr().err


def test_tie_warning(loop, tmp_path, capsys):
    rc, out = _score(loop, tmp_path, "length")  # every training demo has 12 steps
    assert rc == 0
    err = capsys.readouterr().err
    assert "warning: length: 12 of 12 episodes (100%) share the score -12" in err
    rc, _ = _score(loop, tmp_path, "cupid")
    assert rc == 0 and "share the score" not in capsys.readouterr().err
    assert np.unique(read_table(out)["score"].to_numpy()).size == 1


def test_no_method_scores_with_the_default_and_says_so(loop, tmp_path, capsys):
    from cupid_engine.constants import DEFAULT_SCORER

    out = str(tmp_path / "default.parquet")
    rc = main(["score", "--store", loop["store"], "--run", "base", "--out", out])
    assert rc == 0 and f"using the default {DEFAULT_SCORER}" in capsys.readouterr().err
    rc, named = _score(loop, tmp_path, DEFAULT_SCORER)
    a, b = read_table(out), read_table(named)
    assert a["episode_id"].to_pylist() == b["episode_id"].to_pylist()
    assert a["score"].to_pylist() == b["score"].to_pylist()
