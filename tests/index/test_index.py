"""Index: exact top-k equals a full sort, HNSW recall measured, top_influencers semantics, the
``auto`` default (flat or sq8 by size, the choice said and saved, always exact)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cupid_engine.index import (
    AUTO_SQ8_MIN_BYTES,
    DEFAULT_KIND,
    InfluenceIndex,
    choose_kind,
    faiss_index,
    open_index,
    recall_at_k,
    top_influencers,
)
from cupid_engine.scorers import score
from cupid_engine.scorers.arrays import ArrayRun, ArrayStore
from cupid_engine.scorers.preconditioner import Preconditioner, concat_checkpoints


def make_store(rng, *, k=8, n_train=40, path=None, runs=1):
    ids = [f"train_{i:03d}" for i in range(n_train)] + ["hold_0", "roll_ok", "roll_bad"]
    splits = {e: "train" for e in ids[:n_train]} | {"hold_0": "holdout", "roll_ok": "rollout", "roll_bad": "rollout"}
    lengths = {e: 1 + (i * 7) % 11 for i, e in enumerate(ids)}
    steps = [{e: rng.standard_normal((lengths[e], k)) for e in ids} for _ in range(runs)]
    success = {"roll_ok": True, "roll_bad": False}
    return ArrayStore.from_episodes(steps, splits, success=success, path=path, dtype=np.float64)


@pytest.mark.parametrize("serial_bytes", [8 << 20, 0], ids=["serial-scan", "threaded-scan"])
@pytest.mark.parametrize("nq", [1, 5, 40], ids=["one", "small-batch", "faiss-batch"])
def test_flat_top_k_equals_full_sort(rng, monkeypatch, nq, serial_bytes):
    monkeypatch.setattr(faiss_index, "SERIAL_SCAN_BYTES", serial_bytes)  # which exact path small batches take
    x = rng.standard_normal((500, 16)).astype(np.float32)
    q = rng.standard_normal((nq, 16)).astype(np.float32)
    idx = InfluenceIndex(16)
    idx.add(x[:200], [f"e{i}" for i in range(200)])
    idx.search(q, 3)  # a search before a later add must not keep a stale view
    idx.add(x[200:], [f"e{i}" for i in range(200, 500)])
    scores, ids = idx.search(q, 10)
    for b in range(nq):
        full = x @ q[b]
        order = np.argsort(-full, kind="stable")[:10]
        assert ids[b] == [f"e{i}" for i in order]
        np.testing.assert_allclose(scores[b], full[order], rtol=1e-5)


def test_hnsw_recall_is_measured(rng):
    x = rng.standard_normal((2000, 16)).astype(np.float32)
    q = rng.standard_normal((50, 16)).astype(np.float32)
    ids = [f"e{i}" for i in range(2000)]
    exact, hnsw = InfluenceIndex(16), InfluenceIndex(16, kind="hnsw", ef_search=128)
    exact.add(x, ids)
    hnsw.add(x, ids)
    recall = recall_at_k(hnsw.search(q, 10)[1], exact.search(q, 10)[1])
    assert recall >= 0.95, recall


def test_top_influencers_match_cupid_and_breakdown(rng):
    st = make_store(rng)
    run = st.run("base")
    for rollout, sign in (("roll_ok", 1.0), ("roll_bad", -1.0)):
        res = top_influencers(st, "base", rollout, k=5)
        assert res.sign == sign
        # Single-rollout CUPID (m = 1) is the exhaustive answer.
        table = score("cupid", store=st, run="base", rollouts=rollout)
        full = dict(zip(table["episode_id"].to_pylist(), table["score"].to_numpy()))
        best = sorted(full, key=lambda e: -full[e])[:5]
        assert res.table["episode_id"].to_pylist() == best
        np.testing.assert_allclose(res.table["score"].to_numpy(), [full[e] for e in best], rtol=1e-9)
        pre = Preconditioner.from_run(run)
        for st_inf in res.steps:
            a = sign * (pre.whiten(run.step_features(rollout)) @ pre.whiten(run.step_features(st_inf.episode_id)).T)
            assert st_inf.rollout_steps[0][1] == pytest.approx(float(a.sum(1).max()))
            assert st_inf.demo_steps[0][1] == pytest.approx(float(a.sum(0).max()))
            assert st_inf.pairs[0][2] == pytest.approx(float(a.max()))
    assert "hold_0" not in open_index(st, "base").ids  # only training demos are indexed
    assert "roll_ok" in str(res) or "roll_bad" in str(res)


def test_index_saved_beside_store_and_rebuilt_when_run_changes(rng, tmp_path):
    st = make_store(rng, path=str(tmp_path))
    idx = open_index(st, "base")
    folder = tmp_path / "index" / "base"
    meta = json.loads((folder / "flat.json").read_text())
    assert meta["ids"] == idx.ids and meta["meta"]["base.config_hash"] == st.run("base").config.hash()
    # A fresh store object over the same data reopens the saved index.
    st2 = ArrayStore(st.catalog(), {"base": st.run("base")}, path=str(tmp_path))
    mtime = os.path.getmtime(folder / "flat.faiss")
    assert open_index(st2, "base").ids == idx.ids and os.path.getmtime(folder / "flat.faiss") == mtime
    # Changed features -> different Gram -> the saved index is stale and rebuilt.
    steps = {e: st.run("base").step_features(e) * 2.0 for e in st.catalog()["episode_id"].to_pylist()}
    st3 = ArrayStore(st.catalog(), {"base": ArrayRun("base", steps, st.catalog(), dtype=np.float64)}, path=str(tmp_path))
    new = open_index(st3, "base")
    assert new.meta != idx.meta
    assert json.loads((folder / "flat.json").read_text())["meta"] == new.meta


def test_hnsw_query_and_checkpoint_ensemble(rng, tmp_path):
    st = make_store(rng, runs=2)
    exact = top_influencers(st, ["ckpt0", "ckpt1"], "roll_ok", k=5)
    # The ensemble score is the mean of the per-checkpoint CUPID scores.
    per = [score("cupid", store=st, run=r, rollouts="roll_ok") for r in ("ckpt0", "ckpt1")]
    mean = {e: np.mean([dict(zip(t["episode_id"].to_pylist(), t["score"].to_numpy()))[e] for t in per]) for e in
            per[0]["episode_id"].to_pylist()}
    np.testing.assert_allclose(exact.table["score"].to_numpy(), [mean[e] for e in exact.table["episode_id"].to_pylist()],
                               rtol=1e-9)
    assert exact.table["episode_id"].to_pylist() == sorted(mean, key=lambda e: -mean[e])[:5]
    approx = top_influencers(st, ["ckpt0", "ckpt1"], "roll_ok", k=5, kind="hnsw", ef_search=64)
    assert recall_at_k([approx.table["episode_id"].to_pylist()], [exact.table["episode_id"].to_pylist()]) >= 0.8
    assert concat_checkpoints([np.ones((1, 2)), np.ones((1, 2))]).shape == (1, 4)


def test_top_influencers_on_gradient_store_reads_only_hit_rows(rng, tmp_path):
    from cupid_engine.store import RunConfig, create_store, open_store

    mem = make_store(rng)
    path = str(tmp_path / "g.zarr")
    gs = create_store(path, chunk_rows=8, episode_chunk_rows=4)
    cat = mem.catalog()
    gs.add_episodes(cat.select(["episode_id", "split", "length", "success", "tier"]), shard_size=6)
    run = gs.create_run("base", RunConfig(k=8, dtype="float32", gram_splits=("train",)))
    for s in range(gs.num_shards):
        ids, lengths = gs.shard_episodes(s)
        run.write_shard(s, ids, np.concatenate([mem.run("base").step_features(e) for e in ids]), lengths)
    run.finalize()
    fresh = open_store(path)
    index = open_index(fresh, "base", save=False)
    fresh = open_store(path)  # a new handle: nothing of the catalog loaded yet
    for rollout in ("roll_ok", "roll_bad"):
        res = top_influencers(fresh, "base", rollout, k=5, index=index)
        ref = top_influencers(mem, "base", rollout, k=5)
        assert res.sign == ref.sign
        assert res.table.column("episode_id").to_pylist() == ref.table.column("episode_id").to_pylist()
        assert res.table.column("length").to_pylist() == ref.table.column("length").to_pylist()
        np.testing.assert_allclose(res.table["score"].to_numpy(), ref.table["score"].to_numpy(), rtol=1e-4)
    snap = fresh._index()
    assert snap._table is None  # the whole catalog was never materialised
    with pytest.raises(ValueError, match="not in the catalog"):
        top_influencers(fresh, "base", "no_such_rollout", k=5, index=index)


def test_choose_kind_by_rows_and_device():
    assert DEFAULT_KIND == "auto"
    rows = AUTO_SQ8_MIN_BYTES // (4 * 1024)  # the threshold is in fp32 bytes: rows x dim x 4
    kind, why = choose_kind("auto", rows - 1, 1024)
    assert kind == "flat" and f"{rows - 1} rows x 1024" in why and "measured" in why
    kind, why = choose_kind("auto", rows, 1024)
    assert kind == "sq8" and "exact" in why
    assert choose_kind("auto", rows, 256)[0] == "flat" and choose_kind("auto", 4 * rows, 256)[0] == "sq8"
    kind, why = choose_kind("auto", 10 * rows, 1024, device="gpu")
    assert kind == "flat" and "device='gpu'" in why
    assert choose_kind("hnsw", 5, 8) == ("hnsw", "hnsw requested")
    with pytest.raises(ValueError, match="one of"):
        choose_kind("ivf", 5, 8)
    with pytest.raises(ValueError, match="choose_kind"):
        InfluenceIndex(4, kind="auto")  # 'auto' is resolved before an index exists


@pytest.mark.parametrize("threshold", [None, 4], ids=["small-store-flat", "forced-sq8"])
def test_auto_gives_flats_exact_top_and_scores(rng, monkeypatch, threshold):
    if threshold is not None:  # the same store with the threshold below its size: auto takes sq8
        monkeypatch.setattr(faiss_index, "AUTO_SQ8_MIN_BYTES", threshold)
    st = make_store(rng, n_train=300, k=12)
    for rollout in ("roll_ok", "roll_bad"):
        auto = top_influencers(st, "base", rollout, k=10, rerank=10)
        flat = top_influencers(st, "base", rollout, k=10, kind="flat")
        assert auto.index["requested"] == "auto" and auto.index["rows"] == 300
        assert auto.index["kind"] == ("flat" if threshold is None else "sq8")
        assert flat.index["kind"] == "flat" and flat.index["reason"] == "flat requested"
        assert auto.table["episode_id"].to_pylist() == flat.table["episode_id"].to_pylist()
        # Scores are the exact float64 a(τ, ξ) of the returned demos: bit for bit.
        assert auto.table["score"].to_pylist() == flat.table["score"].to_pylist()


def test_choice_saved_with_the_index_and_reported_on_load(rng, tmp_path, monkeypatch):
    monkeypatch.setattr(faiss_index, "AUTO_SQ8_MIN_BYTES", 30 * 8 * 4)
    st = make_store(rng, path=str(tmp_path))  # 40 training demos x k = 8 >= 30 x 8: sq8
    idx = open_index(st, "base")
    assert idx.kind == "sq8" and idx.choice["requested"] == "auto" and "40 rows x 8" in idx.choice["reason"]
    folder = tmp_path / "index" / "base"
    saved = json.loads((folder / "sq8.json").read_text())
    assert saved["choice"] == idx.choice
    back = InfluenceIndex.load(folder, "sq8")
    assert back.choice == idx.choice and back.kind == "sq8"
    assert np.array_equal(back.l1, idx.l1)  # the bound's norms are rebuilt from the saved codes
    flat = open_index(st, "base", kind="flat")
    assert flat.choice == {"requested": "flat", "kind": "flat", "reason": "flat requested"}
    assert json.loads((folder / "flat.json").read_text())["choice"] == flat.choice
