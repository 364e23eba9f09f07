"""``cupid-engine curate keep``: the best k demos of any split."""

from __future__ import annotations

from cupid_engine.cli import main
from cupid_engine.scorers import read_table


def test_keep_best_k_of_any_split(loop, tmp_path, capsys):
    scores = str(tmp_path / "cupid.parquet")
    assert main(["score", "cupid", "--store", loop["store"], "--run", "base", "--episodes", "train+holdout",
                 "--out", scores]) == 0
    table = read_table(scores)
    assert table.num_rows == 14
    best = table.sort_by([("rank", "ascending")])["episode_id"].to_pylist()
    out = str(tmp_path / "keep.parquet")
    assert main(["curate", "keep", "--scores", scores, "--k", "5", "--out", out,
                 "--ids-out", str(tmp_path / "dropped.txt")]) == 0
    assert read_table(out)["episode_id"].to_pylist() == best[:5]
    assert sorted((tmp_path / "dropped.txt").read_text().split()) == sorted(best[5:])
    assert main(["curate", "keep", "--scores", scores, "--k", "2", "--split", "holdout", "--out", out]) == 0
    assert sorted(read_table(out)["episode_id"].to_pylist()) == ["hold_0", "hold_1"]
    capsys.readouterr()
    assert main(["curate", "keep", "--scores", scores, "--k", "15", "--out", out]) == 2
    assert "keep k must be in [0, 14]" in capsys.readouterr().err


def test_select_without_holdout_points_to_keep(loop, tmp_path, capsys):
    scores = str(tmp_path / "cupid.parquet")
    assert main(["score", "cupid", "--store", loop["store"], "--run", "base", "--out", scores]) == 0
    capsys.readouterr()
    assert main(["curate", "select", "--scores", scores, "--k", "5", "--out", str(tmp_path / "x.parquet")]) == 2
    err = capsys.readouterr().err
    assert "select adds holdout demos" in err and "curate keep --k N" in err
