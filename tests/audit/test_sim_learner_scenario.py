"""The robosuite learner on a known-answer scenario: labelled data, shifted rollouts, oracle."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import cupid_engine.sim as sim
from cupid_engine.audit.sim_learner import SimLearner
from cupid_engine.sim.scenarios import LABEL_KEY, get_shift

pytestmark = pytest.mark.sim


def _config(tmp_path, **options):
    return SimpleNamespace(
        task="lift",
        dataset=str(tmp_path / "grasp"),
        policy={"type": "mlp", "steps": 3, "batch_size": 16},
        learner_options={"scenario": "lift-grasp", "demos": 3, "size": "tiny", **options},
    )


def _record_rollout_calls(monkeypatch) -> list[dict]:
    """The keyword arguments of every ``sim.run_rollouts`` call from here on (calls go through)."""
    seen = []
    real = sim.run_rollouts

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(sim, "run_rollouts", spy)
    return seen


def _check_oracle(learner, tmp_path, bad_label: str) -> None:
    """The oracle scores 0 exactly for the demos labelled ``bad_label``."""
    oracle = learner.score(tmp_path, "oracle", seed=0)
    labels = {e.episode_id: e.metadata[LABEL_KEY] for e in learner.episodes()}
    assert {i: (0.0 if lab == bad_label else 1.0) for i, lab in labels.items()} == oracle


def _train_and_roll_once(learner, info, tmp_path, monkeypatch, check_model=None) -> dict:
    """Train on every demo, evaluate one rollout; the single ``run_rollouts`` call's kwargs."""
    seen = _record_rollout_calls(monkeypatch)
    model = tmp_path / "model"
    learner.train(info["episode_id"], seed=0, workdir=model)
    if check_model is not None:
        check_model(model)
    rate = learner.evaluate(model, seed=0, rollouts=1)
    assert 0.0 <= rate <= 1.0
    (kw,) = seen
    return kw


def test_scenario_learner_labels_oracle_and_shifted_rollouts(tmp_path, monkeypatch):
    learner = SimLearner(_config(tmp_path))
    info = learner.episode_info()
    assert sorted(info["tier"]) == ["majority", "majority", "minority"]
    assert set(info["length"]) == {100}  # fixed horizon: length reveals nothing

    _check_oracle(learner, tmp_path, "majority")

    kw = _train_and_roll_once(learner, info, tmp_path, monkeypatch)
    assert kw["variation"] == get_shift("heavy") and kw["horizon"] == 100 and kw["success_mode"] == "final"


def test_scenario_must_match_the_task(tmp_path):
    cfg = _config(tmp_path)
    cfg.task = "can"
    with pytest.raises(ValueError, match="runs on task 'lift'"):
        SimLearner(cfg)


def test_context_scenario_rolls_out_in_its_context_env(tmp_path, monkeypatch):
    """lift-cue: policies see the cue keys, rollouts run in the scenario's white-mixed env."""
    from cupid_engine.policies import load_policy
    from cupid_engine.sim.scenarios import CONTEXT_OBS_KEYS, get_scenario

    learner = SimLearner(_config(tmp_path, scenario="lift-cue", demos=6))  # 3 : 1 : 2
    info = learner.episode_info()
    assert sorted(set(info["tier"])) == ["heavy-dark", "heavy-white", "light-white"]
    _check_oracle(learner, tmp_path, "light-white")

    def check_model(model) -> None:
        assert tuple(load_policy(model / "policy").config.obs_keys) == get_scenario("lift-cue").obs_keys
        assert set(CONTEXT_OBS_KEYS) <= set(get_scenario("lift-cue").obs_keys)

    kw = _train_and_roll_once(learner, info, tmp_path, monkeypatch, check_model)
    assert "variation" not in kw and callable(kw["env"]) and kw["horizon"] == 100
