"""``cupid-engine bench fidelity --quick``: the whole known-answer pipeline at toy sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cupid_engine.cli.bench import _load


def test_metrics_reference_values():
    bf = _load("fidelity")
    bad = np.array([True, True, False, False])
    assert bf.auroc(np.array([0.0, 1.0, 2.0, 3.0]), bad) == 1.0
    assert bf.auroc(np.array([3.0, 2.0, 1.0, 0.0]), bad) == 0.0
    assert bf.auroc(np.array([1.0, 1.0, 1.0, 1.0]), bad) == 0.5
    assert bf.auroc(np.array([0.0, 2.0, 1.0, 3.0]), bad) == 0.75
    assert bf.removed_bad(np.array([0.0, 1.0, 2.0, 3.0]), bad, 2) == 2
    lo, hi = bf.wilson(45, 50)
    assert 0.78 < lo < 0.80 and 0.95 < hi < 0.97


def test_paired_auroc_difference():
    bf = _load("fidelity")
    rng = np.random.default_rng(0)
    bad = np.arange(40) < 20
    good = [np.where(bad, 0.0, 1.0) + 0.3 * rng.standard_normal(40) for _ in range(3)]
    noise = [rng.standard_normal(40) for _ in range(3)]
    d = bf.paired_auroc_difference(good, noise, bad, n_boot=300)
    want = np.mean([bf.auroc(g, bad) - bf.auroc(n, bad) for g, n in zip(good, noise)])
    assert d["mean_difference"] == pytest.approx(want) and d["ci95"][0] > 0.2
    same = bf.paired_auroc_difference(good, good, bad, n_boot=50)  # paired: identical scorers differ by exactly 0
    assert same == {"mean_difference": 0.0, "ci95": [0.0, 0.0]}


@pytest.mark.parametrize("scorer", ["cupid", "cupid-quality"])
def test_rollout_bootstrap_matches_the_scorer(rng, scorer):
    from cupid_engine.scorers import score
    from cupid_engine.scorers.arrays import ArrayStore

    bf = _load("fidelity")
    k = 6
    steps, splits, success = {}, {}, {}
    for i in range(12):
        steps[f"d{i:02d}"] = rng.standard_normal((4, k)) + (0.8 if i % 3 else -0.8)
        splits[f"d{i:02d}"] = "train"
    steps["d_big"], splits["d_big"] = rng.standard_normal((5 * k, k)), "train"
    for i in range(9):
        steps[f"r{i}"], splits[f"r{i}"], success[f"r{i}"] = rng.standard_normal((5, k)), "rollout", bool(i % 2)
    st = ArrayStore.from_episodes(steps, splits, success=success, dtype=np.float64)
    ids = [f"d{i:02d}" for i in range(12)][::-1]  # any order of the ids
    bad = np.array([int(e[1:]) % 3 == 0 for e in ids])
    table = score(scorer, store=st, run="base")
    by_id = dict(zip(table["episode_id"].to_pylist(), table["score"].to_numpy()))
    out = bf.rollout_bootstrap(st, ids, bad, scorer=scorer, n_boot=200, seed=3)
    assert out["auroc"] == bf.auroc(np.array([by_id[e] for e in ids]), bad) and out["rollouts"] == 9
    assert 0.0 <= out["ci95"][0] <= out["ci95"][1] <= 1.0
    assert out == bf.rollout_bootstrap(st, ids, bad, scorer=scorer, n_boot=200, seed=3)  # seeded
    assert out["ci95_demos_only"] == list(bf.auroc_ci(np.array([by_id[e] for e in ids]), bad, n_boot=200, seed=3))


@pytest.mark.sim
def test_quick_runs_and_writes_acceptance(tmp_path):
    bf = _load("fidelity")
    parser = bf.build_parser()
    out = tmp_path / "fid.json"
    args = parser.parse_args(["--quick", "--scenarios", "lift-grasp", "--scorers",
                              "cupid,cupid-step,cupid-quality,length,random", "--work", str(tmp_path / "work"),
                              "--json", str(out)])
    res = bf.run(args)
    saved = json.loads(out.read_text())
    assert saved["quick"] is True and res["quick"] is True
    (r,) = saved["results"]
    assert r["scenario"] == "lift-grasp" and r["demos"] == 6 and r["known_bad"] == 4 and r["k"] == 4
    row = r["per_seed"][0]["scorers"]
    assert set(row) == {"cupid", "cupid-step", "cupid-quality", "length", "random"}
    for name, m in row.items():
        if "error" in m:  # e.g. no successful toy rollout: the contrast is undefined, and says so
            assert name == "cupid-step" and "different returns" in m["error"]
        else:
            assert 0.0 <= m["auroc"] <= 1.0 and 0 <= m["removed_bad"] <= 4
    assert row["length"]["auroc"] == 0.5  # fixed horizon: length ties every demo
    assert saved["criteria"] == {"auroc": 0.85, "oracle_fraction": 0.8}
    # The acceptance rows judge the project default (docs/fidelity.md §3g).
    assert [(a["scenario"], a["scorer"]) for a in saved["acceptance"]] == [("lift-grasp", "cupid-quality")]
    assert saved["acceptance"][0]["auroc"] == row["cupid-quality"]["auroc"]
    for name in ("cupid", "cupid-quality"):
        lo, hi = row[name]["auroc_ci_demos_and_rollouts"]
        assert 0.0 <= lo <= hi <= 1.0


def test_spurious_row_compares_the_default_with_the_other_performance_scorer():
    bf = _load("fidelity")

    def result():
        seed = {"scorers": {n: {"auroc": a, "removed_bad": 3} for n, a in
                            {"cupid": 0.6, "cupid-quality": 0.7, "length": 0.5, "random": 0.55}.items()}}
        paired = {n: {"mean_difference": 0.1, "ci95": [0.01, 0.2]} for n in ("cupid", "cupid-quality", "length", "random")}
        return {"scenario": "lift-cue", "kind": "spurious", "per_seed": [seed], "paired_vs_default": paired}

    (q,) = bf.summarise([result()], "cupid-quality")["acceptance"]
    assert q["scorer"] == "cupid-quality" and set(q["baselines_auroc"]) == {"length", "random", "cupid"}
    assert q["beats_baselines"] and q["beats_baselines_significantly"]
    (c,) = bf.summarise([result()], "cupid")["acceptance"]
    assert set(c["baselines_auroc"]) == {"length", "random", "cupid-quality"} and not c["beats_baselines"]
