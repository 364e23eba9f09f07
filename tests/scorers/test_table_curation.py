"""Score tables (ranks, Parquet round trip) and curation semantics."""

from __future__ import annotations

import numpy as np
import pytest

from cupid_engine.scorers import curation
from cupid_engine.scorers.preconditioner import PreconditionerConfig
from cupid_engine.scorers.table import make_table, read_table, table_config, write_table


def _table():
    ids = ["t0", "t1", "t2", "t3", "h0", "h1", "h2"]
    scores = [0.5, -1.0, 2.0, 0.5, 3.0, -2.0, 1.0]
    splits = ["train"] * 4 + ["holdout"] * 3
    return make_table(ids, scores, method="x", splits=splits, config=PreconditionerConfig(),
                      metadata={"tier": ["better"] * 7})


def test_ranks_and_roundtrip(tmp_path):
    t = _table()
    # 1 = highest; tie between t0 and t3 broken by id.
    assert dict(zip(t["episode_id"].to_pylist(), t["rank"].to_pylist())) == {
        "h0": 1, "t2": 2, "h2": 3, "t0": 4, "t3": 5, "t1": 6, "h1": 7}
    write_table(t, tmp_path / "s.parquet")
    back = read_table(tmp_path / "s.parquet")
    assert back.equals(t)
    assert table_config(back)["damping"] == PreconditionerConfig().damping
    with pytest.raises(ValueError, match="non-finite"):
        make_table(["a"], [np.nan], method="x")
    with pytest.raises(ValueError, match="duplicate"):
        make_table(["a", "a"], [1, 2], method="x")


def test_filter_k_removes_lowest_training(tmp_path):
    kept, removed = curation.filter_k(_table(), 2)
    assert removed == ["t1", "t3"]  # lowest first; t3 loses the tie with t0 (rank by id)
    assert kept["episode_id"].to_pylist() == ["t2", "t0"]
    assert set(kept["split"].to_pylist()) == {"train"}
    write_table(_table(), tmp_path / "s.parquet")
    assert curation.filter_k(tmp_path / "s.parquet", 2)[1] == removed
    with pytest.raises(ValueError):
        curation.filter_k(_table(), 5)


def test_select_k_adds_highest_holdout():
    sel, added = curation.select_k(_table(), 2)
    assert added == ["h0", "h2"]
    assert sorted(sel["episode_id"].to_pylist()) == sorted(["t0", "t1", "t2", "t3", "h0", "h2"])
    with pytest.raises(ValueError):
        curation.select_k(_table(), 4)


def test_combine_min_max_weighted():
    a = make_table(["x", "y", "z"], [0.0, 5.0, 10.0], method="a")
    b = make_table(["z", "y", "x"], [1.0, 3.0, 2.0], method="b")
    c = curation.combine([a, b], [0.25, 0.75])
    want = {"x": 0.25 * 0 + 0.75 * 0.5, "y": 0.25 * 0.5 + 0.75 * 1.0, "z": 0.25 * 1.0 + 0.0}
    assert dict(zip(c["episode_id"].to_pylist(), c["score"].to_pylist())) == pytest.approx(want)
    with pytest.raises(ValueError, match="different episodes"):
        curation.combine([a, make_table(["x"], [1.0], method="c")])
