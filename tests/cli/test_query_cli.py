"""``cupid-engine query``: answers "which demos made this rollout fail" by default, in words."""

from __future__ import annotations

import json

from cupid_engine.cli import main
from cupid_engine.index import top_influencers


def _query(loop, *args):
    return main(["query", "--store", loop["store"], "--run", "base", *args])


def test_failed_rollout_default_is_the_causes(loop, capsys):
    capsys.readouterr()
    assert _query(loop, "--episode", "roll_1", "--top", "3", "--json") == 0  # roll_1 failed
    out = json.loads(capsys.readouterr().out)
    assert out["sign"] == 1.0 and "made it fail" in out["meaning"]
    causes = [r["episode_id"] for r in out["results"]]
    # The same as the library with an explicit +1: the demos with the largest a(τ, ξ).
    lib = top_influencers(loop["store"], "base", "roll_1", k=3, sign=1.0)
    assert causes == lib.table["episode_id"].to_pylist()
    assert _query(loop, "--episode", "roll_1", "--top", "3", "--oppose", "--json") == 0
    opp = json.loads(capsys.readouterr().out)
    assert opp["sign"] == -1.0 and "pushed against this failure" in opp["meaning"]
    assert opp["results"][0]["episode_id"] not in causes
    assert _query(loop, "--episode", "roll_0", "--top", "2") == 0  # a success, text output
    text = capsys.readouterr().out
    assert text.startswith("sign +1:") and "owes its success to" in text


def test_refuses_non_rollouts_and_bad_top(loop, capsys):
    capsys.readouterr()
    assert _query(loop, "--episode", "hold_0") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'holdout' episode, not a rollout" in err[0] and "--any-episode" in err[0]
    assert _query(loop, "--episode", "hold_0", "--any-episode", "--top", "2") == 0
    capsys.readouterr()
    for bad in ("-3", "0"):
        assert _query(loop, "--episode", "roll_1", "--top", bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: --top must be a positive number of demonstrations, got {bad}"]
    assert _query(loop, "--episode", "nope") == 2
    assert "'nope' is not in the store's catalog" in capsys.readouterr().err
    assert _query(loop, "--episode", "roll_1", "--top", "50", "--json") == 0
    captured = capsys.readouterr()
    assert "exceeds the 12 training demos" in captured.err and len(json.loads(captured.out)["results"]) == 12


def test_training_demo_with_any_episode_leaves_itself_out(loop, capsys):
    capsys.readouterr()
    assert _query(loop, "--episode", "demo_04") == 2  # a training demo is not a rollout
    assert "'train' episode, not a rollout" in capsys.readouterr().err
    assert _query(loop, "--episode", "demo_04", "--any-episode", "--top", "3", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    ids = [r["episode_id"] for r in out["results"]]
    assert len(ids) == 3 and "demo_04" not in ids and [r["rank"] for r in out["results"]] == [1, 2, 3]
    assert "left out of the ranking" in out["meaning"]
    lib = top_influencers(loop["store"], "base", "demo_04", k=4, sign=1.0).table["episode_id"].to_pylist()
    assert lib[0] == "demo_04" and ids == [e for e in lib if e != "demo_04"][:3]


def test_index_kind_is_said_and_sq8_gives_the_same_answer(loop, capsys, caplog):
    capsys.readouterr()
    caplog.set_level("INFO", logger="cupid_engine")
    assert _query(loop, "--episode", "roll_1", "--top", "4", "--json", "--rebuild") == 0
    out = json.loads(capsys.readouterr().out)
    # 12 training demos: the default resolves to the exact flat scan, and says so.
    assert out["index"]["requested"] == "auto" and out["index"]["kind"] == "flat" and out["index"]["rows"] == 12
    assert "building the flat index over 12 training demos (auto: flat" in caplog.text
    caplog.clear()
    assert _query(loop, "--episode", "roll_1", "--top", "4", "--kind", "sq8", "--rerank", "2", "--json") == 0
    sq8 = json.loads(capsys.readouterr().out)
    assert sq8["index"]["kind"] == "sq8" and "sq8 index over 12 training demos" in caplog.text
    assert sq8["results"] == out["results"]  # same demos, same exact scores
    assert _query(loop, "--episode", "roll_1", "--rerank", "0") == 2
    assert "--rerank must be a positive number" in capsys.readouterr().err


def test_index_command_builds_and_says_which_kind(loop, capsys, tmp_path):
    from cupid_engine.index import InfluenceIndex

    capsys.readouterr()
    assert main(["index", "--store", loop["store"], "--run", "base", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["requested"] == "auto" and info["kind"] == "flat" and info["rows"] == 12 and info["dim"] == 16
    assert "8 MiB" in info["reason"] and len(info["saved"]) == 1
    back = InfluenceIndex.load(info["saved"][0], "flat")
    assert back.choice["kind"] == "flat" and back.choice["requested"] == "auto" and len(back) == 12
    assert main(["index", "--store", loop["store"], "--run", "base", "--kind", "sq8"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("index sq8 over 12 training demos x 16 (sq8 requested)") and "saved in" in text
