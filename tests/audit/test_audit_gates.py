"""The gates on synthetic audits with a known answer, and the decision table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cupid_engine.audit import gates as G
from cupid_engine.audit.protocol import AuditRunner
from cupid_engine.audit.stats import paired_summary
from cupid_engine.audit.synthetic import SyntheticLearner

from .conftest import SIGNAL, make_config


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    cfg = make_config(tmp_path_factory.mktemp("planted"))
    return AuditRunner(cfg, SyntheticLearner(cfg.learner_options)).run()


def _decision(result, method):
    (d,) = [d for d in result.decisions if d.method == method]
    return d


def test_planted_helpful_score_passes_gates_1_to_3(planted):
    d = _decision(planted, "cupid")
    assert [g.passed for g in d.gates[:3]] == [True, True, True], [g.reason for g in d.gates]
    assert d.verdict == G.DEPLOY
    st = d.gates[0].details["stats"]
    assert st["mean"] > 0 and st["p_t"] < 0.05 and st["p_perm"] < 0.05 and st["ci_low"] > 0
    assert d.gates[1].details["baselines"]["length"]["status"] in ("beats", "ties")


def test_null_score_fails_gate_1(planted):
    d = _decision(planted, "null")
    assert not d.gates[0].passed
    assert d.verdict == G.DO_NOT_CLAIM
    assert "gate 1 fails" in d.reason


def test_mechanism_describes_pruned_sets(planted):
    mech = planted.mechanism[repr(0.2)]
    n_seeds = 14
    k = 12  # round(0.2 * 60)
    for rule in ("random", "cupid", "null", "length", "loss"):
        assert mech["rules"][rule]["n_pruned"] == n_seeds * k
    # The planted helpful score removes (almost) only worse-tier episodes; random does not.
    assert mech["rules"]["cupid"]["tiers"].get("worse", 0) >= 0.9 * n_seeds * k
    assert mech["rules"]["random"]["tiers"].get("worse", 0) < 0.6 * n_seeds * k
    assert 0.0 <= mech["overlap"]["cupid"]["length"] <= 1.0
    assert not _decision(planted, "cupid").gates[3].details["flag_length"]


def test_length_stronger_than_method_fails_gate_2(config_factory):
    # Length perfectly separates the worse tier; the method's score is only weakly informative.
    opts = {"signal": {**SIGNAL, "weak": 0.8}, "tier_lengths": [100.0, 140.0, 300.0], "length_sd": 5.0}
    cfg = config_factory(methods=("weak",), learner_options=opts, heldout_seeds=())
    res = AuditRunner(cfg, SyntheticLearner(opts)).run()
    d = _decision(res, "weak")
    assert d.gates[0].passed, d.gates[0].reason
    assert not d.gates[1].passed and d.gates[1].details["baselines"]["length"]["status"] == "loses"
    assert not d.gates[2].passed and "not evaluated" in d.gates[2].reason
    assert d.verdict == G.CANDIDATE
    assert "loses to a trivial rule (length" in d.gates[1].reason


def test_gate_random_rule_and_small_block_note():
    p = G.GateParams(permutations=1000, bootstrap=1000)
    st = paired_summary([0.05, 0.06, 0.07], permutations=1000, bootstrap=1000)
    g = G.gate_random(st, p)
    # t-test and CI pass, but 3 seeds cannot give a permutation p below 1/8.
    assert st.p_t < 0.05 and st.ci_low > 0 and st.p_perm == pytest.approx(0.125)
    assert not g.passed and "p_perm<alpha" in g.reason and "too small to pass" in g.reason
    st5 = paired_summary([0.05, 0.06, 0.07, 0.04, 0.08], permutations=1000, bootstrap=1000)
    assert G.gate_random(st5, p).passed


def test_gate_heldout_rule():
    p = G.GateParams()
    assert not G.gate_heldout(None, p).passed
    up = paired_summary([0.1, 0.12, 0.09])
    assert G.gate_heldout(up, p).passed
    mixed = paired_summary([0.1, -0.05, 0.02, -0.04])
    g = G.gate_heldout(mixed, p)
    assert not g.passed and "wins>losses" in g.reason


def _g(gate, passed):
    return G.GateResult(gate, f"g{gate}", passed, "r", {})


@pytest.mark.parametrize(
    "flags, verdict",
    [
        ((True, True, True, True), G.DEPLOY),
        ((True, True, True, False), G.DEPLOY),
        ((True, False, True, True), G.CANDIDATE),
        ((True, True, False, True), G.CANDIDATE),
        ((False, True, True, True), G.DO_NOT_CLAIM),
        ((False, False, False, False), G.DO_NOT_CLAIM),
    ],
    ids=["all", "flagged", "g2", "g3", "g1", "none"],
)
def test_decision_table(flags, verdict):
    d = G.decide("m", 0.1, tuple(_g(i + 1, f) for i, f in enumerate(flags)))
    assert d.verdict == verdict
    assert ("mechanism flag" in d.reason) == (not flags[3])


def test_mechanism_flag_thresholds():
    p = G.GateParams()
    base = {"rules": {"m": {"n_pruned": 1, "mean_length_pruned": 1.0, "mean_length_all": 1.0, "tiers": {}},
                      "random": {"n_pruned": 1, "mean_length_pruned": 1.0, "mean_length_all": 1.0, "tiers": {}}}}
    by_jaccard = {**base, "overlap": {"m": {"length": 0.7}}, "spearman_length": {"m": 0.1}}
    by_rho = {**base, "overlap": {"m": {"length": 0.1}}, "spearman_length": {"m": -0.85}}
    clean = {**base, "overlap": {"m": {"length": 0.69}}, "spearman_length": {"m": 0.79}}
    assert not G.gate_mechanism("m", by_jaccard, p).passed
    assert not G.gate_mechanism("m", by_rho, p).passed
    assert G.gate_mechanism("m", clean, p).passed
    assert G.gate_mechanism("m", {**base, "overlap": {}, "spearman_length": {"m": math.nan}}, p).passed


def test_result_round_trips_through_json(planted, tmp_path):
    import json

    from cupid_engine.audit.gates import evaluate_audit
    from cupid_engine.audit.protocol import AuditConfig
    from cupid_engine.audit.results import AuditData

    payload = json.loads(json.dumps(planted.to_dict(), allow_nan=False))
    again = evaluate_audit(AuditData.from_dict(payload["data"]), AuditConfig.from_dict(payload["config"]))
    assert [(d.method, d.verdict) for d in again.decisions] == [(d.method, d.verdict) for d in planted.decisions]
    assert np.allclose([c["stats"]["mean"] for c in again.comparisons],
                       [c["stats"]["mean"] for c in planted.comparisons], equal_nan=True)
