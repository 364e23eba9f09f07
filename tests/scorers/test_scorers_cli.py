"""``cupid-engine score|curate|query`` end to end on a small real store."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cupid_engine.store")

from cupid_engine.cli import main  # noqa: E402
from cupid_engine.scorers import read_table  # noqa: E402

from test_store_backed import _write  # noqa: E402


def test_score_curate_query(tmp_path, rng, capsys):
    _write(tmp_path, rng)
    s = str(tmp_path / "s.zarr")
    out = tmp_path / "scores.parquet"
    assert main(["score", "cupid-quality", "--store", s, "--run", "base", "--rollouts", "rollout",
                 "--set", "weighting=official", "--out", str(out)]) == 0
    table = read_table(out)
    assert table.num_rows == 8 and set(table["method"].to_pylist()) == {"cupid-quality"}
    assert main(["curate", "filter", "--scores", str(out), "--k", "3", "--out", str(tmp_path / "c.parquet"),
                 "--ids-out", str(tmp_path / "ids.txt")]) == 0
    removed = (tmp_path / "ids.txt").read_text().split()
    assert len(removed) == 3 and read_table(tmp_path / "c.parquet").num_rows == 5
    worst = table.sort_by([("rank", "descending")])["episode_id"].to_pylist()[:3]
    assert sorted(removed) == sorted(worst)
    capsys.readouterr()
    assert main(["query", "--store", s, "--run", "base", "--episode", "ep_10", "--top", "4"]) == 0
    text = capsys.readouterr().out
    assert "top influencers of rollout ep_10" in text and text.count("ep_0") == 4
    capsys.readouterr()
    assert main(["score", "length", "--store", s, "--run", "base", "--rollouts", "rollout", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == "error: length takes no --rollouts"
    assert np.isfinite(table["score"].to_numpy()).all()
