"""generate_episodes and the ``cupid-engine generate`` command."""

from __future__ import annotations

import numpy as np
import pytest

from cupid_engine.sim.demonstrators import TIERS
from cupid_engine.sim.generate import generate_episodes
from cupid_engine.sim.tasks import Variation, obs_keys

pytestmark = pytest.mark.sim


def test_generate_ids_tiers_metadata(sim_env):
    eps = list(generate_episodes("lift", demos_per_tier={"better": 2, "worse": 1}, tiers=("better", "worse"), env=sim_env("lift")))
    assert [e.episode_id for e in eps] == ["lift_better_0000", "lift_better_0001", "lift_worse_0000"]
    for e in eps:
        assert e.split == "train" and e.task == "lift" and e.source == "sim:lift"
        assert e.success is True and e.return_ == 1.0
        assert sorted(e.observations) == sorted(obs_keys("lift"))
        assert e.actions.shape == (e.length, 7)
        assert np.all(np.abs(e.actions) <= 1.0)
        md = e.metadata
        assert md["strategy"] == TIERS[e.tier].to_dict()
        assert set(md["env_knobs"]) == {"mass_scale", "friction_scale", "size_scale", "placement_scale"}
        assert {"retries", "pauses", "scripted_miss"} <= set(md["demonstrator"])
    # deterministic: the same arguments give the same dataset
    again = list(generate_episodes("lift", demos_per_tier=1, tiers=("worse",), env=sim_env("lift")))
    np.testing.assert_array_equal(again[0].actions, eps[2].actions)


def test_keep_failures_and_variation_recorded():
    # A 0.25 s horizon cannot lift the cube: every attempt fails.
    var = Variation(mass_scale=(0.5, 1.5))
    eps = list(generate_episodes("lift", demos_per_tier=2, tiers=("better",), keep_failures=True, horizon=5, variation=var))
    assert [e.success for e in eps] == [False, False] and all(e.return_ == 0.0 for e in eps)
    masses = [e.metadata["env_knobs"]["mass_scale"] for e in eps]
    assert all(0.5 <= m <= 1.5 for m in masses) and masses[0] != masses[1]
    with pytest.raises(RuntimeError, match="could not collect"):
        list(generate_episodes("lift", demos_per_tier=1, tiers=("better",), horizon=5, max_attempts_factor=0.0))
    with pytest.raises(ValueError, match="unknown tier"):
        list(generate_episodes("lift", demos_per_tier=1, tiers=("best",)))


def test_generate_cli_writes_dataset(tmp_path):
    lerobot = pytest.importorskip("cupid_engine.data.lerobot")
    from .helpers import run_cli

    out = tmp_path / "lift_mh"
    argv = ["generate", "--task", "lift", "--demos", "2", "--tiers", "better,okay", "--out", str(out), "--seed", "3"]
    assert run_cli("generate", argv + ["--vary", "mass_scale=0.8:1.2"]) == 0
    eps = list(lerobot.open_dataset(out).episodes())
    assert sorted(e.episode_id for e in eps) == ["lift_better_0000", "lift_okay_0000"]
    assert {e.tier for e in eps} == {"better", "okay"} and all(e.success for e in eps)
    assert all(e.split == "train" for e in eps)
    assert all(0.8 <= e.metadata["env_knobs"]["mass_scale"] <= 1.2 for e in eps)
    with pytest.raises(SystemExit):
        run_cli("generate", argv + ["--vary", "weight=2"])
