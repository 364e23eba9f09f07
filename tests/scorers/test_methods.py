"""QoQ, TRAK-Traj, TracIn and the baselines against brute-force definitions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import rankdata

from cupid_engine.scorers import available_scorers, get_scorer, score
from cupid_engine.scorers.arrays import ArrayStore
from cupid_engine.scorers.baselines import success_similarity_scores
from cupid_engine.scorers.qoq import qoq_scores
from cupid_engine.scorers.tracin import tracin_scores
from cupid_engine.scorers.trak_traj import rank_ensemble, trak_traj_member, winsorize


def _split(store, split):
    return [r["episode_id"] for r in store.catalog().to_pylist() if r["split"] == split]


def test_registry_lists_every_method():
    want = {"cupid", "cupid-quality", "qoq", "trak-traj", "tracin", "random", "length", "loss", "success-sim", "oracle"}
    assert want <= set(available_scorers())
    with pytest.raises(KeyError, match="available"):
        get_scorer("nope")


def test_qoq_equals_brute_force_max(rng):
    demos = [rng.standard_normal((n, 6)) for n in (1, 4, 9)]
    val = rng.standard_normal((11, 6))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    want = [np.mean([max(float(unit(z[None])[0] @ unit(v[None])[0]) for v in val) for z in d]) for d in demos]
    np.testing.assert_allclose(qoq_scores(demos, val, block=3), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(qoq_scores(demos, val, sign=-1.0), -np.asarray(want), rtol=1e-5, atol=1e-6)


def test_qoq_scorer_validation_sets(store):
    run = store.run("base")
    demos, target = _split(store, "train"), _split(store, "target")
    t = score("qoq", store=store, run="base")
    want = qoq_scores([run.step_features(e) for e in demos], np.concatenate([run.step_features(e) for e in target]))
    np.testing.assert_allclose(t["score"].to_numpy(), want, rtol=1e-6)
    failed = [r["episode_id"] for r in store.catalog().to_pylist() if r["split"] == "rollout" and not r["success"]]
    f = score("qoq", store=store, run="base", validation="failed-rollouts")
    want = -qoq_scores([run.step_features(e) for e in demos], np.concatenate([run.step_features(e) for e in failed]))
    np.testing.assert_allclose(f["score"].to_numpy(), want, rtol=1e-6)


def test_trak_traj_member_and_ensemble(rng):
    phi, tgt = rng.standard_normal((30, 5)), rng.standard_normal((4, 5))
    h = phi.T @ phi / 30 + 0.1 * np.eye(5)
    np.testing.assert_allclose(
        trak_traj_member(phi, tgt, ridge=0.1, relative=False), phi @ np.linalg.solve(h, tgt.mean(0)), rtol=1e-10
    )
    x = np.r_[np.zeros(20), 100.0]
    assert winsorize(x).max() <= x.mean() + 2 * x.std() + 1e-12
    members = [rng.standard_normal(10) for _ in range(3)]
    np.testing.assert_allclose(rank_ensemble(members), np.mean([rankdata(winsorize(m)) for m in members], 0))


def test_trak_traj_scorer_over_seeds_and_checkpoints(rng):
    ids = [f"e{i}" for i in range(12)] + ["t0", "t1"]
    splits = {e: "target" if e.startswith("t") else "train" for e in ids}
    runs = [{e: rng.standard_normal((1, 6)) for e in ids} for _ in range(4)]
    st = ArrayStore.from_episodes(runs, splits, run_names=["s0c0", "s0c1", "s97c0", "s97c1"], dtype=np.float64)
    t = score("trak-traj", store=st, run="s0c0", members=[["s0c0", "s0c1"], ["s97c0", "s97c1"]])
    train = [e for e in ids if splits[e] == "train"]
    feats = lambda r: (np.concatenate([runs[r][e] for e in train]), np.concatenate([runs[r][e] for e in ("t0", "t1")]))
    per_seed = [np.mean([trak_traj_member(*feats(c)) for c in pair], 0) for pair in ((0, 1), (2, 3))]
    np.testing.assert_allclose(t["score"].to_numpy(), rank_ensemble(per_seed))


def test_tracin_equals_brute_force(store):
    run = store.run("base")
    demos, target = _split(store, "train"), _split(store, "target")
    tgt_steps = np.concatenate([run.step_features(e) for e in target])
    want = [2.0 * sum(float(z @ tgt_steps.mean(0)) for z in run.step_features(e)) for e in demos]
    t = score("tracin", store=store, run="base", learning_rates=[2.0])
    np.testing.assert_allclose(t["score"].to_numpy(), want, rtol=1e-9)
    np.testing.assert_allclose(tracin_scores([np.eye(2)] * 2, [np.ones(2)] * 2, [1.0, 0.5]), [1.5, 1.5])


def test_random_is_seeded_and_order_independent(store):
    a = score("random", store=store, run="base", seed=3)
    ids = a["episode_id"].to_pylist()
    b = score("random", store=store, run="base", seed=3, episodes=",".join(reversed(ids)))
    assert dict(zip(ids, a["score"].to_numpy())) == dict(zip(b["episode_id"].to_pylist(), b["score"].to_numpy()))
    assert not np.array_equal(a["score"].to_numpy(), score("random", store=store, run="base", seed=4)["score"].to_numpy())


def test_length_loss_oracle(store):
    ln = score("length", store=store, run="base")
    np.testing.assert_array_equal(ln["score"].to_numpy(), -ln["length"].to_numpy().astype(float))
    ids = ln["episode_id"].to_pylist()
    loss = {e: float(i) for i, e in enumerate(ids)}
    lo = score("loss", store=store, run="base", loss=loss)
    np.testing.assert_array_equal(lo["score"].to_numpy(), -np.arange(len(ids), dtype=float))
    with pytest.raises(ValueError, match="bc_loss"):
        score("loss", store=store, run="base")
    orc = score("oracle", store=store, run="base")
    tiers = orc["tier"].to_pylist()
    assert all((s == {"better": 2, "okay": 1, "worse": 0}[t]) for s, t in zip(orc["score"].to_pylist(), tiers))


def test_oracle_without_tiers_raises(rng):
    st = ArrayStore.from_episodes({"a": rng.standard_normal((2, 3))}, {"a": "train"})
    with pytest.raises(ValueError, match="tier"):
        score("oracle", store=st, run="base")


def test_success_similarity_equals_brute_force(rng, store):
    demos = [rng.standard_normal((n, 3)) for n in (1, 4)]
    good = [rng.standard_normal((n, 3)) for n in (2, 5)]
    want = [-np.mean([np.mean([min(np.linalg.norm(z - w) for w in g) for z in d]) for g in good]) for d in demos]
    np.testing.assert_allclose(success_similarity_scores(demos, good, block=2), want, rtol=1e-12)
    states = {r["episode_id"]: rng.standard_normal((r["length"], 3)) for r in store.catalog().to_pylist()}
    t = score("success-sim", store=store, run="base", states=states)
    assert t.num_rows == len(_split(store, "train"))
    with pytest.raises(ValueError, match="states="):
        score("success-sim", store=store, run="base")


def test_vanishing_rollout_features_warn(rng, caplog):
    """A deterministic policy's BC-loss gradient vanishes at its own rollout actions: the
    scorer must say so instead of silently scoring rounding noise."""
    from cupid_engine.scorers import score
    from cupid_engine.scorers.arrays import ArrayStore

    steps, splits, success = {}, {}, {}
    for i in range(12):
        steps[f"d{i}"], splits[f"d{i}"], success[f"d{i}"] = rng.standard_normal((5, 8)), "train", True
    for i in range(4):
        steps[f"r{i}"] = 1e-7 * rng.standard_normal((6, 8))
        splits[f"r{i}"], success[f"r{i}"] = "rollout", bool(i % 2)
    store = ArrayStore.from_episodes(steps, splits, success=success)
    with caplog.at_level("WARNING", logger="cupid_engine.scorers._inputs"):
        score("cupid", store=store, run="base")
    assert any("rollout features are" in r.message and "energy" in r.message for r in caplog.records)
    caplog.clear()
    for i in range(4):
        steps[f"r{i}"] = rng.standard_normal((6, 8))
    store = ArrayStore.from_episodes(steps, splits, success=success)
    with caplog.at_level("WARNING", logger="cupid_engine.scorers._inputs"):
        score("cupid", store=store, run="base")
    assert not any("rollout features are" in r.message for r in caplog.records)
