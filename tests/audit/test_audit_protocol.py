"""AuditConfig, pruning helpers and the resumable cached runner."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cupid_engine.audit.protocol import (
    AuditConfig,
    AuditRunner,
    Learner,
    n_pruned,
    prune_lowest,
    prune_random,
)
from cupid_engine.audit.results import FULL, RANDOM
from cupid_engine.audit.synthetic import SyntheticLearner

EXAMPLE = Path(__file__).resolve().parents[2] / "cupid_engine" / "audit" / "examples" / "lift_audit.toml"


def test_example_config_loads():
    cfg = AuditConfig.from_toml(EXAMPLE)
    assert cfg.task == "lift"
    assert cfg.methods == ("cupid", "qoq") and cfg.baselines == ("length", "loss")
    assert len(cfg.seeds) == 3 and len(cfg.heldout_seeds) == 2 and cfg.rollouts == 30
    assert cfg.policy["type"] == "mlp"
    assert AuditConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("scenario, known_bad", [("lift-carry", 40), ("lift-grasp", 40), ("lift-cue", 30)])
def test_scenario_examples_audit_the_default_on_the_known_bad_share(scenario, known_bad):
    """The scenario audit examples prune exactly the scenario's known-bad count, by the default scorer."""
    from cupid_engine.constants import DEFAULT_SCORER
    from cupid_engine.sim.scenarios import get_scenario

    cfg = AuditConfig.from_toml(EXAMPLE.parent / f"{scenario.replace('-', '_')}_audit.toml")
    opts = cfg.learner_options
    assert opts["scenario"] == scenario and Path(cfg.dataset).name == scenario.replace("-", "_")
    sc = get_scenario(opts["scenario"])
    assert sc.task == cfg.task and cfg.methods == (DEFAULT_SCORER,)
    # Every episode runs to the scenario's horizon (success is not judged by stopping at the
    # first success; tests/sim/test_scenarios.py checks the generated lengths), so `length`
    # would tie all demos: `loss` is the cheap rule.
    assert sc.horizon > 0 and sc.success_mode in ("any", "final") and cfg.baselines == ("loss",)
    n = int(opts["demos"])
    (ratio,) = cfg.prune_ratios
    assert n_pruned(ratio, n) == sc.counts(n)[sc.known_bad] == known_bad
    assert len(cfg.seeds) == 5  # the fewest seeds at which gate 1's permutation test can pass at 0.05
    assert 2.0 ** -len(cfg.seeds) < cfg.alpha <= 2.0 ** -(len(cfg.seeds) - 1)
    assert cfg.policy["type"] == "diffusion" and cfg.rollouts == 50 and opts["score_rollouts"] == 50
    assert AuditConfig.from_dict(cfg.to_dict()) == cfg


def test_toml_keep_ratios_and_validation(tmp_path):
    path = tmp_path / "a.toml"
    path.write_text('task = "can"\ndataset = "d"\nmethods = ["cupid"]\nseeds = [1, 2]\n'
                    'keep_ratios = [0.9, 0.8]\ncache_dir = "c"\n[policy]\ntype = "mlp"\nsteps = 10\n')
    cfg = AuditConfig.from_toml(path)
    assert cfg.prune_ratios == pytest.approx((0.1, 0.2))
    assert Path(cfg.cache_dir).is_absolute()
    with pytest.raises(ValueError, match="random"):
        cfg.replace(methods=("random",))
    with pytest.raises(ValueError, match="distinct"):
        cfg.replace(heldout_seeds=(1,))
    with pytest.raises(ValueError, match="prune ratios"):
        cfg.replace(prune_ratios=(1.0,))
    with pytest.raises(ValueError, match="type"):
        cfg.replace(policy={"steps": 1})


def test_pruning_helpers():
    ids = [f"e{i}" for i in range(10)]
    scores = {e: float(i) for i, e in enumerate(ids)}
    assert prune_lowest(scores, ids, 3, seed=0) == ["e0", "e1", "e2"]
    # All tied: the tie-break is a seeded permutation, not id order.
    flat = {e: 0.0 for e in ids}
    picks = {tuple(prune_lowest(flat, ids, 3, seed=s)) for s in range(6)}
    assert len(picks) > 1
    assert prune_lowest(flat, ids, 3, seed=4) == prune_lowest(flat, ids, 3, seed=4)
    assert prune_random(ids, 4, 1, 0.4) == prune_random(ids, 4, 1, 0.4)
    assert prune_random(ids, 4, 1, 0.4) != prune_random(ids, 4, 2, 0.4)
    assert n_pruned(0.1, 90) == 9 and n_pruned(0.01, 10) == 1 and n_pruned(0.99, 10) == 9
    with pytest.raises(ValueError, match="lacks"):
        prune_lowest({"e0": 1.0}, ids, 1, 0)


def test_synthetic_learner_implements_protocol():
    assert isinstance(SyntheticLearner(), Learner)
    with pytest.raises(TypeError):
        AuditRunner(AuditConfig(task="t", dataset="d", methods=("m",), seeds=(0,)), object())


def test_conditions_are_matched_and_complete(config_factory):
    cfg = config_factory(seeds=(0, 1), heldout_seeds=(9,), prune_ratios=(0.1, 0.3))
    learner = SyntheticLearner(cfg.learner_options)
    data = AuditRunner(cfg, learner).run_data()
    rules = [FULL, RANDOM, "cupid", "null", "length", "loss"]
    assert len(data.conditions) == 3 * (1 + 2 * (len(rules) - 1))
    for s in (0, 1, 9):
        full = data.get(s, FULL, 0.0)
        assert full.pruned == [] and full.ratio == 0.0
        for r in (0.1, 0.3):
            sizes = {len(data.get(s, m, r).pruned) for m in rules[1:]}
            assert sizes == {n_pruned(r, 60)}
            assert data.get(s, RANDOM, r).pruned == prune_random(data.episode_ids, n_pruned(r, 60), s, r)
    # The length rule prunes the longest episodes.
    lengths = dict(zip(data.episode_ids, data.lengths))
    pruned = data.get(0, "length", 0.1).pruned
    kept_max = max(l for e, l in lengths.items() if e not in pruned)
    assert min(lengths[e] for e in pruned) >= kept_max


def test_killed_audit_resumes_without_retraining(config_factory, tmp_path):
    cfg = config_factory(seeds=(0, 1, 2), heldout_seeds=(7,), prune_ratios=(0.1, 0.2))
    total = 4 * (1 + 2 * 5)  # seeds x (full + ratios x (random + 4 rules))
    killed = SyntheticLearner(cfg.learner_options, fail_after_train=17)
    with pytest.raises(RuntimeError, match="simulated kill"):
        AuditRunner(cfg, killed).run()
    assert len(killed.train_calls) == 17
    # No half-written checkpoint is left behind or counted as finished.
    assert not list((Path(cfg.cache_dir) / "train").glob(".*tmp*"))

    resumed = SyntheticLearner(cfg.learner_options)
    runner = AuditRunner(cfg, resumed)
    result = runner.run()
    assert len(resumed.train_calls) == total - 17
    assert not set(killed.train_calls) & set(resumed.train_calls)
    assert runner.counts["cached"] == 17

    # Identical to an audit that was never interrupted.
    fresh_cfg = cfg.replace(cache_dir=str(tmp_path / "fresh"))
    fresh = AuditRunner(fresh_cfg, SyntheticLearner(cfg.learner_options)).run()
    assert sorted(map(dataclasses.astuple, result.data.conditions), key=str) == sorted(
        map(dataclasses.astuple, fresh.data.conditions), key=str)
    assert [d.verdict for d in result.decisions] == [d.verdict for d in fresh.decisions]

    # A third run trains, scores and evaluates nothing.
    again = SyntheticLearner(cfg.learner_options)
    runner3 = AuditRunner(cfg, again)
    runner3.run()
    assert again.train_calls == [] and runner3.counts["score"] == 0 and runner3.counts["evaluate"] == 0


def test_cache_is_keyed_by_learner_fingerprint(config_factory):
    cfg = config_factory(seeds=(0,), heldout_seeds=(), methods=("cupid",), baselines=())
    AuditRunner(cfg, SyntheticLearner(cfg.learner_options)).run_data()
    other = SyntheticLearner({**cfg.learner_options, "base": 0.3})
    AuditRunner(cfg, other).run_data()
    assert len(other.train_calls) == 3  # full, random, cupid: nothing reused


def test_stale_cache_with_different_subset_raises(config_factory):
    cfg = config_factory(seeds=(0,), heldout_seeds=(), methods=("cupid",), baselines=())
    AuditRunner(cfg, SyntheticLearner(cfg.learner_options)).run_data()

    class Drifting(SyntheticLearner):
        def score(self, model_dir, method, seed):
            return {e: -v for e, v in super().score(model_dir, method, seed).items()}

    # Same fingerprint, different scores: the score cache hides it, so drop that too.
    for f in (Path(cfg.cache_dir) / "scores").glob("*.parquet"):
        f.unlink()
    with pytest.raises(RuntimeError, match="different episode subset"):
        AuditRunner(cfg, Drifting(cfg.learner_options)).run_data()


def test_workers_give_the_same_result(config_factory, tmp_path):
    cfg = config_factory(seeds=(0, 1, 2), heldout_seeds=(5,))
    one = AuditRunner(cfg, SyntheticLearner(cfg.learner_options)).run_data()
    par = AuditRunner(cfg.replace(workers=2, cache_dir=str(tmp_path / "par")),
                      SyntheticLearner(cfg.learner_options)).run_data()
    assert [dataclasses.astuple(c) for c in one.conditions] == [dataclasses.astuple(c) for c in par.conditions]


def test_seed_shares_fill_one_cache(config_factory, tmp_path):
    cfg = config_factory(seeds=(0, 1, 2), heldout_seeds=(7,), prune_ratios=(0.2,))
    first = SyntheticLearner(cfg.learner_options)
    part = AuditRunner(cfg, first).run_data(only_seeds=[2, 7])
    assert sorted({c.seed for c in part.conditions}) == [2, 7]
    AuditRunner(cfg, SyntheticLearner(cfg.learner_options)).run_data(only_seeds=[0, 1])
    last = SyntheticLearner(cfg.learner_options)
    runner = AuditRunner(cfg, last)
    data = runner.run_data()
    assert last.train_calls == [] and runner.counts["cached"] == len(data.conditions) == 4 * (1 + 5)
    fresh = AuditRunner(cfg.replace(cache_dir=str(tmp_path / "fresh")), SyntheticLearner(cfg.learner_options))
    assert [dataclasses.astuple(c) for c in data.conditions] == [
        dataclasses.astuple(c) for c in fresh.run_data().conditions]
    with pytest.raises(ValueError, match=r"seeds \[3\] are not in the config"):
        runner.run_data(only_seeds=[0, 3])
